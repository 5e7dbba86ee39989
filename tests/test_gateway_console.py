"""The admin console in headless Chromium against a running emulated cluster: log in,
see the actors and the queue figures, drain an actor from the page and see it take
effect (at the broker too), undrain it; a screenshot is saved in the test's temp dir.

Skips, saying why, where no Chromium and chromedriver are installed (scripts/test.sh
installs Debian's `chromium` and `chromium-driver` where it can).
"""

from __future__ import annotations

import shutil
import threading
import time

import pytest
from gateway_helpers import Gateway, request, write_keys  # tests/ is on sys.path

from clients import Client
from clients.local import LocalCluster, LocalClusterSpec

WORKFLOW = "flux-schnell-txt2img"


def _browser():
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.skip("selenium is not installed (pip install -e .[dev])")
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not chromium or not driver:
        pytest.skip("no headless browser: install Debian's chromium and chromium-driver (scripts/test.sh does, as root)")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1500,1800"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(driver), options=options)


def _rows(browser, panel: str) -> list[list[str]]:
    """The cells' text of a panel's table, read in one script call: the page re-renders
    its tables every refresh, so elements found one by one would go stale."""
    return browser.execute_script(
        "return [...document.querySelectorAll(arguments[0])].map(r => [r.dataset.actor || '',"
        " ...[...r.cells].map(c => c.textContent)])", f"#{panel} tbody tr")


def _text(browser, element_id: str) -> str:
    return browser.execute_script("const e = document.getElementById(arguments[0]); return e ? e.textContent : ''",
                                  element_id)


def _click(browser, selector: str) -> None:
    """Click what the selector finds now (again if a refresh replaced it meanwhile)."""
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By

    for _ in range(10):
        try:
            browser.find_element(By.CSS_SELECTOR, selector).click()
            return
        except StaleElementReferenceException:
            time.sleep(0.05)
    raise AssertionError(f"{selector} kept going stale")


def _wait(what: str, check, timeout_s: float = 20.0):
    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


@pytest.mark.cluster
@pytest.mark.timeout(240)
def test_the_console_shows_the_cluster_and_drains_an_actor(tmp_path):
    from selenium.webdriver.common.by import By

    browser = _browser()
    spec = LocalClusterSpec(workflows=[WORKFLOW], replicas={"Flux1Schnell": 2}, options={"time_scale": 0.1},
                            run_dir=str(tmp_path / "run"), log_level="warning")
    keys = write_keys(tmp_path / "keys.txt")
    stop_load = threading.Event()
    try:
        with LocalCluster(spec) as cluster, Client(cluster.frontend) as client:
            gateway = Gateway(cluster.frontend, tmp_path / "keys.txt", tmp_path / "gateway.log")

            def load():  # a steady trickle of requests, so that queues and throughput move
                while not stop_load.is_set():
                    jobs = [client.submit(WORKFLOW, prompt="load", steps=8, progress=False) for _ in range(3)]
                    for job in jobs:
                        job.result(timeout=60)

            loader = threading.Thread(target=load, daemon=True)
            loader.start()
            try:
                actors = {a.actor_id: a.model for a in client.stats().actors}
                browser.get(f"{gateway.url}/admin")
                assert browser.current_url.endswith("/admin/login")  # no session yet
                browser.find_element(By.ID, "key").send_keys(keys["alice"])
                browser.find_element(By.ID, "login").click()
                _wait("the refusal of a user key", lambda: "not an admin key" in _text(browser, "login-error"))
                browser.find_element(By.ID, "key").send_keys(keys["ops"])
                browser.find_element(By.ID, "login").click()
                _wait("the actors table", lambda: _rows(browser, "actors"))
                rows = {row[0]: row for row in _rows(browser, "actors")}
                assert set(rows) == set(actors)
                for actor_id, model in actors.items():
                    assert rows[actor_id][1:3] == [actor_id, model]

                def model_row(model: str) -> list[str]:
                    return next((row[1:] for row in _rows(browser, "models") if row[1] == model), [])

                # model, actors, target, min, max, queue depth, ready s, pending s, ..., tasks done
                flux = _wait("Flux1Schnell tasks done in the models table",
                             lambda: (lambda c: c if c and int(c[12]) > 0 else None)(model_row("Flux1Schnell")))
                assert flux[1] == "2" and flux[5].isdigit()
                for model in set(actors.values()):
                    assert model_row(model), f"{model} missing from the models table"
                cards = _text(browser, "summary")
                assert "queued tasks" in cards and "pending device-s" in cards
                _wait("a workflow row", lambda: any(row[1] == WORKFLOW for row in _rows(browser, "workflows")))

                def state(actor_id: str) -> str:  # the actor's state column, as the page shows it
                    return next((row[5] for row in _rows(browser, "actors") if row[0] == actor_id), "")

                victim = sorted(a for a, m in actors.items() if m == "Flux1Schnell")[0]
                row = f'#actors tr[data-actor="{victim}"]'
                _click(browser, f'{row} button[data-action="drain"]')
                _wait("the drained row", lambda: state(victim) == "draining")
                assert next(a for a in client.stats().actors if a.actor_id == victim).state == "draining"
                assert browser.find_elements(By.CSS_SELECTOR, f'{row} button[data-action="undrain"]')
                browser.save_screenshot(str(tmp_path / "console.png"))
                _click(browser, f'{row} button[data-action="undrain"]')
                _wait("the undrained actor", lambda: next(a for a in client.stats().actors
                                                          if a.actor_id == victim).state != "draining")
                _wait("the undrained row", lambda: state(victim) in ("idle", "busy"))
                # Hundreds of actors: one refresh's render of 500 of them (copies of the live ones).
                render_ms, rows_shown = browser.execute_script("""
                    const live = snapshot.stats.actors;
                    const many = Array.from({length: 500}, (_, i) => ({...live[i % live.length],
                                                                      actor_id: `copy-${i}`}));
                    const saved = snapshot;
                    snapshot = {...saved, stats: {...saved.stats, actors: many}};
                    const began = performance.now();
                    render();
                    const took = performance.now() - began;
                    const shown = document.querySelectorAll("#actors tbody tr").length;
                    snapshot = saved;
                    return [took, shown];""")
                assert rows_shown == 500 and render_ms < 1000, (rows_shown, render_ms)
                print(f"console render of 500 actors: {render_ms:.0f} ms")
                errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"
                          and "/admin/login - " not in e["message"]]  # the user key's 403 was meant
                assert errors == [], errors  # no script error, no blocked resource
                status, _, snapshot = request(gateway, "GET", "/admin/api/snapshot", key=keys["ops"])
                assert status == 200 and len(snapshot["history"]) >= 1
            finally:
                stop_load.set()
                loader.join(60)
                gateway.stop()
    finally:
        browser.quit()
    assert (tmp_path / "console.png").stat().st_size > 10_000
