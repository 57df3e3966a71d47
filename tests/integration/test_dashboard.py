"""The dashboard of ``zerocf serve`` (``/`` and ``/api/dashboard``) in a real headless Chromium, on the real
Redis: the page loads without console errors and fetches nothing from outside the server, its generation
table and charts are drawn from the store's data (rows, bars and points counted and compared), the
applied-offsets rate follows offsets written while the page is open, and the two boxes give exactly what
``/recommend`` and ``/similar`` answer.

Needs Debian's ``chromium`` and ``chromium-driver`` and the ``selenium`` package (the ``dev`` extra); without
them the browser tests skip with the reason (``make test`` installs the browser when apt-get is usable).
"""

from __future__ import annotations

import json
import re
import shutil
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlencode

import numpy as np
import pytest

from tests.helpers import TS, http_get, serving_in_thread, wait_until
from workers.serving.dashboard import dashboard_page
from workers.serving.lookup import Recommender
from workers.serving.server import RecommendServer, make_server
from workers.store import FactorStore

MAX_K = 20
ITEMS = ["a", "b", "c", "d", "e", "f"]
SNAPSHOT = {0: 10, 1: 20, 2: 30}  # the ALS generation's snapshot offsets = its fence when published


def _browser() -> tuple[str, str]:
    """``(chromium, chromedriver)`` paths, or skip saying what is missing and how to get it."""
    pytest.importorskip("selenium", reason="selenium is not installed: pip install -e '.[dev]'")
    chromium = next((p for p in map(shutil.which, ("chromium", "chromium-browser")) if p), None)
    driver = shutil.which("chromedriver")
    if chromium is None or driver is None:
        missing = " and ".join(n for n, p in (("chromium", chromium), ("chromedriver", driver)) if p is None)
        pytest.skip(f"{missing} not found: apt-get install -y chromium chromium-driver (make test does it as root)")
    return chromium, driver


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    chromium, driver = _browser()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run"):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    drv = webdriver.Chrome(options=opts, service=Service(executable_path=driver))  # no driver download
    drv.set_page_load_timeout(30)
    try:
        yield drv
    finally:
        drv.quit()


@pytest.fixture()
def store(zerocf_env: dict[str, str]) -> FactorStore:
    return FactorStore.from_url(zerocf_env["ZEROCF_REDIS_URL"], zerocf_env["ZEROCF_TOPIC_PREFIX"])


@pytest.fixture()
def server(store: FactorStore) -> Iterator[RecommendServer]:
    with serving_in_thread(make_server(Recommender(store, refresh_s=0.0), "127.0.0.1", 0, max_k=MAX_K)) as srv:
        yield srv


def build(store: FactorStore) -> None:
    """An online generation 1 with applied offsets, then an ALS generation 2 published over it (1 retired)."""
    rng = np.random.default_rng(7)
    store.ensure_model(4)
    store.write_vectors(1, "item", ITEMS, rng.normal(size=(6, 5)).astype(np.float32))
    store.write_offsets(1, {0: 5, 1: 6}, {})
    g = store.begin_generation("als")
    store.write_vectors(g, "item", ITEMS, rng.normal(size=(6, 5)).astype(np.float32))
    store.write_vectors(g, "user", ["u1", "u2"], rng.normal(size=(2, 5)).astype(np.float32))
    store.write_counts(g, {"a": 9, "b": 7, "c": 4, "d": 1})
    store.write_popularity(g, {"d": 3.5, "c": 2.5, "a": 0.5}, ref_ms=TS)
    store.publish_generation(g, SNAPSHOT, {}, bias=-0.3, n_users=2, n_items=6, scale=1.5)
    assert store.generations() == [1, 2] and store.live_generation() == 2


def api(srv: RecommendServer, path: str) -> dict[str, Any]:
    code, _, body = http_get(srv, path)
    assert code == 200, body
    doc: dict[str, Any] = json.loads(body)
    return doc


def severe(drv: Any) -> list[dict[str, Any]]:
    return [e for e in drv.get_log("browser") if e["level"] == "SEVERE"]


def attr(drv: Any, css: str, name: str) -> list[str]:
    """The attribute of every match, read in one script (the page re-renders between WebDriver calls)."""
    js = "return [...document.querySelectorAll(arguments[0])].map(e => e.getAttribute(arguments[1]))"
    found: list[str] = drv.execute_script(js, css, name)
    return found


def text(drv: Any, element_id: str) -> str:
    found: str = drv.execute_script("return document.getElementById(arguments[0]).textContent", element_id)
    return found


def table(drv: Any, element_id: str) -> list[list[str]]:
    """Rows of a table body as [data-key, cell texts...], read in one script."""
    js = """return [...document.getElementById(arguments[0]).tBodies[0].rows]
              .map(r => [r.dataset.key, ...[...r.cells].map(c => c.textContent)])"""
    found: list[list[str]] = drv.execute_script(js, element_id)
    return found


def ask(drv: Any, box: str, key: str, k: int) -> tuple[list[str], str]:
    """Fill a lookup box, submit it, wait for its list; return the listed items and the info line."""
    from selenium.webdriver.common.by import By

    name = "user" if box == "rec" else "item"
    for field, value in ((f"{box}-{name}", key), (f"{box}-k", str(k))):
        drv.find_element(By.ID, field).clear()
        drv.find_element(By.ID, field).send_keys(value)
    drv.find_element(By.CSS_SELECTOR, f"#{box}-form button").click()
    query = urlencode({name: key, "k": k})
    wait_until(f"{box} box answered {query}", lambda: attr(drv, f"#{box}-result", "data-query") == [query], 10)
    assert attr(drv, f"#{box}-result", "data-state") == ["ok"]
    return attr(drv, f"#{box}-result li", "data-item"), drv.find_element(By.ID, f"{box}-info").text


def test_page_is_self_contained() -> None:
    html = dashboard_page().decode("utf-8")
    assert not re.search(r"(https?:)?//[a-z0-9.-]+\.[a-z]", html, re.I), "the page names an external URL"
    assert "<script src" not in html and '<link rel="stylesheet"' not in html


def test_dashboard_in_chromium(browser: Any, server: RecommendServer, store: FactorStore) -> None:
    build(store)
    base = f"http://127.0.0.1:{server.port}/"
    browser.get_log("browser")  # drop what an earlier test left
    browser.get(base + "#refresh=0.3")
    wait_until("dashboard rendered", lambda: attr(browser, "#status", "data-state") == ["ok"], 15)

    # the generation table: one row per generation the store holds, with its state, rows and calibration
    rows = table(browser, "generations")
    assert [int(r[0]) for r in rows] == store.generations() == [1, 2]
    for key, *cells in rows:
        gm = store.generation_meta(int(key))
        assert cells[1:3] == [gm.state, gm.source] and cells[6:8] == [str(gm.n_users), str(gm.n_items)]
        assert float(cells[8]) == pytest.approx(gm.scale) and float(cells[9]) == pytest.approx(gm.bias, abs=1e-3)
    assert [r[2] for r in rows] == ["retired", "complete"] and rows[1][1] == "2 (live)"
    assert text(browser, "live-gen") == "2"

    # bar charts: one bar per partition / item, in the store's order, with the store's values
    assert attr(browser, "#partitions-chart rect", "data-label") == [f"partition {p}" for p in SNAPSHOT]
    assert [int(v) for v in attr(browser, "#partitions-chart rect", "data-value")] == list(SNAPSHOT.values())
    top = store.top_items(2, 10)
    assert attr(browser, "#top-chart rect", "data-label") == [i for i, _ in top] == ["a", "b", "c", "d"]
    assert [float(v) for v in attr(browser, "#top-chart rect", "data-value")] == [c for _, c in top]
    assert attr(browser, "#trending-chart rect", "data-label") == [i for i, _ in store.popular_items(2, 10)]
    assert attr(browser, "#trending-chart rect", "data-label") == ["d", "c", "a"]

    # the applied-offsets rate follows the fence: 300 offsets more per partition while the page refreshes
    time.sleep(1.1)
    store.write_offsets(2, {p: o + 300 for p, o in SNAPSHOT.items()}, {})
    rates = lambda: [float(v) for v in attr(browser, "#rate-chart circle", "data-value")]  # noqa: E731
    wait_until("a positive rate point", lambda: any(r > 0 for r in rates()), 15)
    assert all(r >= 0 for r in rates())
    assert text(browser, "rate").endswith("offsets/s")
    total = str(sum(o + 301 for o in SNAPSHOT.values()))  # sum of (last applied offset + 1)
    wait_until("the new total", lambda: text(browser, "applied-total") == total, 5)
    assert "zerocf_lmf_lag" in text(browser, "lag-note")  # lag: said where it lives

    # the boxes answer exactly what the API answers (a known user, an unknown one: the fallback)
    for user in ("u1", "nobody"):
        shown, info = ask(browser, "rec", user, 3)
        answer = api(server, f"/recommend?user={user}&k=3")
        assert shown == [e["item"] for e in answer["items"]] and len(shown) == 3, user
        assert ("fallback" in info) == answer["fallback"] == (user == "nobody")
    shown, info = ask(browser, "sim", "a", 4)
    assert shown == [e["item"] for e in api(server, "/similar?item=a&k=4")["items"]] and len(shown) == 4
    assert "a" not in shown and "generation 2" in info

    # serve's own requests are listed, counted by its metrics
    wait_until("requests listed", lambda: "/similar" in [r[0] for r in table(browser, "requests")], 10)
    req = {r["path"]: r for r in api(server, "/api/dashboard")["requests"]}
    assert req["/recommend"]["requests"] >= 3 and req["/similar"]["requests"] >= 2 and req["/"]["requests"] >= 1

    # nothing went wrong in the page, nothing was fetched from elsewhere, and the console is really read
    assert severe(browser) == []
    urls = browser.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
    assert urls and all(u.startswith(base) for u in urls), urls
    browser.execute_script("console.error('zerocf-probe')")
    assert any("zerocf-probe" in e["message"] for e in severe(browser))


def test_dashboard_without_a_model_says_so(browser: Any, server: RecommendServer) -> None:
    code, _, body = http_get(server, "/api/dashboard")
    assert code == 503 and json.loads(body)["reason"] == "no_model"
    browser.get_log("browser")
    browser.get(f"http://127.0.0.1:{server.port}/")
    wait_until("error shown", lambda: attr(browser, "#status", "data-state") == ["error"], 15)
    assert "no zerocf model" in text(browser, "status") and "zerocf als --once" in text(browser, "status")
    # the only console entries are the browser's notes of the 503s themselves, no script error
    assert all("api/dashboard" in e["message"] and "503" in e["message"] for e in severe(browser))


def test_dashboard_api_validation_and_rate(server: RecommendServer, store: FactorStore) -> None:
    build(store)
    doc = api(server, "/api/dashboard?top=2")
    assert [e["item"] for e in doc["top_clicked"]] == ["a", "b"] and [e["item"] for e in doc["trending"]] == ["d", "c"]
    assert doc["applied"]["partitions"] == [{"partition": p, "offset": o} for p, o in SNAPSHOT.items()]
    assert doc["applied"]["rate_per_s"] is None and doc["model"]["live_generation"] == 2
    assert [g["live"] for g in doc["generations"]] == [False, True]
    time.sleep(1.05)
    store.write_offsets(2, {0: 1010}, {})
    rate = api(server, "/api/dashboard")["applied"]["rate_per_s"]
    assert 0 < rate <= 1000 / 1.05
    for query, fragment in (("top=0", "top='0'"), ("top=101", "1..100"), ("n=3", "unknown parameter 'n'; use top")):
        code, _, body = http_get(server, "/api/dashboard?" + query)
        assert code == 400 and fragment in json.loads(body)["error"], query
