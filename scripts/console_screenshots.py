"""Regenerate the console screenshots in docs/images/ (overview, failed jobs).

Starts an in-process atomnode with a few AtoM-like jobs on two sites (some queued, some
failed by a worker, some done), then takes the pages with Debian's headless Chromium.
Run from the repository root: .venv/bin/python scripts/console_screenshots.py
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import trio

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from console_harness import SITE, SITE2, console_daemon, gearman_port, http_port  # noqa: E402
from daemon_harness import Client, Worker  # noqa: E402

from atomnode.gearman.protocol import T  # noqa: E402


def populate(port: int) -> None:
    with Client(port) as c:
        for i in range(4):
            c.submit_bg(f"{SITE}-arObjectMoveJob".encode(), b"",
                        json.dumps({"objectId": 4100 + i, "parentId": 1}).encode())
        c.submit_bg(f"{SITE2}-arObjectMoveJob".encode(), b"", b'{"objectId": 77}')
        for i in range(3):
            c.submit_bg(f"{SITE}-arUpdateEsIoDocumentsJob".encode(), b"",
                        json.dumps({"ioIds": [i, i + 1]}).encode())
        c.submit_bg(f"{SITE}-arFindingAidJob".encode(), b"",
                    json.dumps({"objectId": 2210, "format": "pdf"}).encode())
        c.submit_bg(f"{SITE}-arFindingAidJob".encode(), b"",
                    json.dumps({"objectId": 2211, "format": "rtf"}).encode())
        c.submit_bg(f"{SITE}-arFileImportJob".encode(), b"",
                    json.dumps({"file": "accessions-2026.csv", "importType": "csv"}).encode())
        for i in range(5):
            c.submit_bg(f"{SITE}-arGenerateReportJob".encode(), b"", b'{"format": "csv"}')
    with Worker(port, f"{SITE}-arFindingAidJob".encode(), client_id=b"pid_31337_a1") as w:
        for reason in (b"Apache FOP: java.lang.OutOfMemoryError: Java heap space",
                       b"SQLSTATE[HY000] [2002] Connection refused"):
            p = w.grab()
            w.send(T.WORK_EXCEPTION, p.args[0], reason)
        w.admin("status")
    with Worker(port, f"{SITE}-arFileImportJob".encode(), client_id=b"pid_31338_b2") as w:
        p = w.grab()
        w.send(T.WORK_FAIL, p.args[0])
        w.admin("status")
    with Worker(port, f"{SITE}-arGenerateReportJob".encode(), client_id=b"pid_31339_c3") as w:
        for _ in range(5):
            p = w.grab()
            w.complete(p.args[0], b"ok")
        w.admin("status")


def shoot(base: str, out: Path) -> None:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = "/usr/bin/chromium"
    for arg in ("--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                "--disable-background-networking", "--disable-component-update",
                "--disable-sync", "--no-first-run", "--force-device-scale-factor=1",
                f"--user-data-dir={tempfile.mkdtemp()}"):
        opts.add_argument(arg)
    drv = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=opts)
    try:
        for name, path in (("console-overview", "/"), ("console-failed", "/failed")):
            drv.set_window_size(900, 600)
            drv.get(base + path)
            height = drv.execute_script("return document.documentElement.scrollHeight")
            drv.set_window_size(900, min(height, 1400))
            drv.save_screenshot(str(out / f"{name}.png"))
            print(out / f"{name}.png")
    finally:
        drv.quit()


async def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        async with console_daemon(Path(tmp)) as d:
            await trio.to_thread.run_sync(populate, gearman_port(d))
            while d.store.pending:
                await trio.sleep(0.01)
            await d.refresh_failed_count()
            await trio.to_thread.run_sync(
                shoot, f"http://127.0.0.1:{http_port(d)}", ROOT / "docs" / "images")


if __name__ == "__main__":
    trio.run(main)
