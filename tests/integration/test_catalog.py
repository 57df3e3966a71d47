"""The catalogue on the real broker and Redis: ``zerocf items`` writes ``<p>.items``, a :class:`CatalogView`
follows it, and ``GET /recommend`` / ``/similar`` (user top-k, similar items, the popularity fallback) never
return a hidden or expired item; categories filter; a tombstone resets; a malformed record is skipped and
counted; a serve without a broker still serves; ``zerocf serve`` wires it all."""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from stream import kafka_util
from stream.catalog import CatalogView, catalog_consumer, items_topic
from stream.config import KafkaSettings, load
from stream.devstack import free_port
from tests.helpers import http_get, tiny_model, wait_until
from workers.serving import items_cli
from workers.serving.lookup import Recommender
from workers.serving.server import RecommendServer, make_server
from workers.store import FactorStore

MAX_K = 50
WAIT_S = 30  # bounded wait for a catalogue record to reach the view (it polls every 0.2 s)


@pytest.fixture()
def store(redis_url: str, topic_prefix: str) -> FactorStore:
    return FactorStore.from_url(redis_url, topic_prefix)


@contextlib.contextmanager
def serving(store: FactorStore, env: dict[str, str]) -> Iterator[tuple[RecommendServer, CatalogView]]:
    kafka = load(KafkaSettings, env)
    view = CatalogView(lambda: catalog_consumer(kafka), items_topic(env["ZEROCF_TOPIC_PREFIX"]), retry_s=0.5)
    view.start()
    rec = Recommender(store, refresh_s=0.0, hidden=view.hidden_now)
    srv = make_server(rec, "127.0.0.1", 0, max_k=MAX_K, catalog=view)
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield srv, view
    finally:
        srv.shutdown()
        srv.server_close()
        thread.join(10)
        view.stop()


@pytest.fixture()
def served(store: FactorStore, zerocf_env: dict[str, str]) -> Iterator[tuple[RecommendServer, CatalogView]]:
    tiny_model(store)  # u1 ranks b, a, c; similar(a) is b, c; the fallback (popularity) is b, c
    with serving(store, zerocf_env) as pair:
        yield pair


def items(env: dict[str, str], *argv: str) -> dict[str, Any]:
    """Run ``zerocf items ARGV`` in-process through its own parser; return its JSON summary."""
    parser = argparse.ArgumentParser()
    items_cli.register(parser.add_subparsers())
    args = parser.parse_args(["items", *argv])
    args.env = env
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert args.func(args) == 0
    summary: dict[str, Any] = json.loads(out.getvalue())
    return summary


def answers(srv: RecommendServer | int, category: str | None = None) -> dict[str, list[str]]:
    """The items of u1's top-k, of the items similar to a, and of the fallback of an unknown user."""
    extra = f"&category={category}" if category else ""
    out = {}
    for name, path in (("user", "/recommend?user=u1"), ("similar", "/similar?item=a"), ("ghost", "/recommend?user=g")):
        code, _, body = http_get(srv, f"{path}&k=10{extra}")
        assert code == 200, body
        out[name] = [e["item"] for e in json.loads(body)["items"]]
    return out


def test_hide_then_show_through_the_topic(served: tuple[RecommendServer, CatalogView], zerocf_env: dict) -> None:
    srv, view = served
    assert answers(srv) == {"user": ["b", "a", "c"], "similar": ["b", "c"], "ghost": ["b", "c"]}
    summary = items(zerocf_env, "hide", "b")
    topic = items_topic(zerocf_env["ZEROCF_TOPIC_PREFIX"])
    assert summary == {"action": "hide", "topic": topic, "items": 1, "hidden": True, "available_until": None,
                       "categories": []}  # fmt: skip
    wait_until("b disappears", lambda: "b" not in sum(answers(srv).values(), []), WAIT_S)
    assert answers(srv) == {"user": ["a", "c"], "similar": ["c"], "ghost": ["c"]}
    code, _, body = http_get(srv, "/recommend?user=u1&exclude_seen=0")
    assert "b" not in [e["item"] for e in json.loads(body)["items"]]
    health = json.loads(http_get(srv, "/healthz")[2])
    assert health["ok"] is True and health["catalog"]["state"] == "following"
    assert (health["catalog"]["hidden_now"], health["catalog"]["bad_records"]) == (1, 0)
    assert "zerocf_serve_catalog_hidden_items 1.0" in http_get(srv, "/metrics")[2].decode()
    items(zerocf_env, "show", "b")
    wait_until("b is back", lambda: answers(srv)["user"] == ["b", "a", "c"], WAIT_S)
    assert answers(srv) == {"user": ["b", "a", "c"], "similar": ["b", "c"], "ghost": ["b", "c"]}


def test_expire_past_hides_and_future_hides_only_then(
    served: tuple[RecommendServer, CatalogView], zerocf_env: dict
) -> None:
    srv, view = served
    summary = items(zerocf_env, "expire", "c", "--until", "2020-01-01T00:00:00Z")
    assert (summary["hidden"], summary["available_until"]) == (False, 1_577_836_800_000)
    wait_until("c expired", lambda: "c" not in sum(answers(srv).values(), []), WAIT_S)
    at = int(time.time() * 1000) + 4000
    items(zerocf_env, "expire", "a", "--until", str(at))
    wait_until("the view has a's expiry", lambda: view.state("a").available_until == at, WAIT_S)
    if time.time() * 1000 < at - 500:  # still before its time (unless this machine stalled for seconds)
        assert "a" in answers(srv)["user"]
    wait_until("a expires at its time", lambda: "a" not in answers(srv)["user"], WAIT_S)
    assert time.time() * 1000 >= at
    assert answers(srv) == {"user": ["b"], "similar": ["b"], "ghost": ["b"]}
    items(zerocf_env, "expire", "b")  # default --until: now
    wait_until("b expired now", lambda: answers(srv)["user"] == [], WAIT_S)


def test_categories_filter(served: tuple[RecommendServer, CatalogView], zerocf_env: dict) -> None:
    srv, view = served
    summary = items(zerocf_env, "show", "a", "c", "--categories", "books,sale")
    assert (summary["items"], summary["categories"]) == (2, ["books", "sale"])
    items(zerocf_env, "show", "b", "--categories", "toys")
    wait_until("categories arrive", lambda: view.items_of("toys") == {"b"}, WAIT_S)
    assert answers(srv, "books") == {"user": ["a", "c"], "similar": ["c"], "ghost": ["c", "a"]}
    assert answers(srv, "toys") == {"user": ["b"], "similar": ["b"], "ghost": ["b"]}
    assert answers(srv, "nothing-has-it") == {"user": [], "similar": [], "ghost": []}  # empty, not an error
    items(zerocf_env, "hide", "c", "--categories", "books")  # hidden wins over the category
    wait_until("c hidden", lambda: "c" in view.hidden_now(), WAIT_S)
    assert answers(srv, "books") == {"user": ["a"], "similar": [], "ghost": ["a"]}
    assert view.items_of("sale") == {"a"}  # c's new state has no 'sale': the record is the whole state
    code, _, body = http_get(srv, "/recommend?user=u1&category=a,b")
    assert code == 400 and "category" in json.loads(body)["error"]


def test_tombstone_resets(served: tuple[RecommendServer, CatalogView], zerocf_env: dict) -> None:
    srv, view = served
    items(zerocf_env, "hide", "b", "--categories", "toys")
    wait_until("b hidden", lambda: "b" in view.hidden_now(), WAIT_S)
    assert items(zerocf_env, "reset", "b")["items"] == 1  # a tombstone (null value)
    wait_until("b reset", lambda: "b" not in view.hidden_now(), WAIT_S)
    assert view.items_of("toys") == frozenset() and answers(srv)["user"] == ["b", "a", "c"]


def test_malformed_record_is_skipped_and_counted(served: tuple[RecommendServer, CatalogView], zerocf_env: dict) -> None:
    srv, view = served
    kafka = load(KafkaSettings, zerocf_env)
    topic = items_topic(zerocf_env["ZEROCF_TOPIC_PREFIX"])
    kafka_util.ensure_topics(kafka, {topic: 1})
    producer = kafka_util.producer(kafka, client_id="test-catalog")
    try:
        for key, value in (
            (b"a", b"{not json"),
            (None, b"{}"),
            (b"c", b'{"hidden": "yes"}'),
            (b"b", b'{"hidden": true}'),
        ):
            producer.send(topic, key=key, value=value).get(timeout=30)
    finally:
        producer.close(timeout=5)
    wait_until("the good record after the bad ones applies", lambda: "b" in view.hidden_now(), WAIT_S)
    assert view.hidden_now() == {"b"} and (view.bad_records, view.records) == (3, 1)
    detail = json.loads(http_get(srv, "/healthz")[2])["catalog"]
    assert detail["bad_records"] == 3 and "send true or false" in detail["last_bad_record"]
    assert "zerocf_serve_catalog_bad_records 3.0" in http_get(srv, "/metrics")[2].decode()


def test_serve_without_a_broker_still_serves(store: FactorStore, zerocf_env: dict) -> None:
    tiny_model(store)
    # nothing listens there; clients give up bootstrapping after ZEROCF_KAFKA_BOOTSTRAP_TIMEOUT_S (30 s by default)
    env = {**zerocf_env, "ZEROCF_KAFKA_BOOTSTRAP": f"127.0.0.1:{free_port()}", "ZEROCF_KAFKA_BOOTSTRAP_TIMEOUT_S": "2"}
    with serving(store, env) as (srv, view):
        assert answers(srv) == {"user": ["b", "a", "c"], "similar": ["b", "c"], "ghost": ["b", "c"]}
        wait_until("the view reports the broker away", lambda: view.status()["state"] == "unavailable", 90)
        code, _, body = http_get(srv, "/healthz")
        health = json.loads(body)
        assert code == 200 and health["ok"] is True and health["catalog"]["state"] == "unavailable"
        assert "no Kafka broker answers" in health["catalog"]["error"]
        assert answers(srv, "books")["user"] == []


def test_serve_command_follows_the_catalogue(zerocf_env: dict[str, str], store: FactorStore) -> None:
    tiny_model(store)
    port = free_port()
    env = {**zerocf_env, "ZEROCF_SERVE_HOST": "127.0.0.1", "ZEROCF_SERVE_PORT": str(port)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "workers.cli", "serve"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip

    def users_items() -> list[str] | None:
        try:
            code, _, body = http_get(port, "/recommend?user=u1&k=10")
        except OSError:
            return None
        return [e["item"] for e in json.loads(body)["items"]] if code == 200 else None

    try:
        wait_until("serve answers", lambda: users_items() is not None, 60, proc)
        items(zerocf_env, "hide", "a")
        wait_until("serve hides a", lambda: users_items() == ["b", "c"], WAIT_S, proc)

        def catalog() -> dict[str, object]:
            return dict(json.loads(http_get(port, "/healthz")[2])["catalog"])

        # the view marks itself "following" once a poll found it at the end of every partition
        wait_until("healthz says following", lambda: catalog()["state"] == "following", WAIT_S, proc)
        assert catalog()["hidden_now"] == 1
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err
        assert "catalogue: following" in err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def test_lmf_worker_never_samples_hidden_items_as_negatives(zerocf_env: dict[str, str], store: FactorStore) -> None:
    """A hidden item's row stays exactly as it was while other users' clicks train (each click draws 10 negatives
    from 22 items: a visible item clicked as rarely, ``other``, is drawn and moves)."""
    from stream.client.producer import EventProducer
    from stream.config import StreamConfig
    from stream.ingest import Ingest
    from tests.helpers import TS, fresh_group
    from workers.config import LMFConfig
    from workers.online.worker import LMFWorker

    env = {**zerocf_env, "ZEROCF_IDLE_SECONDS": "1", "ZEROCF_EVENTS_PARTITIONS": "2", "ZEROCF_FACTORS": "8"}
    group = fresh_group("lmf-catalog")

    def stream(rows: list[tuple[str, str, int]]) -> None:
        with EventProducer(bootstrap_servers=env["ZEROCF_KAFKA_BOOTSTRAP"], topic_prefix=env["ZEROCF_TOPIC_PREFIX"]
                           ) as p:  # fmt: skip
            for user, item, ts in rows:
                p.send_click(user, item, ts)
        assert Ingest(load(StreamConfig, env)).run(until_idle=True).clean_exit
        worker = LMFWorker(load(LMFConfig, env, {"lmf_group": group}), store)
        worker.run(until_idle=True)
        assert worker.exit_code == 0

    def rows() -> Any:
        got, found = store.get_vectors(store.live_generation(), "item", ["gone", "other"])
        assert found.all()
        return got

    stream([("z", "gone", TS), ("z", "other", TS + 1)] + [(f"u{n % 20}", f"a{n % 20}", TS + 10 + n) for n in range(40)])
    before = rows()
    items(env, "hide", "gone")
    stream([(f"u{n % 20}", f"a{(3 * n) % 20}", TS + 100 + n) for n in range(300)])
    after = rows()
    assert (after[0] == before[0]).all()  # hidden: never a negative, so never touched
    assert not (after[1] == before[1]).all()  # visible and as rare: drawn as a negative, so it moved
