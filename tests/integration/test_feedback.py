"""Feedback types with weights on the real broker and Redis: ingest -> LMF -> ALS.

``ZEROCF_FEEDBACK_WEIGHTS=like:2,purchase:5,dislike:-1``: a ``like`` is a click of weight 2, a ``purchase`` one
of weight 5, a ``dislike`` an explicit negative of weight 1; an unconfigured type and a malformed one are
dead-lettered with their reason. The LMF worker learns the dislike as a negative step (the item joins the
user's seen set, so it is never recommended to them, and no popularity counter moves); the ALS snapshot holds
the signed sums the re-solve reads (a negative entry is an observed zero).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from stream.client.producer import EventProducer
from stream.config import StreamConfig, load
from stream.ingest import Ingest
from stream.kafka_util import read_topic
from tests.helpers import TS, event_dicts, fresh_group, run_zerocf
from workers.batch.interactions import InteractionMatrix
from workers.config import LMFConfig
from workers.online.worker import LMFWorker
from workers.serving.lookup import Recommender
from workers.store import FactorStore

FAN = "fan"
HIT = "i0"  # clicked by everyone else: the first thing the fan would be offered without the dislike


def test_feedback_types_are_weighted_negatives_are_learned_and_unknown_types_dead_lettered(
    zerocf_env: dict[str, str], tmp_path: Path
) -> None:
    env = {**zerocf_env, "ZEROCF_IDLE_SECONDS": "1", "ZEROCF_EVENTS_PARTITIONS": "2", "ZEROCF_FACTORS": "8",
           "ZEROCF_FEEDBACK_WEIGHTS": "like:2,purchase:5,dislike:-1"}  # fmt: skip
    cfg = load(StreamConfig, env)
    rng = random.Random(3)
    with EventProducer(bootstrap_servers=env["ZEROCF_KAFKA_BOOTSTRAP"], topic_prefix=cfg.topic_prefix) as p:
        for u in range(30):
            p.send_click(f"u{u}", HIT, TS + 100 * u)
            for n in range(8):
                p.send_click(f"u{u}", f"i{rng.randrange(1, 25)}", TS + 100 * u + 1 + n)
        p.send_click(FAN, "i1", TS + 5000, feedback="like")
        p.send_click(FAN, "i2", TS + 5001, feedback="purchase", count=2)
        p.send_click(FAN, "i3", TS + 5002)
        p.send_click(FAN, HIT, TS + 5003, feedback="dislike")
        producer = p._producer  # records the client's own validation would not let through
        producer.send(
            cfg.topics.clicks,
            key=FAN.encode(),
            value=b'{"user_id": "fan", "item_id": "i4", "ts": %d, "feedback": "wow"}' % (TS + 5004),
        )
        producer.send(
            cfg.topics.clicks,
            key=FAN.encode(),
            value=b'{"user_id": "fan", "item_id": "i4", "ts": %d, "feedback": "Bad Type"}' % (TS + 5005),
        )
    stats = Ingest(cfg).run(until_idle=True)
    assert stats.clean_exit and stats.dlq == 2, stats.summary()

    fan = {e["item"]: e for e in event_dicts(cfg) if e["user"] == FAN}
    assert [(fan[i]["type"], fan[i]["weight"], fan[i].get("fb")) for i in ("i1", "i2", "i3", HIT)] == [
        ("click", 2.0, "like"),
        ("click", 10.0, "purchase"),
        ("click", 1.0, None),
        ("negative", 1.0, "dislike"),
    ]
    dead = [json.loads(r.value) for r in read_topic(cfg.kafka, cfg.topics.dlq, timeout=30)]
    reasons = sorted(d["reason"] for d in dead)
    assert len(reasons) == 2
    assert reasons[0].startswith("feedback 'Bad Type' is not a feedback type")
    assert reasons[1].startswith("feedback 'wow' is not configured (known: click, dislike, like, purchase)")

    lcfg = load(LMFConfig, env, {"lmf_group": fresh_group("feedback")})
    store = FactorStore.from_url(lcfg.redis_url, lcfg.topic_prefix)
    worker = LMFWorker(lcfg, store)
    worker.run(until_idle=True)
    assert worker.exit_code == 0
    assert sorted(store.seen_items(FAN)) == ["i0", "i1", "i2", "i3"]  # the disliked item too: never offered again
    g = store.live_generation()
    counts = store.item_counts(g)
    assert counts[HIT] == 30.0 and counts["i1"] >= 2.0  # the dislike counts nowhere; the like weighs 2
    rec = Recommender(store, refresh_s=0).recommend(FAN, k=10)
    assert not rec.fallback and HIT not in rec.items and not {"i1", "i2", "i3"} & set(rec.items)

    ckpt = tmp_path / "ckpt"
    run_zerocf(env, "als", "--once", "--factors", "8", "--iterations", "4", "--checkpoint-dir", str(ckpt))
    m = InteractionMatrix.load(ckpt)
    csr = m.to_csr()
    row = csr[m.user_index([FAN])[0]]
    got = dict(zip((m.item_ids[j] for j in row.indices), row.data.tolist()))
    assert got == {"i1": 2.0, "i2": 10.0, "i3": 1.0, HIT: -1.0}  # signed: ALS reads -1 as an observed zero
    assert store.live_generation() == g + 1
    rec = Recommender(store, refresh_s=0).recommend(FAN, k=10)
    assert not rec.fallback and HIT not in rec.items
