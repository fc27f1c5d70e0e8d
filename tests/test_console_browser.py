"""The web console in a real browser: Debian's headless Chromium driven by Selenium through
Debian's chromedriver (named explicitly: nothing is downloaded), against an in-process
daemon with a pool of AtoM-like PHP workers.

Screenshots of every page are saved under the test's temporary directory.
"""

from __future__ import annotations

import json
from pathlib import Path

import trio
from console_harness import SITE, console_daemon, gearman_port, http_port
from daemon_harness import Client, Worker
from test_pools import WORKER_PHP

from atomnode.gearman.protocol import T

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
MOVE = f"{SITE}-arObjectMoveJob"
AID = f"{SITE}-arFindingAidJob"


def _driver(tmp_path: Path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    for path in (CHROMIUM, CHROMEDRIVER):
        assert Path(path).exists(), f"{path} missing: run `sh scripts/sysdeps.sh test`"
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    profile = tmp_path / "chromium-profile"
    profile.mkdir()
    for arg in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--disable-background-networking", "--disable-component-update",
                "--disable-sync", "--no-first-run", f"--user-data-dir={profile}",
                "--window-size=1100,900"):
        opts.add_argument(arg)
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)


def _fail_one_job(tmp_path: Path) -> str:
    """A finding-aid job that a worker failed, in the database before the pool exists."""
    from daemon_harness import Daemon as ProcessDaemon

    d = ProcessDaemon(tmp_path, db=tmp_path / "q.db").start()
    try:
        with Client(d.port) as c:
            handle = c.submit_bg(AID.encode(), b"", json.dumps({"objectId": 42}).encode())
        with Worker(d.port, AID.encode(), client_id=b"pid_1_yesterday") as w:
            p = w.grab()
            w.send(T.WORK_EXCEPTION, p.args[0], b"Elasticsearch unreachable")
            w.admin("status")
    finally:
        d.stop()
    return handle.decode()


async def test_console_in_chromium(tmp_path):
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    failed_handle = await trio.to_thread.run_sync(_fail_one_job, tmp_path)
    shots = tmp_path / "screenshots"
    shots.mkdir()
    pool = (
        "pools:\n"
        "  - name: atom\n"
        f"    command: {json.dumps(['php', str(WORKER_PHP), '--server', '{server}', '--function', AID])}\n"
        "    count: 1\n"
        "    stop_grace: 1\n"
    )
    from atomnode.system.config import parse_config

    pools = parse_config(pool).pools
    async with console_daemon(tmp_path, pools=pools) as d:
        gport, base = gearman_port(d), f"http://127.0.0.1:{http_port(d)}"

        def submit() -> None:
            with Client(gport) as c:
                for i in range(3):
                    c.submit_bg(MOVE.encode(), b"", json.dumps({"objectId": i}).encode())

        await trio.to_thread.run_sync(submit)
        # The PHP worker has connected (CAN_DO) and sleeps.
        await d.supervisor.wait_until(
            lambda: d.supervisor.snapshot()[0]["workers"][0]["state"] == "idle")
        pid = d.supervisor.snapshot()[0]["workers"][0]["pid"]

        def browse() -> None:
            drv = _driver(tmp_path)
            # The page swaps its main region every two seconds (live refresh): every
            # look-up is made afresh inside a wait, and a stale element is looked up again.
            wait = WebDriverWait(drv, 20, poll_frequency=0.1,
                                 ignored_exceptions=(StaleElementReferenceException,))

            def css(sel: str):
                return drv.find_element(By.CSS_SELECTOR, sel)

            def click(sel: str, xpath: str | None = None) -> bool:
                el = css(sel)
                (el.find_element(By.XPATH, xpath) if xpath else el).click()
                return True

            try:
                # Overview: the known function's queued count.
                drv.get(base + "/")
                row = f'tr[data-function="{MOVE}"]'
                wait.until(lambda _: css(row + " th").text.startswith("arObjectMoveJob"))
                wait.until(lambda _: css(row + ' [data-col="queued"]').text == "3")
                wait.until(lambda _: css('[data-field="queued"]').text == "3")
                drv.save_screenshot(str(shots / "overview.png"))

                # Workers: the pool worker's PID, reached by keyboard-followable links.
                drv.find_element(By.LINK_TEXT, "Workers").click()
                wait.until(lambda x: "Pool atom" in x.page_source)
                wait.until(lambda x: str(pid) in [
                    e.text for e in x.find_elements(By.CSS_SELECTOR, "td.pid")])
                drv.save_screenshot(str(shots / "workers.png"))

                # Failed jobs: retry with the button, then see the job run (done).
                drv.find_element(By.LINK_TEXT, "Failed jobs").click()
                row = f'tr[data-handle="{failed_handle}"]'
                wait.until(lambda _: "Elasticsearch unreachable" in css(row).text)
                drv.save_screenshot(str(shots / "failed.png"))
                wait.until(lambda _: click(row, ".//button[normalize-space()='Retry']"))
                wait.until(lambda _: "queued again" in css(".flash").text)
                drv.get(base + "/jobs/" + failed_handle)
                wait.until(lambda x: x.find_element(By.CSS_SELECTOR, ".state").text == "done")
                drv.save_screenshot(str(shots / "job.png"))

                drv.get(base + "/history")
                assert failed_handle in drv.page_source
                drv.save_screenshot(str(shots / "history.png"))
                drv.get(base + "/charts")
                assert len(drv.find_elements(By.CSS_SELECTOR, "svg.chart")) == 4
                drv.save_screenshot(str(shots / "charts.png"))

                # Phone width: the overview still shows the counts without a sideways page.
                drv.set_window_size(390, 844)
                drv.get(base + "/")
                width = drv.execute_script("return document.documentElement.scrollWidth")
                assert width <= 390
                drv.save_screenshot(str(shots / "overview-phone.png"))

                # A request that came through a proxy is remote: refused without a login.
                drv.execute_cdp_cmd("Network.enable", {})
                drv.execute_cdp_cmd("Network.setExtraHTTPHeaders",
                                    {"headers": {"X-Forwarded-For": "198.51.100.7"}})
                drv.get(base + "/")
                assert "403" in drv.title
                assert "only requests made on this machine" in drv.page_source
                assert "arObjectMoveJob" not in drv.page_source
            finally:
                drv.quit()

        await trio.to_thread.run_sync(browse)
        for name in ("overview", "workers", "failed", "job", "history", "charts"):
            assert (shots / f"{name}.png").stat().st_size > 1000
