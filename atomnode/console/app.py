"""The console's ASGI application: pages, the JSON API under /api/, /metrics.

Routing is a table of (method, path pattern) -> handler; no framework. Every page is
rendered from the same dictionaries the API returns, so what the page shows and what
``/api/...`` answers cannot drift apart. Reads of the queue database run in a worker thread
(the trio thread serves Gearman); the broker's and the supervisor's state are read in the
trio thread, where they live.

Who may do what (docs/operations.md):
* a request from a loopback address with no proxy header (``Forwarded``,
  ``X-Forwarded-For``) is local: no login;
* any other request needs the configured credential (HTTP basic auth), and is refused
  outright when none is configured;
* changes (retry, cancel) are POSTs, need a CSRF token (forms) or a JSON body (API
  clients; browsers cannot send one cross-site without a preflight we never allow), and
  are refused in read-only mode.
"""

from __future__ import annotations

import base64
import hmac
import importlib.resources
import ipaddress
import json
import logging
import math
import re
import secrets
import time
import urllib.parse
from collections.abc import Awaitable, Callable
from typing import Any

import jinja2
import trio

from .. import __version__
from ..queue.reads import StoreReader, StoreReadError
from ..queue.store import STATES, parse_handle
from ..system.names import strip_atom_prefix
from ..system.values import format_duration
from . import charts
from .metrics import render_metrics
from .passwords import check_password

log = logging.getLogger("atomnode.console")

PAGE_SIZE = 50
PREVIEW_BYTES = 400  # of each payload read for a listing
PREVIEW_CHARS = 120  # shown
CSRF_COOKIE = "atomnode_csrf"
_STATIC_TYPES = {".css": "text/css; charset=utf-8", ".js": "text/javascript; charset=utf-8",
                 ".svg": "image/svg+xml"}
_PROXY_HEADERS = (b"forwarded", b"x-forwarded-for", b"x-real-ip")
#: Everything comes from the console itself: no CDN, no inline script or style.
_CSP = (b"default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
        b"frame-ancestors 'none'; form-action 'self'")
_PREFIX = re.compile(r"(/[A-Za-z0-9._~-]+)*")
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
RANGES = {"24h": (86400.0, 300.0), "7d": (7 * 86400.0, 3600.0)}


class HTTPError(Exception):
    def __init__(self, status: int, message: str, headers: list[tuple[bytes, bytes]] = ()):
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = list(headers)


# --------------------------------------------------------------------------- requests


class Request:
    """What a handler needs of one HTTP request."""

    def __init__(self, scope: dict, body: bytes):
        self.scope = scope
        self.method: str = scope["method"]
        self.path: str = scope["path"]
        self.query = urllib.parse.parse_qs(scope.get("query_string", b"").decode("latin-1"))
        self.headers: dict[bytes, bytes] = {}
        for k, v in scope.get("headers", []):
            k = k.lower()
            self.headers[k] = self.headers[k] + b", " + v if k in self.headers else v
        self.body = body
        self.client: str = (scope.get("client") or ("", 0))[0] or ""
        self.user: str | None = None
        self.local = False
        self.set_cookies: list[bytes] = []
        self.csrf = ""
        # Behind a proxy under a path (nginx: location /atomnode/), links need the prefix.
        prefix = self.headers.get(b"x-forwarded-prefix", b"").decode("latin-1").rstrip("/")
        self.base = prefix if _PREFIX.fullmatch(prefix) else ""

    def arg(self, name: str, default: str = "") -> str:
        return self.query.get(name, [default])[0]

    def form(self) -> dict[str, str]:
        ctype = self.headers.get(b"content-type", b"").split(b";")[0].strip()
        if ctype == b"application/json":
            try:
                data = json.loads(self.body or b"{}")
            except ValueError:
                raise HTTPError(400, "the body is not valid JSON") from None
            if not isinstance(data, dict):
                raise HTTPError(400, "expected a JSON object")
            return data
        parsed = urllib.parse.parse_qs(self.body.decode("utf-8", "replace"))
        return {k: v[-1] if len(v) == 1 else v for k, v in parsed.items()}  # type: ignore

    @property
    def wants_json(self) -> bool:
        return self.path.startswith("/api/")

    @property
    def proxied(self) -> bool:
        return any(h in self.headers for h in _PROXY_HEADERS)


def _is_loopback(ip: str) -> bool:
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return False
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return addr.is_loopback


# --------------------------------------------------------------------------- formatting


def ago(ts: float | None, now: float | None = None) -> str:
    if not ts:
        return "-"
    return duration((now or time.time()) - ts) + " ago"


#: One formatter for durations everywhere (``2m 5s``, ``1d 2h``).
duration = format_duration


def when(ts: float | None) -> str:
    if not ts:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))


def short_when(ts: float | None) -> str:
    """Today's times as HH:MM:SS, others with their date."""
    if not ts:
        return "-"
    t = time.localtime(ts)
    if time.strftime("%Y-%m-%d", t) == time.strftime("%Y-%m-%d"):
        return time.strftime("%H:%M:%S", t)
    return time.strftime("%Y-%m-%d %H:%M", t)


def size(n: int | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)


def payload_view(data: bytes) -> dict[str, Any]:
    """How to show a payload: AtoM's JSON pretty-printed, other text as is, binary as size
    and a hex preview."""
    out: dict[str, Any] = {"size": len(data)}
    try:
        text = data.decode("utf-8")
        if _CONTROL.search(text):
            raise UnicodeDecodeError("utf-8", data, 0, 1, "control characters")
    except UnicodeDecodeError:
        out["kind"] = "binary"
        head = data[:64]
        out["hex"] = " ".join(f"{b:02x}" for b in head) + (" ..." if len(data) > 64 else "")
        return out
    try:
        doc = json.loads(text)
    except ValueError:
        out["kind"] = "text"
        out["text"] = text
        return out
    out["kind"] = "json"
    out["json"] = doc
    out["text"] = json.dumps(doc, indent=2, ensure_ascii=False, sort_keys=True)
    return out


def payload_preview(head: bytes, size: int) -> str:
    """One line for a listing: AtoM's JSON compacted, text as is, binary as hex; cut."""
    if size > len(head):  # cut mid-payload: JSON will not parse, show it as text
        try:
            text = head.decode("utf-8", "ignore")
        except UnicodeDecodeError:  # pragma: no cover - "ignore" never raises
            text = ""
        if text and not _CONTROL.search(text):
            return " ".join(text.split())[:PREVIEW_CHARS] + " …"
        return " ".join(f"{b:02x}" for b in head[:24]) + " …"
    view = payload_view(head)
    if view["kind"] == "json":
        text = json.dumps(view["json"], ensure_ascii=False, separators=(", ", ": "))
    elif view["kind"] == "text":
        text = " ".join(view["text"].split())
    else:
        return " ".join(f"{b:02x}" for b in head[:24]) + (" …" if size > 24 else "")
    return text if len(text) <= PREVIEW_CHARS else text[:PREVIEW_CHARS] + " …"


def job_dict(record: dict[str, Any], *, with_data: bool = False) -> dict[str, Any]:
    """A job record of the store's read API as the console shows it: plus the AtoM class
    name, and (``with_data``) the payload as :func:`payload_view` describes it."""
    d = {k: v for k, v in record.items() if k not in ("data", "data_base64", "preview")}
    d["job_class"] = strip_atom_prefix(record["function"])
    if with_data:
        if record.get("data") is not None:
            raw = record["data"].encode("utf-8")
        else:
            raw = base64.b64decode(record.get("data_base64") or "")
        d["payload"] = payload_view(raw)
    return d


# --------------------------------------------------------------------------- the app


Handler = Callable[..., Awaitable[Any]]


class ConsoleApp:
    """The ASGI application. ``daemon`` is the running :class:`atomnode.daemon.Daemon`."""

    def __init__(self, daemon: Any):
        self.daemon = daemon
        self.env = jinja2.Environment(
            loader=jinja2.PackageLoader("atomnode.console", "templates"),
            autoescape=True, trim_blocks=True, lstrip_blocks=True,
        )
        self.env.filters.update(ago=ago, duration=duration, when=when, size=size,
                                 short_when=short_when,
                                 class_name=strip_atom_prefix)
        self.env.globals["version"] = __version__
        self.routes: list[tuple[str, re.Pattern[str], Handler]] = []
        for method, pattern, handler in [
            ("GET", r"/", self.page_overview),
            ("GET", r"/workers", self.page_workers),
            ("GET", r"/failed", self.page_failed),
            ("GET", r"/history", self.page_history),
            ("GET", r"/jobs/(?P<handle>[^/]+)", self.page_job),
            ("GET", r"/charts", self.page_charts),
            ("GET", r"/confirm", self.page_confirm),
            ("POST", r"/actions", self.form_action),
            ("GET", r"/metrics", self.metrics),
            ("GET", r"/static/(?P<name>[a-z0-9_.-]+)", self.static),
            ("GET", r"/api/status", self.api_status),
            ("GET", r"/api/workers", self.api_workers),
            ("GET", r"/api/failed", self.api_failed),
            ("GET", r"/api/history", self.api_history),
            ("GET", r"/api/jobs/(?P<handle>[^/]+)", self.api_job),
            ("GET", r"/api/charts", self.api_charts),
            ("POST", r"/api/jobs/(?P<verb>retry|cancel)", self.api_change),
            ("POST", r"/api/functions/(?P<verb>retry|cancel)-all", self.api_change_all),
        ]:
            self.routes.append((method, re.compile(pattern + r"\Z"), handler))

    # -------------------------------------------------------------- ASGI entry
    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] == "lifespan":
            while True:
                msg = await receive()
                if msg["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif msg["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        body = b""
        while True:
            msg = await receive()
            body += msg.get("body", b"")
            if len(body) > 1024 * 1024:
                await self._send(send, 413, b"request too large", "text/plain")
                return
            if not msg.get("more_body"):
                break
        req = Request(scope, body)
        try:
            status, content, ctype, headers = await self.dispatch(req)
        except HTTPError as e:
            status, headers = e.status, e.headers
            if req.wants_json:
                content, ctype = json.dumps({"error": e.message}).encode(), "application/json"
            else:
                content = self.render("error.html", req, status=e.status, message=e.message)
                ctype = "text/html; charset=utf-8"
        except Exception:
            log.exception("console: %s %s failed", req.method, req.path)
            status, content, ctype, headers = 500, b"internal error (see the log)", \
                "text/plain", []
        for c in req.set_cookies:
            headers.append((b"set-cookie", c))
        await self._send(send, status, content, ctype, headers)

    @staticmethod
    async def _send(send: Callable, status: int, content: bytes, ctype: str,
                    headers: list[tuple[bytes, bytes]] = ()) -> None:
        hdrs = [
            (b"content-type", ctype.encode()),
            (b"content-length", str(len(content)).encode()),
            (b"cache-control", b"no-store"),
            (b"x-content-type-options", b"nosniff"),
            (b"x-frame-options", b"DENY"),
            (b"referrer-policy", b"same-origin"),
            (b"content-security-policy", _CSP),
            *headers,
        ]
        await send({"type": "http.response.start", "status": status, "headers": hdrs})
        await send({"type": "http.response.body", "body": content})

    async def dispatch(self, req: Request) -> tuple[int, bytes, str, list]:
        self.authenticate(req)
        allowed_methods = set()
        for method, pattern, handler in self.routes:
            m = pattern.match(req.path)
            if m is None:
                continue
            allowed_methods.add(method)
            if method != req.method and not (method == "GET" and req.method == "HEAD"):
                continue
            if method == "POST":
                self.check_change_allowed(req)
            result = await handler(req, **m.groupdict())
            if isinstance(result, tuple):
                return result
            if isinstance(result, (dict, list)):
                return 200, json.dumps(result, default=str).encode(), "application/json", []
            return 200, result, "text/html; charset=utf-8", []
        if allowed_methods:
            raise HTTPError(405, f"{req.method} is not allowed here",
                            [(b"allow", ", ".join(sorted(allowed_methods)).encode())])
        raise HTTPError(404, f"no page {req.path}")

    # -------------------------------------------------------------- security
    def authenticate(self, req: Request) -> None:
        """Decide who the request is from; raise 401/403 when it may not see anything."""
        cfg = self.daemon.cfg
        allow = getattr(self.daemon, "peer_allowed", None)
        if allow is not None and not allow(req.client):
            raise HTTPError(403, f"{req.client} is not in the allow list of this atomnode")
        req.local = _is_loopback(req.client) and not req.proxied
        auth = req.headers.get(b"authorization", b"")
        if cfg.http_password_hash and auth[:6].lower() == b"basic ":
            try:
                user, _, password = base64.b64decode(auth[6:].strip()).decode().partition(":")
            except (ValueError, UnicodeDecodeError):
                user = password = ""
            if user == cfg.http_user and check_password(password, cfg.http_password_hash):
                req.user = user
            else:
                raise HTTPError(401, "wrong user name or password",
                                [(b"www-authenticate", b'Basic realm="atomnode"')])
        if req.local or req.user:
            return
        if not cfg.http_password_hash:
            raise HTTPError(403, "this console answers only requests made on this machine: "
                            "configure http.user and http.password_hash to reach it from "
                            "elsewhere or through a proxy")
        raise HTTPError(401, "log in to see the atomnode console",
                        [(b"www-authenticate", b'Basic realm="atomnode"')])

    def check_change_allowed(self, req: Request) -> None:
        """Retry and cancel: not in read-only mode, same permission rule as the admin
        protocol, and a CSRF token unless the body is JSON."""
        if self.daemon.cfg.http_read_only:
            raise HTTPError(403, "the console is read-only (http.read_only)")
        may = getattr(self.daemon, "may_operate", None)
        if may is not None and not may(req.client):
            raise HTTPError(403, f"changes are accepted only from this machine or the "
                            f"operator networks, not from {req.client}")
        ctype = req.headers.get(b"content-type", b"").split(b";")[0].strip()
        if ctype == b"application/json":
            return
        cookie = self._cookie(req, CSRF_COOKIE)
        token = req.form().get("csrf", "")
        if not cookie or not isinstance(token, str) or not hmac.compare_digest(cookie, token):
            raise HTTPError(403, "the form has expired (CSRF token missing or wrong): "
                            "reload the page and try again")
        origin = req.headers.get(b"origin")
        host = req.headers.get(b"host")
        if origin and host and urllib.parse.urlsplit(origin.decode()).netloc != host.decode():
            raise HTTPError(403, "cross-site request refused")

    @staticmethod
    def _cookie(req: Request, name: str) -> str | None:
        raw = req.headers.get(b"cookie", b"").decode("latin-1")
        for part in raw.split(";"):
            k, _, v = part.strip().partition("=")
            if k == name:
                return v
        return None

    def csrf_token(self, req: Request) -> str:
        token = self._cookie(req, CSRF_COOKIE)
        if not token or not re.fullmatch(r"[A-Za-z0-9_-]{20,64}", token):
            token = secrets.token_urlsafe(24)
            req.set_cookies.append(
                f"{CSRF_COOKIE}={token}; Path=/; HttpOnly; SameSite=Strict".encode())
        return token

    # -------------------------------------------------------------- rendering
    def render(self, template: str, req: Request, **ctx: Any) -> bytes:
        cfg = self.daemon.cfg
        ctx.setdefault("read_only", cfg.http_read_only)
        ctx["csrf"] = self.csrf_token(req)
        ctx["path"] = req.path
        ctx["base"] = req.base
        ctx["now"] = time.time()
        ctx["fragment"] = req.arg("fragment") == "1"
        args = {k: v[-1] for k, v in req.query.items() if k not in ("fragment", "done")}
        ctx["args"] = args
        ctx["flash"] = req.arg("done")
        ctx["page_url"] = lambda n: "?" + urllib.parse.urlencode(dict(args, page=n))
        return self.env.get_template(template).render(**ctx).encode()

    # -------------------------------------------------------------- data
    def _db(self) -> str:
        return self.daemon.cfg.database

    def _hostname(self) -> str:
        return self.daemon.store.hostname

    async def status(self) -> dict[str, Any]:
        return self.daemon.status_document()

    def overview(self, doc: dict[str, Any]) -> list[dict[str, Any]]:
        """Per function: class name, site (when several sites share the daemon), queued,
        running, workers, failed. Functions with only failed jobs are listed too."""
        rows: dict[str, dict[str, Any]] = {}
        for f in doc.get("functions", []):
            rows[f["name"]] = dict(f, failed=0)
        for name, n in (doc.get("failed_by_function") or {}).items():
            cls = strip_atom_prefix(name)
            row = rows.setdefault(name, {
                "name": name, "job_class": cls, "site": name[: -len(cls) - 1] or None
                if cls != name else None, "queued": 0, "running": 0, "workers": 0,
                "max_queue": 0})
            row["failed"] = n
        out = sorted(rows.values(), key=lambda r: (r["job_class"], r.get("site") or ""))
        by_class: dict[str, int] = {}
        for r in out:
            by_class[r["job_class"]] = by_class.get(r["job_class"], 0) + 1
        for r in out:
            r["show_site"] = by_class[r["job_class"]] > 1 and bool(r.get("site"))
        return out

    def workers(self) -> dict[str, Any]:
        """Pools (with each worker's current job and since when), handlers, and worker
        connections that belong to no pool (remote workers, hand-started ones)."""
        d = self.daemon
        broker = d.broker
        doc = d.status_document()
        pools = doc.get("pools") or []
        for p in pools:
            for w in p.get("workers") or []:
                job = broker.jobs.get(w["job"].encode()) if w.get("job") else None
                w["job_function"] = None
                w["job_since"] = None
                if job is not None:
                    w["job_function"] = strip_atom_prefix(job.function.name.decode(
                        "utf-8", "replace"))
                    w["job_since"] = job.started_at
        owned = set()
        sup = d.supervisor
        others = []
        for conn in list(broker.conns.values()):
            if not conn.functions:
                continue
            if sup is not None and sup.worker_for_connection(conn.id) is not None:
                owned.add(conn.id)
                continue
            job = next(iter(conn.held.values()), None)
            others.append({
                "address": f"{conn.peer}:{conn.peer_port}" if conn.peer_port else conn.peer,
                "remote": conn.peer != "local" and not _is_loopback(conn.peer),
                "client_id": conn.client_id.decode("utf-8", "replace"),
                "functions": [strip_atom_prefix(f.name.decode("utf-8", "replace"))
                              for f in conn.functions],
                "job": job.handle.decode() if job else None,
                "job_since": job.started_at if job else None,
                "jobs_done": conn.jobs_done,
                "connected_at": conn.connected_at or None,
                "draining": conn.draining,
            })
        return {"pools": pools, "handlers": doc.get("handlers") or [], "connections": others,
                "remote_hosts": doc.get("remote_hosts") or []}

    async def _read(self, method: str, *args: Any, **kw: Any) -> Any:
        """Call a :class:`StoreReader` method in a worker thread (never on the trio thread
        that serves Gearman), on a read-only connection of its own."""
        path, host = self._db(), self._hostname()

        def run() -> Any:
            with StoreReader(path, hostname=host) as reader:
                return getattr(reader, method)(*args, **kw)

        try:
            return await trio.to_thread.run_sync(run)
        except StoreReadError as e:
            raise HTTPError(503, str(e)) from None

    def _filters(self, req: Request, *, state: str | None = None) -> dict[str, Any]:
        f: dict[str, Any] = {"function": req.arg("function") or None,
                             "state": state or req.arg("state") or None,
                             "search": req.arg("q") or None}
        if f["state"] and f["state"] not in STATES:
            raise HTTPError(400, f"unknown state {f['state']!r} (one of {', '.join(STATES)})")
        for key in ("since", "until"):
            text = req.arg(key)
            f[key] = _parse_time(text) if text else None
        try:
            f["page"] = max(int(req.arg("page") or 1), 1)
        except ValueError:
            raise HTTPError(400, "page must be a number") from None
        return f

    async def history(self, req: Request, *, state: str | None = None) -> dict[str, Any]:
        f = self._filters(req, state=state)
        found = await self._read(
            "search", state=f["state"], function=f["function"], since=f["since"],
            until=f["until"], text=f["search"], limit=PAGE_SIZE,
            offset=(f["page"] - 1) * PAGE_SIZE, preview=PREVIEW_BYTES)
        total = found["total"]
        out = []
        for rec in found["jobs"]:
            d = job_dict(rec)
            d["preview"] = payload_preview(rec["preview"], d["size"])
            out.append(d)
        return {
            "filters": {k: v for k, v in f.items() if k != "page"},
            "page": f["page"], "pages": max(math.ceil(total / PAGE_SIZE), 1), "total": total,
            "jobs": out,
        }

    async def job(self, handle: str) -> dict[str, Any]:
        try:
            job_id = parse_handle(handle)
        except ValueError as e:
            raise HTTPError(400, str(e)) from None
        row = await self._read("show", job_id)
        if row is None:
            raise HTTPError(404, f"no job {handle} (unknown, or pruned from the history)")
        d = job_dict(row, with_data=True)
        live = self.daemon.broker.jobs.get(d["handle"].encode())
        if live is not None:  # the store's row lags the broker by at most one batch
            d["state"] = "queued" if live.state in ("queued", "scheduled", "pending") \
                else live.state
        return d

    async def chart_data(self, rng: str) -> dict[str, Any]:
        if rng not in RANGES:
            raise HTTPError(400, f"range must be one of {', '.join(RANGES)}")
        span, step = RANGES[rng]
        now = time.time()
        rows = await self._read("samples", now - span, step)
        return {"range": rng, "from": now - span, "to": now, "step": step, "samples": rows}

    # -------------------------------------------------------------- pages
    async def page_overview(self, req: Request) -> bytes:
        doc = await self.status()
        return self.render("overview.html", req, doc=doc, functions=self.overview(doc))

    async def page_workers(self, req: Request) -> bytes:
        return self.render("workers.html", req, doc=await self.status(), **self.workers())

    async def page_failed(self, req: Request) -> bytes:
        data = await self.history(req, state="failed")
        doc = await self.status()
        return self.render("failed.html", req, doc=doc, data=data,
                           functions=[f for f in self.overview(doc) if f["failed"]])

    async def page_history(self, req: Request) -> bytes:
        data = await self.history(req)
        doc = await self.status()
        return self.render("history.html", req, doc=doc, data=data, states=STATES,
                           functions=self.overview(doc))

    async def page_job(self, req: Request, handle: str) -> bytes:
        handle = urllib.parse.unquote(handle)
        return self.render("job.html", req, doc=await self.status(), job=await self.job(handle))

    async def page_charts(self, req: Request) -> bytes:
        rng = req.arg("range") or "24h"
        data = await self.chart_data(rng)
        return self.render("charts.html", req, doc=await self.status(), range=rng,
                           ranges=list(RANGES), charts=charts.build(data))

    async def page_confirm(self, req: Request) -> bytes:
        verb, function = req.arg("action"), req.arg("function")
        if verb not in ("retry", "cancel") or not function:
            raise HTTPError(400, "nothing to confirm")
        ids = await self._read("failed_ids", function)
        return self.render("confirm.html", req, doc=await self.status(), verb=verb,
                           function=function, count=len(ids))

    async def form_action(self, req: Request) -> tuple[int, bytes, str, list]:
        """The pages' buttons: retry/cancel one job, or all failed jobs of a function;
        then back to the page they came from, with the outcome."""
        form = req.form()
        verb = form.get("action", "")
        if verb in ("retry", "cancel"):
            results = await self.daemon.change_jobs(verb, [form.get("handle", "")])
        elif verb in ("retry-all", "cancel-all"):
            ids = await self._read("failed_ids", form.get("function", ""))
            results = await self.daemon.change_jobs(
                verb.split("-")[0], [self.daemon.store.handle(i) for i in ids])
        else:
            raise HTTPError(400, f"unknown action {verb!r}")
        ok = sum(1 for r in results if r["ok"])
        if len(results) == 1:
            message = f"{results[0]['handle']}: {results[0]['message']}"
        else:
            message = f"{verb.split('-')[0]}: {ok} of {len(results)} jobs"
        nxt = form.get("next") or "/failed"
        if not isinstance(nxt, str) or not nxt.startswith("/") or nxt.startswith("//"):
            nxt = "/failed"
        sep = "&" if "?" in nxt else "?"
        location = req.base + nxt + sep + urllib.parse.urlencode({"done": message})
        return 303, b"", "text/plain", [(b"location", location.encode())]

    # -------------------------------------------------------------- API
    async def api_status(self, req: Request) -> dict:
        return await self.status()

    async def api_workers(self, req: Request) -> dict:
        return self.workers()

    async def api_failed(self, req: Request) -> dict:
        return await self.history(req, state="failed")

    async def api_history(self, req: Request) -> dict:
        return await self.history(req)

    async def api_job(self, req: Request, handle: str) -> dict:
        return await self.job(urllib.parse.unquote(handle))

    async def api_charts(self, req: Request) -> dict:
        return await self.chart_data(req.arg("range") or "24h")

    async def api_change(self, req: Request, verb: str) -> dict:
        form = req.form()
        handles = form.get("handles") or form.get("handle") or []
        if isinstance(handles, str):
            handles = [handles]
        if not isinstance(handles, list) or not all(isinstance(h, str) for h in handles):
            raise HTTPError(400, "expected {\"handles\": [\"H:host:1\", ...]}")
        return {"results": await self.daemon.change_jobs(verb, handles)}

    async def api_change_all(self, req: Request, verb: str) -> dict:
        function = req.form().get("function")
        if not isinstance(function, str) or not function:
            raise HTTPError(400, "expected {\"function\": \"...\"}")
        ids = await self._read("failed_ids", function)
        handles = [self.daemon.store.handle(i) for i in ids]
        return {"results": await self.daemon.change_jobs(verb, handles)}

    # -------------------------------------------------------------- others
    async def metrics(self, req: Request) -> tuple[int, bytes, str, list]:
        body, ctype = render_metrics(self.daemon)
        return 200, body, ctype, []

    async def static(self, req: Request, name: str) -> tuple[int, bytes, str, list]:
        ext = name[name.rfind("."):]
        if ext not in _STATIC_TYPES:
            raise HTTPError(404, f"no file {name}")
        try:
            data = importlib.resources.files("atomnode.console").joinpath(
                "static", name).read_bytes()
        except (FileNotFoundError, IsADirectoryError):
            raise HTTPError(404, f"no file {name}") from None
        return 200, data, _STATIC_TYPES[ext], []


def _parse_time(text: str) -> float:
    """``2026-12-01``, ``2026-12-01T14:30`` (local time), or ``2h``/``3d`` ago."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([mhd])\s*", text)
    if m:
        return time.time() - float(m.group(1)) * {"m": 60, "h": 3600, "d": 86400}[m.group(2)]
    for fmt in ("%Y-%m-%dT%H:%M", "%Y-%m-%d %H:%M", "%Y-%m-%dT%H:%M:%S", "%Y-%m-%d"):
        try:
            return time.mktime(time.strptime(text.strip(), fmt))
        except ValueError:
            continue
    raise HTTPError(400, f"{text!r}: expected a date (2026-12-01, 2026-12-01T14:30) or an "
                    "age (30m, 2h, 7d)")
