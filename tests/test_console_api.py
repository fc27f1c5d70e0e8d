"""The web console's JSON API, pages, permissions and /metrics, against an in-process
daemon whose state each test sets up through the Gearman protocol."""

from __future__ import annotations

import base64
import io
import json
import re
from contextlib import redirect_stdout

import pytest
import trio
from console_harness import SITE, SITE2, arequest, console_daemon, gearman_port
from daemon_harness import Client, Worker
from prometheus_client.parser import text_string_to_metric_families

from atomnode.cli import main
from atomnode.console.app import payload_view
from atomnode.console.passwords import check_password, hash_password
from atomnode.gearman.protocol import T
from atomnode.system.config import ConfigError, load_config, parse_config

MOVE = f"{SITE}-arObjectMoveJob"
MOVE2 = f"{SITE2}-arObjectMoveJob"
AID = f"{SITE}-arFindingAidJob"


def _setup_state(port: int) -> dict:
    """3 + 2 queued move jobs on two sites, 2 finding-aid jobs failed by a worker, 1 done."""
    handles: dict = {"failed": []}
    with Client(port) as c:
        for i in range(3):
            c.submit_bg(MOVE.encode(), b"", json.dumps({"objectId": 100 + i}).encode())
        for _ in range(2):
            c.submit_bg(MOVE2.encode(), b"", b"{}")
        handles["failed"].append(c.submit_bg(AID.encode(), b"", b'{"objectId": 7}').decode())
        handles["failed"].append(c.submit_bg(AID.encode(), b"", bytes(range(100))).decode())
        handles["done"] = c.submit_bg(b"echo", b"", b"hello").decode()
    with Worker(port, AID.encode()) as w:
        for _ in range(2):
            p = w.grab()
            w.send(T.WORK_EXCEPTION, p.args[0], b"PHP Fatal error: out of memory")
        w.admin("status")  # a round trip: the failures are in the broker
    with Worker(port, b"echo") as w:
        p = w.grab()
        w.complete(p.args[0], b"HELLO")
        w.admin("status")
    return handles


async def _settle(daemon) -> None:
    """Wait until the writer has committed everything the broker handed it."""
    while daemon.store.pending:
        await trio.sleep(0.01)
    await daemon.refresh_failed_count()


async def test_status_api_counts_functions_by_class_and_site(tmp_path):
    async with console_daemon(tmp_path) as d:
        await trio.to_thread.run_sync(_setup_state, gearman_port(d))
        await _settle(d)
        doc = (await arequest(d, "GET", "/api/status")).json()
        by_name = {f["name"]: f for f in doc["functions"]}
        assert by_name[MOVE]["queued"] == 3 and by_name[MOVE]["job_class"] == "arObjectMoveJob"
        assert by_name[MOVE]["site"] == SITE and by_name[MOVE2]["queued"] == 2
        assert doc["queue"]["failed"] == 2 and doc["failed_by_function"] == {AID: 2}
        assert doc["queue"]["store_healthy"] is True and doc["queue"]["database_size"] > 0
        assert doc["queue"]["last_commit_ms"] is not None
        assert doc["stats"]["completed"] == 1 and doc["degraded"] is False

        # The overview names jobs as AtoM users know them; the site only where two share.
        page = (await arequest(d, "GET", "/")).text
        row = re.search(rf'<tr data-function="{MOVE}">(.*?)</tr>', page, re.DOTALL).group(1)
        assert "arObjectMoveJob" in row and "site 01234567" in row
        assert '<td class="num" data-col="queued">3</td>' in row
        aid_row = re.search(rf'<tr data-function="{AID}">(.*?)</tr>', page, re.DOTALL).group(1)
        assert "site" not in aid_row and ">2</a>" in aid_row  # failed count links to the list


async def test_status_json_cli_matches_api_field_for_field(tmp_path):
    async with console_daemon(tmp_path) as d:
        await trio.to_thread.run_sync(_setup_state, gearman_port(d))
        await _settle(d)
        api = (await arequest(d, "GET", "/api/status")).json()

        def cli() -> dict:
            out = io.StringIO()
            with redirect_stdout(out):
                rc = main(["status", "--json", "--host", "127.0.0.1",
                           "--port", str(gearman_port(d))])
            assert rc == 0
            return json.loads(out.getvalue())

        doc = await trio.to_thread.run_sync(cli)

        def shape(v):
            if isinstance(v, dict):
                return {k: shape(x) for k, x in v.items()}
            if isinstance(v, list):
                return [shape(x) for x in v]
            return type(v).__name__

        volatile = ("uptime",)
        assert shape({k: v for k, v in doc.items() if k not in volatile}) == \
            shape({k: v for k, v in api.items() if k not in volatile})
        for key in ("functions", "stats", "failed_by_function", "version", "pid", "listen"):
            assert doc[key] == api[key], key


async def test_failed_history_and_job_pages(tmp_path):
    async with console_daemon(tmp_path) as d:
        handles = await trio.to_thread.run_sync(_setup_state, gearman_port(d))
        await _settle(d)
        failed = (await arequest(d, "GET", "/api/failed")).json()
        assert failed["total"] == 2
        assert {j["handle"] for j in failed["jobs"]} == set(handles["failed"])
        j = failed["jobs"][0]
        assert j["reason"].startswith("WORK_EXCEPTION from worker: PHP Fatal error")
        assert j["attempts"] == 1 and j["job_class"] == "arFindingAidJob"
        previews = {x["handle"]: x["preview"] for x in failed["jobs"]}
        assert previews[handles["failed"][0]] == '{"objectId": 7}'
        assert previews[handles["failed"][1]].startswith("00 01 02")

        hist = (await arequest(d, "GET", "/api/history?state=done")).json()
        assert [x["handle"] for x in hist["jobs"]] == [handles["done"]]
        hist = (await arequest(d, "GET", f"/api/history?function={MOVE2}")).json()
        assert hist["total"] == 2 and {x["state"] for x in hist["jobs"]} == {"queued"}
        hist = (await arequest(d, "GET", "/api/history?q=objectId%22%3A%20101")).json()
        assert hist["total"] == 1
        assert (await arequest(d, "GET", "/api/history?since=1h")).json()["total"] == 8
        assert (await arequest(d, "GET", "/api/history?until=2000-01-01")).json()["total"] == 0
        bad = await arequest(d, "GET", "/api/history?state=lost")
        assert bad.status == 400 and "unknown state" in bad.json()["error"]

        json_job = (await arequest(d, "GET", f"/api/jobs/{handles['failed'][0]}")).json()
        assert json_job["payload"] == {"size": 15, "kind": "json", "json": {"objectId": 7},
                                       "text": '{\n  "objectId": 7\n}'}
        bin_job = (await arequest(d, "GET", f"/api/jobs/{handles['failed'][1]}")).json()
        assert bin_job["payload"]["kind"] == "binary" and bin_job["payload"]["size"] == 100
        assert bin_job["payload"]["hex"].startswith("00 01 02 03")
        page = (await arequest(d, "GET", f"/jobs/{handles['failed'][0]}")).text
        assert "&#34;objectId&#34;: 7" in page or "&quot;objectId&quot;: 7" in page
        missing = await arequest(d, "GET", "/api/jobs/H:x:999")
        assert missing.status == 404


async def test_retry_and_cancel_through_the_api(tmp_path):
    async with console_daemon(tmp_path) as d:
        handles = await trio.to_thread.run_sync(_setup_state, gearman_port(d))
        await _settle(d)
        first, second = handles["failed"]
        r = await arequest(d, "POST", "/api/jobs/retry", body={"handles": [first]})
        assert r.status == 200
        assert r.json()["results"] == [{"handle": first, "ok": True, "message": "queued again"}]
        assert d.broker.jobs[first.encode()].state == "queued"
        again = (await arequest(d, "POST", "/api/jobs/retry", body={"handles": [first]})).json()
        assert again["results"][0]["ok"] is False
        r = await arequest(d, "POST", "/api/jobs/cancel", body={"handles": [second]})
        assert r.json()["results"][0]["ok"] is True
        await _settle(d)
        job = (await arequest(d, "GET", f"/api/jobs/{second}")).json()
        assert job["state"] == "cancelled"
        # A queued job can be cancelled too; a done one cannot.
        r = await arequest(d, "POST", "/api/jobs/cancel", body={"handles": [first]})
        assert r.json()["results"][0]["ok"] is True and first.encode() not in d.broker.jobs
        r = await arequest(d, "POST", "/api/jobs/cancel", body={"handles": [handles["done"]]})
        assert r.json()["results"][0]["ok"] is False
        assert "only queued or failed" in r.json()["results"][0]["message"]
        r = await arequest(d, "POST", "/api/jobs/retry", body={"handles": ["nonsense"]})
        assert r.json()["results"][0]["ok"] is False


async def test_retry_all_of_a_function(tmp_path):
    async with console_daemon(tmp_path) as d:
        await trio.to_thread.run_sync(_setup_state, gearman_port(d))
        await _settle(d)
        r = await arequest(d, "POST", "/api/functions/retry-all", body={"function": AID})
        assert [x["ok"] for x in r.json()["results"]] == [True, True]
        assert d.broker.functions[AID.encode()].queued == 2
        # The page asks before acting: a confirmation page with the count, then a POST.
        page = (await arequest(d, "GET", f"/confirm?action=cancel&function={MOVE}")).text
        assert "no failed arObjectMoveJob jobs" in page


async def test_form_posts_need_the_csrf_token(tmp_path):
    async with console_daemon(tmp_path) as d:
        handles = await trio.to_thread.run_sync(_setup_state, gearman_port(d))
        await _settle(d)
        page = await arequest(d, "GET", "/failed")
        cookie = page.headers["set-cookie"].split(";")[0]
        token = cookie.split("=", 1)[1]
        assert f'name="csrf" value="{token}"' in page.text
        form = f"action=retry&handle={handles['failed'][0]}&next=/failed"
        hdrs = {"Content-Type": "application/x-www-form-urlencoded"}
        r = await arequest(d, "POST", "/actions", body=form.encode(), headers=hdrs)
        assert r.status == 403 and "CSRF" in r.text
        r = await arequest(d, "POST", "/actions", body=(form + "&csrf=wrong").encode(),
                           headers=dict(hdrs, Cookie=cookie))
        assert r.status == 403
        r = await arequest(d, "POST", "/actions", body=(form + f"&csrf={token}").encode(),
                           headers=dict(hdrs, Cookie=cookie, Origin="http://evil.example"))
        assert r.status == 403 and "cross-site" in r.text
        r = await arequest(d, "POST", "/actions", body=(form + f"&csrf={token}").encode(),
                           headers=dict(hdrs, Cookie=cookie))
        assert r.status == 303 and r.headers["location"].startswith("/failed?done=")
        assert d.broker.jobs[handles["failed"][0].encode()].state == "queued"
        r = await arequest(d, "GET", "/actions")
        assert r.status == 405


async def test_proxied_or_remote_requests_need_the_credential(tmp_path):
    async with console_daemon(tmp_path) as d:
        for hdr in ({"X-Forwarded-For": "203.0.113.9"}, {"Forwarded": "for=203.0.113.9"}):
            r = await arequest(d, "GET", "/api/status", headers=hdr)
            assert r.status == 403 and "http.password_hash" in r.json()["error"]
            assert (await arequest(d, "GET", "/metrics", headers=hdr)).status == 403
    pw_hash = hash_password("s3cret", n=2**10)
    async with console_daemon(tmp_path, http_user="archivist",
                              http_password_hash=pw_hash) as d:
        proxied = {"X-Forwarded-For": "203.0.113.9"}
        r = await arequest(d, "GET", "/", headers=proxied)
        assert r.status == 401 and r.headers["www-authenticate"].startswith("Basic")
        wrong = base64.b64encode(b"archivist:nope").decode()
        r = await arequest(d, "GET", "/", headers=dict(proxied, Authorization=f"Basic {wrong}"))
        assert r.status == 401
        good = base64.b64encode(b"archivist:s3cret").decode()
        r = await arequest(d, "GET", "/", headers=dict(proxied, Authorization=f"Basic {good}"))
        assert r.status == 200 and "Overview" in r.text
        assert (await arequest(d, "GET", "/")).status == 200  # loopback, not proxied
        # nginx under a path prefix: every link, form and script carries it.
        r = await arequest(d, "GET", "/failed", headers=dict(
            proxied, Authorization=f"Basic {good}", **{"X-Forwarded-Prefix": "/atomnode"}))
        links = re.findall(r'(?:href|src|action)="(/[^"]*)"', r.text)
        assert links and all(x.startswith("/atomnode/") for x in links)


async def test_read_only_mode_hides_and_refuses_changes(tmp_path):
    async with console_daemon(tmp_path, http_read_only=True) as d:
        handles = await trio.to_thread.run_sync(_setup_state, gearman_port(d))
        await _settle(d)
        page = (await arequest(d, "GET", "/failed")).text
        assert handles["failed"][0] in page and "Retry" not in page and "<form method=\"post\"" \
            not in page
        r = await arequest(d, "POST", "/api/jobs/retry", body={"handles": handles["failed"]})
        assert r.status == 403 and "read-only" in r.json()["error"]


async def test_metrics_parse_with_prometheus_client(tmp_path):
    async with console_daemon(tmp_path) as d:
        await trio.to_thread.run_sync(_setup_state, gearman_port(d))
        await _settle(d)
        r = await arequest(d, "GET", "/metrics")
        assert r.status == 200 and r.headers["content-type"].startswith("text/plain")
        families = {f.name: f for f in text_string_to_metric_families(r.text)}

        def value(family: str, sample: str, **labels: str) -> float:
            for s in families[family].samples:
                if s.name == sample and all(s.labels.get(k) == v for k, v in labels.items()):
                    return s.value
            raise AssertionError(f"no {sample} {labels}")

        assert value("atomnode_jobs_submitted", "atomnode_jobs_submitted_total",
                     function=MOVE, job_class="arObjectMoveJob") == 3
        assert value("atomnode_jobs_failed", "atomnode_jobs_failed_total", function=AID) == 2
        assert value("atomnode_jobs_completed", "atomnode_jobs_completed_total",
                     function="echo") == 1
        assert value("atomnode_jobs_queued", "atomnode_jobs_queued", function=MOVE2) == 2
        assert value("atomnode_job_queue_wait_seconds", "atomnode_job_queue_wait_seconds_count",
                     function=AID) == 2
        assert value("atomnode_job_run_seconds", "atomnode_job_run_seconds_bucket",
                     function="echo", le="+Inf") == 1
        assert value("atomnode_store_commit_seconds", "atomnode_store_commit_seconds_count") > 0
        assert value("atomnode_connections", "atomnode_connections", kind="worker") == 0
        assert value("atomnode_store_healthy", "atomnode_store_healthy") == 1


async def test_chart_samples_are_stored_and_drawn(tmp_path):
    async with console_daemon(tmp_path) as d:
        await trio.to_thread.run_sync(_setup_state, gearman_port(d))
        rows = d.take_sample()
        by_fn = {r[1]: r for r in rows}
        assert by_fn[AID.encode()][3] == 2 and by_fn[MOVE.encode()][4] == 3  # failed, queued
        assert by_fn[b"echo"][2] == 1  # completed
        quiet = d.take_sample()  # nothing finished since: only the functions with a queue
        assert {r[1] for r in quiet} == {MOVE.encode(), MOVE2.encode()}
        assert all(r[2] == r[3] == 0 for r in quiet)
        await _settle(d)
        data = (await arequest(d, "GET", "/api/charts?range=24h")).json()
        assert {s["function"] for s in data["samples"]} >= {AID, MOVE, MOVE2, "echo"}
        page = (await arequest(d, "GET", "/charts?range=7d")).text
        assert page.count('class="chart"') == 4 and ("<polyline" in page or "<circle" in page)
        assert (await arequest(d, "GET", "/api/charts?range=1y")).status == 400


async def test_workers_api_lists_connections_not_in_a_pool(tmp_path):
    async with console_daemon(tmp_path) as d:
        port = gearman_port(d)

        def hold() -> None:
            with Client(port) as c:
                c.submit_bg(b"slow", b"", b"x")
            w = Worker(port, b"slow", client_id=b"remote-host-7")
            w.grab()
            w.admin("status")
            hold.worker = w  # type: ignore[attr-defined]

        await trio.to_thread.run_sync(hold)
        data = (await arequest(d, "GET", "/api/workers")).json()
        (conn,) = data["connections"]
        assert conn["client_id"] == "remote-host-7" and conn["functions"] == ["slow"]
        assert conn["job"].startswith("H:") and conn["job_since"] and conn["remote"] is False
        hold.worker.close()  # type: ignore[attr-defined]


def test_payload_view():
    assert payload_view(b'{"a": [1, 2]}')["kind"] == "json"
    assert payload_view("café".encode())["text"] == "café"
    v = payload_view(bytes(range(256)))
    assert v["kind"] == "binary" and v["size"] == 256 and v["hex"].endswith("3f ...")


def test_password_hashes():
    h = hash_password("pw", n=2**10)
    assert h.startswith("scrypt$") and check_password("pw", h) and not check_password("x", h)
    assert not check_password("pw", "scrypt$garbage")


def test_console_password_command(capsys, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO("correct horse\n"))
    assert main(["console-password", "--stdin"]) == 0
    h = capsys.readouterr().out.strip()
    assert check_password("correct horse", h) and parse_config(
        f"http: {{listen: '0.0.0.0:4731', user: a, password_hash: '{h}'}}\n")
    monkeypatch.setattr("sys.stdin", io.StringIO("short\n"))
    assert main(["console-password", "--stdin"]) == 1


def test_http_config(tmp_path):
    assert parse_config("http: {listen: none}\n").http_listen is None
    assert parse_config("http: {listen: '127.0.0.1:8080'}\n").http_listen == "127.0.0.1:8080"
    with pytest.raises(ConfigError, match="not a loopback address"):
        parse_config("http: {listen: '0.0.0.0:4731'}\n")
    with pytest.raises(ConfigError, match="not a plain password"):
        parse_config("http: {listen: '0.0.0.0:4731', user: a, password_hash: hunter2}\n")
    with pytest.raises(ConfigError, match="both user and password_hash"):
        parse_config("http: {user: a}\n")
    h = hash_password("pw", n=2**10)
    cfg = parse_config(f"http: {{listen: '0.0.0.0:4731', user: a, password_hash: '{h}'}}\n")
    assert cfg.http_listen == "0.0.0.0:4731"
    assert load_config(None, overrides={"http_listen": "none"}).http_listen is None
    with pytest.raises(ConfigError, match="--http"):
        load_config(None, overrides={"http_listen": "192.0.2.1:4731"})


async def test_workers_page_lists_worker_hosts_pools(tmp_path):
    """A worker host's report (atomnode-host report) shows on the central console."""
    async with console_daemon(tmp_path) as d:
        port = gearman_port(d)
        report = {"host": "work1", "pools": [{"name": "atom", "count": 1, "workers": [
            {"pid": 4242, "state": "busy", "job": "H:x:9", "jobs_done": 12, "uptime": 30,
             "detail": ""}]}]}

        def send() -> bytes:
            with Client(port) as c:
                return c.admin("atomnode-host report " + json.dumps(report))

        assert await trio.to_thread.run_sync(send) == b"OK\r\n"
        data = (await arequest(d, "GET", "/api/workers")).json()
        (host,) = data["remote_hosts"]
        assert host["host"] == "work1" and host["pools"][0]["workers"][0]["pid"] == 4242
        page = (await arequest(d, "GET", "/workers")).text
        assert "Worker host work1" in page and "4242" in page and "H:x:9" in page


async def _asgi_get(app, path: str, client: str, headers: list | None = None, *,
                    method: str = "GET", body: bytes = b"") -> tuple:
    """One request straight into the ASGI app, as if from ``client`` (no sockets: the
    address a non-loopback peer would have)."""
    sent: list[dict] = []

    async def receive() -> dict:
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(msg: dict) -> None:
        sent.append(msg)

    scope = {"type": "http", "method": method, "path": path, "query_string": b"",
             "headers": headers or [], "client": (client, 40000)}
    await app(scope, receive, send)
    return sent[0]["status"], b"".join(m.get("body", b"") for m in sent[1:])


async def test_remote_peers_obey_allow_list_and_credential(tmp_path):
    from atomnode.console.app import ConsoleApp

    pw_hash = hash_password("s3cret", n=2**10)
    async with console_daemon(tmp_path, allow=("192.0.2.0/24",), http_user="archivist",
                              http_password_hash=pw_hash) as d:
        app = ConsoleApp(d)
        status, body = await _asgi_get(app, "/api/status", "198.51.100.4")
        assert status == 403 and b"allow list" in body  # not in allow: refused outright
        status, _ = await _asgi_get(app, "/api/status", "192.0.2.10")
        assert status == 401  # allowed network, but remote: log in
        good = b"Basic " + base64.b64encode(b"archivist:s3cret")
        status, body = await _asgi_get(app, "/api/status", "192.0.2.10",
                                       [(b"authorization", good)])
        assert status == 200 and json.loads(body)["functions"] == []
        # Changes follow the admin protocol's rule: this machine, or operator networks.
        status, body = await _asgi_get(
            app, "/api/jobs/retry", "192.0.2.10",
            [(b"authorization", good), (b"content-type", b"application/json")],
            method="POST", body=b'{"handles": ["H:x:1"]}')
        assert status == 403 and b"operator networks" in body
        assert d.may_operate("127.0.0.1") and not d.may_operate("192.0.2.10")
    # operator_networks widens the console's rule exactly as it widens the admin protocol's.
    async with console_daemon(tmp_path, allow=("192.0.2.0/24",), http_user="archivist",
                              http_password_hash=pw_hash,
                              operator_networks=("192.0.2.0/28",)) as d:
        assert d.may_operate("192.0.2.10") and not d.may_operate("192.0.2.100")
        status, body = await _asgi_get(
            ConsoleApp(d), "/api/jobs/retry", "192.0.2.10",
            [(b"authorization", good), (b"content-type", b"application/json")],
            method="POST", body=b'{"handles": ["H:x:1"]}')
        assert status != 403, body
    async with console_daemon(tmp_path, allow=("192.0.2.0/24",)) as d:
        status, body = await _asgi_get(ConsoleApp(d), "/", "192.0.2.10")
        assert status == 403 and b"only requests made on this machine" in body
