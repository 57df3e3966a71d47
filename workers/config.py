"""Frozen configuration of the worker processes (LMF, ALS, lookups/serve).

Built once in each entry point with :func:`stream.config.load` from ``ZEROCF_*`` variables and the CLI flags
:func:`stream.config.add_flags` generated from the same declarations; validated in ``__post_init__``;
nothing else reads the environment.

>>> from stream.config import load
>>> cfg = load(LMFConfig, {"ZEROCF_FACTORS": "32", "ZEROCF_LMF_NEGATIVES": "3"})
>>> cfg.factors, cfg.negatives, cfg.group
(32, 3, 'zerocf-lmf')
>>> load(LMFConfig, {"ZEROCF_LMF_HARD_SHARE": "1.5"})
Traceback (most recent call last):
...
stream.errors.ConfigError: ZEROCF_LMF_HARD_SHARE=1.5 must be in [0, 1]
>>> load(ALSConfig, {"ZEROCF_ALS_SOLVER": "lu"})
Traceback (most recent call last):
...
stream.errors.ConfigError: ZEROCF_ALS_SOLVER='lu'; use one of cg, exact
>>> load(LMFConfig, {"ZEROCF_REDIS_URL": "redis://127.0.0.1:6379/notadb"})  # doctest: +ELLIPSIS
Traceback (most recent call last):
...
stream.errors.ConfigError: ZEROCF_REDIS_URL=redis://127.0.0.1:6379/notadb: the path '/notadb' is not a database ...
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from stream.config import ConsumerSettings, ProcessSettings, check_ranges, redact_url, setting
from stream.errors import ConfigError
from workers.kernels.als import Scaling

InitMode = Literal["random", "foldin"]
Solver = Literal["cg", "exact"]
Backend = Literal["numpy", "spark"]


def parse_duration(text: str) -> float:
    """Seconds in ``"90"``, ``"90s"``, ``"15m"``, ``"2h"`` or ``"1d"``.

    >>> parse_duration("15m"), parse_duration("2h"), parse_duration("45")
    (900.0, 7200.0, 45.0)
    """
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*", text)
    if not m:
        raise ConfigError(f"duration {text!r} not understood; use e.g. 90s, 15m, 2h or 1d")
    return float(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)]


def check_redis_url(url: str) -> None:
    """Raise :class:`ConfigError` naming ``ZEROCF_REDIS_URL`` unless redis-py can use ``url`` as given.

    The scheme must be redis, rediss or unix; query values (``db``, ``socket_timeout``, ...) must parse; the
    path of a redis(s) URL must be empty or a database number (redis-py would silently read ``/notadb`` as
    database 0). The password never appears in the message.

    >>> check_redis_url("rediss://:secret@cache:6380/2?socket_timeout=1.5")
    >>> check_redis_url("redis://:secret@cache:6379/0?db=x")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    stream.errors.ConfigError: ZEROCF_REDIS_URL=redis://:***@cache:6379/0?db=x: Invalid value for 'db' in ...
    """
    from redis.connection import parse_url

    shown = redact_url(url)
    fix = "use redis://[:PASSWORD@]HOST:PORT/DB with DB an integer (0 by default)"
    from workers.store.connect import cluster_startup, is_cluster_url

    if is_cluster_url(url):  # redis+cluster://HOST:PORT[,HOST:PORT...]: the nodes, then the first as redis://
        url = cluster_startup(url)[0]
    if not url.startswith(("redis://", "rediss://", "unix://")):
        raise ConfigError(
            f"ZEROCF_REDIS_URL must start with redis://, rediss://, unix:// or redis+cluster:// (a cluster); {fix}"
        )
    try:
        parse_url(url)
    except ValueError as exc:
        raise ConfigError(f"ZEROCF_REDIS_URL={shown}: {exc}; {fix}") from None
    if not url.startswith("unix://"):
        path = urlsplit(url).path
        if path not in ("", "/") and not re.fullmatch(r"/\d+", path):
            raise ConfigError(f"ZEROCF_REDIS_URL={shown}: the path {path!r} is not a database number; {fix}")


def state_dir(environ: Mapping[str, str] | None = None) -> Path:
    """zerocf's state directory: ``$XDG_STATE_HOME/zerocf``, else ``~/.local/state/zerocf``.

    >>> str(state_dir({"XDG_STATE_HOME": "/srv/state"}))
    '/srv/state/zerocf'
    """
    env = os.environ if environ is None else environ
    base = env.get("XDG_STATE_HOME") or ""
    root = Path(base) if os.path.isabs(base) else Path(env.get("HOME") or Path.home()) / ".local" / "state"
    return root / "zerocf"


@dataclass(frozen=True)
class ModelSettings(ProcessSettings):
    """What every process that touches the factor store agrees on."""

    redis_url: str = setting(
        "redis://127.0.0.1:6379/0",
        "REDIS_URL",
        "Redis URL (redis:// or rediss:// for TLS, redis+cluster://h:p[,h:p] for a Redis Cluster; password in the "
        "URL, never logged)",
        secret=True,
    )
    factors: int = setting(64, "FACTORS", "latent dimension k of the model")
    pop_half_life_s: float = setting(86_400.0, "POP_HALF_LIFE_S", "half-life of the time-decayed popularity that "
                                     "serves users without a vector (event time)", unit="s")  # fmt: skip

    def __post_init__(self) -> None:
        super().__post_init__()
        check_redis_url(self.redis_url)
        check_ranges(self, {"factors": (1, 1024), "pop_half_life_s": (1, 86400 * 3650)})

    @property
    def pop_half_life_ms(self) -> int:
        return int(self.pop_half_life_s * 1000)


@dataclass(frozen=True)
class LMFConfig(ModelSettings, ConsumerSettings):
    """``zerocf lmf``: the online logistic-MF worker."""

    lr: float = setting(0.1, "LMF_LR", "learning rate of the latent factors (AdaGrad's base rate)")
    reg: float = setting(0.003, "LMF_REG", "L2 regularisation of the latent factors")
    lr_bias: float = setting(0.1, "LMF_LR_BIAS", "learning rate of the user and item biases")
    reg_bias: float = setting(0.01, "LMF_REG_BIAS", "L2 regularisation of the user and item biases")
    lr_global: float = setting(0.01, "LMF_LR_GLOBAL", "learning rate of the global bias")
    negatives: int = setting(10, "LMF_NEGATIVES", "sampled negatives per click")
    sample_alpha: float = setting(0.25, "LMF_SAMPLE_ALPHA", "negative proposal P(i) ~ f_i^alpha, alpha in [0,1]")
    uniform_mix: float = setting(0.2, "LMF_UNIFORM_MIX", "share of negatives drawn uniformly over the known items")
    hard_share: float = setting(0.5, "LMF_HARD_SHARE", "share of negatives chosen as hard (DNS) negatives")
    hard_candidates: int = setting(8, "LMF_HARD_CANDIDATES", "candidates scored per hard negative")
    reservoir: int = setting(100_000, "LMF_RESERVOIR", "size of the reservoir of recent clicks", unit="clicks")
    batch: int = setting(8000, "LMF_BATCH", "most events per mini-batch (one Redis round trip each way; under "
                         "backlog a hot item row is written once for more clicks)", unit="events")  # fmt: skip
    adagrad: bool = setting(True, "LMF_ADAGRAD", "AdaGrad learning-rate scaling (factors row-wise, biases)")
    clip: float = setting(5.0, "LMF_CLIP", "gradient norm clip")
    init_scale: float = setting(0.05, "LMF_INIT_SCALE", "std of the random init of new user rows")
    init: InitMode = setting(
        "random", "LMF_INIT", "new users: random (small) or foldin (least squares on their first clicks)"
    )
    exposure_window_s: float = setting(
        0.0, "LMF_EXPOSURE_WINDOW_S", "shown-not-clicked after this long is a negative (0 = off)", unit="s"
    )
    exposure_weight: float = setting(0.2, "LMF_EXPOSURE_WEIGHT", "gradient weight of exposure negatives")
    seen_cap: int = setting(10_000, "LMF_SEEN_CAP", "most seen items kept per user", unit="items")
    seen_ttl_days: float = setting(365.0, "LMF_SEEN_TTL_DAYS", "retention of seen items: clicked within this "
                                   "long of the user's newest click (event time); the set expires this long "
                                   "after the last click", unit="days")  # fmt: skip
    item_refresh_s: float = setting(60.0, "LMF_ITEM_REFRESH_S", "re-read every item row from Redis this often, "
                                    "to see other workers' updates (0 = never)", unit="s")  # fmt: skip
    lmf_group: str = setting("", "LMF_GROUP", "consumer group (default <prefix>-lmf)", flag="--group")
    idle_timeout_s: float = setting(120.0, "LMF_IDLE_TIMEOUT_S", "--until-idle: exit 1 when partitions of other "
                                    "members made no progress for this long", unit="s")  # fmt: skip
    quality_every: int = setting(1000, "LMF_QUALITY_EVERY", "live quality on the serve dashboard: rank every "
                                 "n-th click right before it is learned (HR@10 of the model against popularity; "
                                 "0 = off). A ranked click costs a pass over the catalogue (k = 64: ~20 ns per "
                                 "item, 0.4 ms at 20,000 items), so 1000 adds ~0.4 us per click at 20,000 items "
                                 "(~1 percent of a worker's time); above 20,000 items at most one click per 20 "
                                 "items, so the cost stays there",
                                 unit="clicks")  # fmt: skip
    catalog: bool = setting(True, "LMF_CATALOG", "follow the catalogue topic <prefix>.items: hidden and expired "
                            "items are never sampled as negatives")  # fmt: skip
    seed: int = setting(0, "LMF_SEED", "seed of the sampler and init")

    def __post_init__(self) -> None:
        super().__post_init__()
        check_ranges(
            self,
            {
                "lr": (1e-6, 10),
                "reg": (0, 10),
                "negatives": (0, 100),
                "sample_alpha": (0, 1),
                "hard_share": (0, 1),
                "hard_candidates": (1, 1000),
                "reservoir": (100, 10**8),
                "batch": (1, 100_000),
                "clip": (1e-3, 1e6),
                "init_scale": (0, 1),
                "exposure_window_s": (0, 86400 * 30),
                "exposure_weight": (0, 10),
                "seen_cap": (1, 100_000),
                "seen_ttl_days": (0.001, 3650),
                "idle_timeout_s": (1, 86400),
                "quality_every": (0, 10**9),
            },
        )

    @property
    def group(self) -> str:
        return self.lmf_group or f"{self.topic_prefix}-lmf"


@dataclass(frozen=True)
class ALSConfig(ModelSettings):
    """``zerocf als``: the periodic implicit-ALS re-solve."""

    als_iterations: int = setting(15, "ALS_ITERATIONS", "ALS sweeps per re-solve", flag="--iterations")
    als_reg: float = setting(25.0, "ALS_REG", "L2 regularisation lambda", flag="--reg")
    als_alpha: float = setting(1.0, "ALS_ALPHA", "confidence c = 1 + alpha * f (or the log variant)", flag="--alpha")
    als_confidence: Scaling = setting(
        "log", "ALS_CONFIDENCE", "confidence of a count: linear or log", flag="--confidence"
    )
    als_eps: float = setting(0.1, "ALS_EPS", "epsilon of the log confidence 1 + alpha*log(1 + f/eps)", flag="--eps")
    als_solver: Solver = setting(
        "cg", "ALS_SOLVER", "row solver: conjugate gradient or exact Cholesky", flag="--solver"
    )
    als_backend: Backend = setting(
        "numpy", "ALS_BACKEND", "numpy (ours, numba) or spark (Spark MLlib, extra `spark`)", flag="--backend"
    )
    als_cg_steps: int = setting(3, "ALS_CG_STEPS", "conjugate-gradient steps per row and sweep", flag="--cg-steps")
    als_threads: int = setting(2, "ALS_THREADS", "solver threads", flag="--threads")
    checkpoint_dir: str = setting("", "ALS_CHECKPOINT_DIR", "snapshot checkpoint directory (empty: $XDG_STATE_HOME"
                                  "/zerocf/als/<prefix>, else ~/.local/state/zerocf/als/<prefix>)")  # fmt: skip
    gc_grace_s: float = setting(600.0, "ALS_GC_GRACE_S", "retired generations are deleted after this", unit="s")
    calib_samples: int = setting(20_000, "ALS_CALIB_SAMPLES", "clicks used to calibrate scale/bias at the swap")
    calib_negatives: int = setting(10, "ALS_CALIB_NEGATIVES", "negatives per click in the calibration (match "
                                   "ZEROCF_LMF_NEGATIVES: the global bias is read against that many)")  # fmt: skip
    als_seed: int = setting(0, "ALS_SEED", "seed of init and calibration sampling", flag="--seed")

    def __post_init__(self) -> None:
        super().__post_init__()
        check_ranges(
            self,
            {
                "als_iterations": (1, 1000),
                "als_reg": (0, 1e6),
                "als_alpha": (0, 1e6),
                "als_eps": (1e-9, 1e9),
                "als_cg_steps": (1, 100),
                "als_threads": (1, 256),
                "gc_grace_s": (0, 1e7),
                "calib_samples": (0, 10**8),
            },
        )
        if self.als_backend == "spark":
            _check_spark()

    @property
    def checkpoint_path(self) -> Path:
        """``ZEROCF_ALS_CHECKPOINT_DIR``, or ``<state dir>/als/<prefix>`` (:func:`state_dir`) when empty."""
        return Path(self.checkpoint_dir) if self.checkpoint_dir else state_dir() / "als" / self.topic_prefix


def _check_spark() -> None:
    """The Spark backend needs pyspark (the ``spark`` extra) and a Java runtime: say so before any work."""
    if importlib.util.find_spec("pyspark") is None:
        raise ConfigError(
            "ZEROCF_ALS_BACKEND=spark needs pyspark, which is not installed: pip install -e '.[spark]' "
            "(needs Java 17), or use ZEROCF_ALS_BACKEND=numpy"
        )
    if not (shutil.which("java") or os.environ.get("JAVA_HOME")):
        raise ConfigError(
            "ZEROCF_ALS_BACKEND=spark needs a Java runtime (Java 17) on PATH or in JAVA_HOME; install one, "
            "or use ZEROCF_ALS_BACKEND=numpy"
        )


@dataclass(frozen=True)
class ServeConfig(ModelSettings):
    """``zerocf serve`` and the lookup client."""

    host: str = setting("0.0.0.0", "SERVE_HOST", "HTTP bind address")
    port: int = setting(8080, "SERVE_PORT", "HTTP port of /recommend, /similar, /openapi.json, /healthz, /metrics")
    max_k: int = setting(1000, "SERVE_MAX_K", "largest k a request may ask for")
    item_refresh_s: float = setting(
        5.0, "SERVE_ITEM_REFRESH_S", "how often the cached item matrix checks for new items", unit="s"
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        check_ranges(self, {"port": (1, 65535), "max_k": (1, 100_000), "item_refresh_s": (0, 86400)})
