"""The dashboard of ``zerocf serve`` (``/`` and ``/api/dashboard``) in a real headless Chromium, on the real
Redis: the page loads without console errors and fetches nothing from outside the server, its generation
table and charts are drawn from the store's data (rows, bars and points counted and compared), the
applied-offsets rate follows offsets written while the page is open, the two boxes give exactly what
``/recommend`` and ``/similar`` answer, and the live quality (HR@10 against popularity) of a real ``zerocf lmf``
appears when it ranks clicks (and the page says quality is off when no worker does).

Each browser test starts from ``about:blank`` with the console log drained (:func:`fresh_page`): the page of the
previous test keeps refreshing against a server that its fixture has shut down, and its refused fetches would
otherwise land in the next test's console log.

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

from stream import kafka_util
from stream.config import load
from stream.events import Event
from tests.helpers import TS, background, fresh_group, http_get, serving_in_thread, tail, wait_until
from workers.config import LMFConfig
from workers.online.quality import TTL_S, merge
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


def fresh_page(drv: Any) -> None:
    """Leave the previous test's page (its refresh timer stops) and drop what the console log holds."""
    drv.get("about:blank")
    drv.get_log("browser")


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
    fresh_page(browser)
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

    # no LMF worker ranks clicks: the quality section says it is off, with nothing drawn
    assert attr(browser, "#quality", "data-state") == ["off"]
    assert "live quality is off" in text(browser, "quality-note") and text(browser, "quality-clicks") == "0"
    assert attr(browser, "#quality-chart circle", "data-value") == [] and table(browser, "quality-workers") == []

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
    fresh_page(browser)
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
    assert doc["quality"]["workers"] == [] and doc["quality"]["clicks"] == 0 and doc["quality"]["model_hr"] is None
    time.sleep(1.05)
    store.write_offsets(2, {0: 1010}, {})
    rate = api(server, "/api/dashboard")["applied"]["rate_per_s"]
    assert 0 < rate <= 1000 / 1.05
    for query, fragment in (("top=0", "top='0'"), ("top=101", "1..100"), ("n=3", "unknown parameter 'n'; use top")):
        code, _, body = http_get(server, "/api/dashboard?" + query)
        assert code == 400 and fragment in json.loads(body)["error"], query


# ------------------------------------------------------------------- live quality of a real LMF worker
N_QUALITY = 1200  # clicks of the quality test: every one is ranked (ZEROCF_LMF_QUALITY_EVERY=1)


def send_clicks(env: dict[str, str], n: int, partitions: int = 2) -> None:
    """``n`` clicks of 40 users straight onto ``<p>.events`` (as ingest writes them, keyed and partitioned by
    user), items skewed towards a few popular ones so that popularity ranks them well."""
    cfg = load(LMFConfig, env)
    kafka_util.ensure_topics(cfg.kafka, {cfg.topics.events: partitions})
    rng = np.random.default_rng(11)
    offsets = [0] * partitions
    producer = kafka_util.producer(cfg.kafka, client_id="test-dashboard-events")
    try:
        futures = []
        for j in range(n):
            u = int(rng.integers(40))
            user, item, p = f"u{u}", f"i{min(int(rng.zipf(1.6)) - 1, 59)}", u % partitions
            src = f"{cfg.topic_prefix}.clicks"
            ev = Event(id=f"{src}:{p}:{offsets[p]}:0", type="click", user=user, item=item, ts=TS + 1000 * j,
                       weight=1.0, pos=None, imp=None, src=f"{src}/{p}/{offsets[p]}")  # fmt: skip
            offsets[p] += 1
            futures.append(producer.send(cfg.topics.events, key=user.encode(), value=ev.to_json(), partition=p))
        producer.flush()
        for f in futures:
            f.get(timeout=10)
    finally:
        producer.close()


def untimed(quality: dict[str, Any]) -> dict[str, Any]:
    """The dashboard's ``quality`` without the workers' ``published_at``."""
    return {**quality, "workers": [{k: v for k, v in w.items() if k != "published_at"} for w in quality["workers"]]}


def test_live_quality_of_an_lmf_worker(browser: Any, server: RecommendServer, store: FactorStore,
                                       zerocf_env: dict[str, str], tmp_path: Any) -> None:  # fmt: skip
    """``zerocf lmf`` with ``ZEROCF_LMF_QUALITY_EVERY=1`` ranks every click before learning it and publishes HR@10
    against popularity; ``/api/dashboard`` merges what the store holds and the page shows it, number by number."""
    env = {**zerocf_env, "ZEROCF_FACTORS": "8", "ZEROCF_LMF_BATCH": "100", "ZEROCF_LMF_QUALITY_EVERY": "1"}
    send_clicks(env, N_QUALITY)
    log_path = tmp_path / "lmf.log"
    with background(env, log_path, "lmf", "--group", fresh_group("lmf-quality")) as proc:
        published = lambda: [d["ranked"] for d in store.read_quality()] == [N_QUALITY]  # noqa: E731
        try:
            wait_until("the worker's figures of every click", published, 120, proc)
        except AssertionError:
            raise AssertionError(f"no live quality in Redis; the worker's log ends:\n{tail(log_path)}") from None
        [figures] = store.read_quality()
        key = store.keys.quality(figures["worker"])
        assert 0 < store.r.ttl(key) <= TTL_S and figures["every"] == 1 and figures["generation"] == 1

        doc = api(server, "/api/dashboard")
        q = doc["quality"]  # what the store holds, merged (the worker may have published again since: same figures)
        assert untimed(q) == untimed(merge(store.read_quality(), doc["now"]))
        assert q["clicks"] == N_QUALITY and [w["worker"] for w in q["workers"]] == [figures["worker"]]
        assert sum(w["clicks"] for w in q["windows"]) == N_QUALITY and q["workers"][0]["ranked"] == N_QUALITY
        hrs = [q["model_hr"], q["popularity_hr"], q["decayed_hr"]]
        assert all(0.0 <= h <= 1.0 for h in hrs), hrs
        assert q["popularity_hr"] > 0.3  # a skewed stream: the popular items are clicked most
        assert f"{N_QUALITY} clicks ranked by 1 LMF worker (ranking every n-th click: n = 1)" in q["note"]

        fresh_page(browser)
        browser.get(f"http://127.0.0.1:{server.port}/#refresh=0.5")
        wait_until("quality shown", lambda: attr(browser, "#quality", "data-state") == ["on"], 15)
        assert text(browser, "quality-clicks") == str(N_QUALITY) and text(browser, "quality-k") == "10"
        for name in ("model", "popularity", "decayed"):
            shown = float(text(browser, f"quality-{name}"))
            assert shown == pytest.approx(q[f"{name}_hr"], rel=5e-3, abs=1e-3), name
            points = [float(v) for v in attr(browser, f"#quality-chart circle.{name}", "data-value")]
            assert points == [w[f"{name}_hr"] for w in q["windows"]], name
        assert set(attr(browser, "#quality-chart circle", "data-series")) == {"model", "popularity", "decayed"}
        [row] = table(browser, "quality-workers")
        assert row[:2] == [figures["worker"]] * 2 and row[2:6] == ["1", "1", str(N_QUALITY), str(N_QUALITY)]
        worker = q["workers"][0]  # its progress: events/s between two publishes, records behind at its last batch
        assert worker["lag"] == 0 and (worker["events_per_s"] is None or worker["events_per_s"] >= 0)
        assert len(row) == 10 and row[8] == "0" and worker["loss"] > 0  # events/s, lag, loss of the worker
        assert "HR@10 over the last 10 min" in text(browser, "quality-note")
        assert severe(browser) == []
    assert proc.returncode == 0, tail(log_path)
    assert [d["ranked"] for d in store.read_quality()] == [N_QUALITY]  # the last figures stay until the TTL
