"""The product under evaluation: clicks streamed through the real broker, ``Ingest``, ``LMFWorker`` and
``ALSWorker`` (what ``zerocf ingest``, ``zerocf lmf`` and ``zerocf als --once`` run), read back through
``Recommender.recommend_many`` (the ``zerocf recommend`` path). Production defaults throughout.

:class:`RealPath` owns one model under a fresh topic prefix: it creates the topics, runs ingest and (unless
``online=False``) the LMF worker in threads, produces clicks in stream order and waits until every click it
sent has been applied, and runs the ALS worker when asked. :func:`stack_env` gives it a broker and Redis:
the ones the environment names, or an embedded :class:`stream.devstack.LocalStack` it starts.
"""

from __future__ import annotations

import logging
import tempfile
import threading
import time
import uuid
from collections.abc import Sequence
from types import TracebackType
from typing import Any

from tqdm import tqdm

from stream import kafka_util
from stream.client.producer import EventProducer
from stream.config import StreamConfig, load
from stream.errors import ConfigError
from stream.ingest import Ingest
from stream.replay.datasets import Interaction
from stream.replay.produce import prepare, replay
from stream.runtime import StopFlag
from workers.batch.worker import ALSWorker, RunResult
from workers.config import ALSConfig, LMFConfig
from workers.online.worker import LMFWorker
from workers.serving.lookup import Recommendation, Recommender
from workers.store import FactorStore

log = logging.getLogger(__name__)

__all__ = ["RealPath", "stack_env"]


def stack_env(env: dict[str, str], stack_dir: str) -> tuple[dict[str, str], Any]:
    """Use the broker/Redis named in ``env``; else start an embedded LocalStack in ``stack_dir``."""
    if env.get("ZEROCF_KAFKA_BOOTSTRAP") and env.get("ZEROCF_REDIS_URL"):
        return dict(env), None
    from stream.devstack import LocalStack

    stack = LocalStack(stack_dir)
    stack.up()
    log.info("started an embedded stack in %s (set ZEROCF_KAFKA_BOOTSTRAP and ZEROCF_REDIS_URL to use yours)",
             stack_dir)  # fmt: skip
    return {**env, **stack.env()}, stack


class RealPath:
    """One model on the real stack; use as a context manager (threads and the producer stop on exit).

    Parameters
    ----------
    env : a ``ZEROCF_*`` environment naming the broker and Redis; the other settings keep their defaults
        (``ZEROCF_TOPIC_PREFIX`` is replaced by a fresh ``eval<random>`` prefix).
    online : run the LMF worker (False: ingest only, for ALS alone).
    rank_hook : passed to the LMF worker (prequential ranks).
    overrides : settings to change for the evaluation's processes, by field name (e.g. ``seed``).
    prefix : the topic prefix (default: a fresh ``eval<random>`` one).
    progress : the number of clicks that will be sent: a progress bar on a terminal (none in logs or pipes).
    """

    def __init__(self, env: dict[str, str], *, online: bool = True, rank_hook: Any = None, rank_every: int = 1,
                 overrides: dict[str, Any] | None = None, prefix: str | None = None,
                 timeout: float = 180.0, progress: int | None = None) -> None:  # fmt: skip
        self.prefix = prefix or "eval" + uuid.uuid4().hex[:8]
        self._tmp = tempfile.TemporaryDirectory(prefix="zerocf-eval-")
        env = {k: v for k, v in env.items() if k != "ZEROCF_TOPIC_PREFIX"}
        common = {"topic_prefix": self.prefix, "idle_seconds": 1.0, **(overrides or {})}
        self.scfg = load(StreamConfig, env, common)
        self.lcfg = load(LMFConfig, env, common)
        self.acfg = load(ALSConfig, env, {**common, "checkpoint_dir": self._tmp.name})
        self.online, self.rank_hook, self.rank_every, self.timeout = online, rank_hook, rank_every, timeout
        self.stop = StopFlag()
        self.sent = 0
        self.store = FactorStore.from_url(self.lcfg.redis_url, self.prefix, seen_cap=self.lcfg.seen_cap,
                                          seen_ttl=int(self.lcfg.seen_ttl_days * 86400))  # fmt: skip
        self._als: ALSWorker | None = None
        self._bar = tqdm(total=progress, desc="streaming", unit="click", disable=True if progress is None else None)

    def __enter__(self) -> RealPath:
        kafka_util.ensure_topics(self.scfg.kafka, {t: self.scfg.events_partitions for t in self.scfg.topics.all()})
        self.ingest = Ingest(self.scfg, self.stop)
        self.worker = (LMFWorker(self.lcfg, self.store, self.stop, rank_hook=self.rank_hook, rank_every=self.rank_every)
                       if self.online else None)  # fmt: skip
        parts: list[tuple[str, Any]] = [("ingest", self.ingest)] + ([("lmf", self.worker)] if self.worker else [])
        self.threads = [threading.Thread(target=t.run, name=f"eval-{n}", daemon=True) for n, t in parts]
        for t in self.threads:
            t.start()
        kw = self.scfg.kafka.client_kwargs()
        self.producer = EventProducer(bootstrap_servers=kw.pop("bootstrap_servers"), topic_prefix=self.prefix, **kw)
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:  # fmt: skip
        self.stop.set("evaluation done")
        self.producer.close()
        for t in self.threads:
            t.join(timeout=30)
        self._bar.close()
        self._tmp.cleanup()

    # ------------------------------------------------------------------ streaming
    def send(self, rows: Sequence[Interaction]) -> None:
        """Produce ``rows`` (already in stream order) and wait until every click sent so far is applied."""
        sent = replay(self.producer, rows, 0, None)["clicks_sent"]
        self.sent += sent
        self.wait_applied()
        self._bar.update(sent)

    def wait_applied(self) -> None:
        """Block until ingest has normalised, and the LMF worker applied, every click sent (bounded)."""

        def done() -> int:
            if self.worker is not None:
                return self.worker.stats.clicks
            return self.ingest.stats.events_out

        last, since = done(), time.monotonic()
        while done() < self.sent:
            if not all(t.is_alive() for t in self.threads):
                raise ConfigError("the ingest or LMF thread of the evaluation stopped early; see the log above")
            if done() != last:
                last, since = done(), time.monotonic()
            elif time.monotonic() - since > self.timeout:
                raise ConfigError(f"only {done()} of {self.sent} clicks were applied after {self.timeout:.0f}s "
                                  "without progress; check the broker, Redis and the DLQ")  # fmt: skip
            time.sleep(0.05)

    def resolve(self, alone: bool = False) -> RunResult:
        """``zerocf als --once``: snapshot everything so far, solve, publish (the LMF worker then switches).

        ``alone`` publishes the ALS solution by itself (``--rebuild``: nothing carried over from the online
        learner), to measure ALS alone with the product's seen sets and lookups.
        """
        if self._als is None or alone:
            store = FactorStore.from_url(self.acfg.redis_url, self.prefix)
            self._als = ALSWorker(self.acfg, store, self.stop, rebuild=alone)
        self._bar.set_postfix_str("ALS re-solve")
        res = self._als.run_once(0)
        self._bar.set_postfix_str(f"generation {res.generation}")
        if res.outcome != "published":
            raise ConfigError(f"the evaluation's ALS run ended {res.outcome!r}; see the log above")
        if self.worker is not None:  # the next step needs the LMF worker on the new generation
            deadline = time.monotonic() + self.timeout
            while self.worker.g != res.generation and time.monotonic() < deadline:
                time.sleep(0.05)
        return res

    def recommend(self, users: Sequence[str], k: int) -> dict[str, Recommendation]:
        """What ``zerocf recommend USERS -k K --json`` prints, as objects."""
        return Recommender(self.store).recommend_many(list(users), k)


def stream_rows(users: Sequence[str], items: Sequence[str], user: Sequence[int], item: Sequence[int],
                count: Sequence[float], ts: Sequence[int] | None) -> list[Interaction]:  # fmt: skip
    """Interactions in the given (stream) order; without timestamps they are one second apart, and old ones are
    shifted so the stream ends now (as ``zerocf produce`` does)."""
    t = list(ts) if ts is not None else [946_684_800_000 + 1000 * n for n in range(len(user))]
    rows = [Interaction(users[u], items[i], int(s), int(c), n + 1)
            for n, (u, i, c, s) in enumerate(zip(user, item, count, t))]  # fmt: skip
    return prepare(rows, keep_ts=False, now_ms=time.time_ns() // 1_000_000)
