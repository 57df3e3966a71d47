"""Frozen configuration of the worker processes (LMF, ALS, lookups/serve).

Built once in each entry point with :func:`stream.config.load` from ``ZEROCF_*`` variables and CLI flags,
validated in ``__post_init__``; nothing else reads the environment.

>>> from stream.config import load
>>> cfg = load(LMFConfig, {"ZEROCF_FACTORS": "32", "ZEROCF_LMF_NEGATIVES": "3"})
>>> cfg.factors, cfg.negatives, cfg.group
(32, 3, 'zerocf-lmf')
>>> load(LMFConfig, {"ZEROCF_LMF_HARD_SHARE": "1.5"})
Traceback (most recent call last):
...
stream.errors.ConfigError: ZEROCF_LMF_HARD_SHARE=1.5 must be in [0, 1]
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, fields

from stream.config import KafkaSettings, RuntimeSettings, Topics, _check_prefix, setting
from stream.errors import ConfigError


def parse_duration(text: str) -> float:
    """Seconds in ``"90"``, ``"90s"``, ``"15m"``, ``"2h"`` or ``"1d"``.

    >>> parse_duration("15m"), parse_duration("2h"), parse_duration("45")
    (900.0, 7200.0, 45.0)
    """
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*", text)
    if not m:
        raise ConfigError(f"duration {text!r} not understood; use e.g. 90s, 15m, 2h or 1d")
    return float(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)]


def _ranges(obj: object, spec: dict[str, tuple[float, float]]) -> None:
    env = {f.name: f.metadata.get("env", f.name) for f in fields(obj)}  # type: ignore[arg-type]
    for name, (lo, hi) in spec.items():
        value = getattr(obj, name)
        if not lo <= value <= hi:
            raise ConfigError(f"{env[name]}={value} must be in [{lo:g}, {hi:g}]")


@dataclass(frozen=True)
class ModelSettings:
    """What every process that touches the factor store agrees on."""

    kafka: KafkaSettings = field(default_factory=KafkaSettings)
    topic_prefix: str = setting("zerocf", "TOPIC_PREFIX", "prefix of every topic and of the Redis namespace")
    redis_url: str = setting("redis://127.0.0.1:6379/0", "REDIS_URL",
                             "Redis URL (redis:// or rediss:// for TLS; password in the URL, never logged)",
                             secret=True)
    factors: int = setting(64, "FACTORS", "latent dimension k of the model")
    runtime: RuntimeSettings = field(default_factory=RuntimeSettings)

    def __post_init__(self) -> None:
        _check_prefix(self.topic_prefix)
        if not self.redis_url.startswith(("redis://", "rediss://", "unix://")):
            raise ConfigError("ZEROCF_REDIS_URL must start with redis://, rediss:// or unix://")
        _ranges(self, {"factors": (1, 1024)})

    @property
    def topics(self) -> Topics:
        return Topics(self.topic_prefix)


@dataclass(frozen=True)
class LMFConfig(ModelSettings):
    """``zerocf lmf``: the online logistic-MF worker."""

    lr: float = setting(0.05, "LMF_LR", "SGD learning rate")
    reg: float = setting(0.01, "LMF_REG", "L2 regularisation")
    negatives: int = setting(5, "LMF_NEGATIVES", "sampled negatives per click")
    sample_alpha: float = setting(0.75, "LMF_SAMPLE_ALPHA", "negative sampling P(i) ~ f_i^alpha, alpha in [0,1]")
    hard_share: float = setting(0.2, "LMF_HARD_SHARE", "share of negatives chosen as hard (DNS) negatives")
    hard_candidates: int = setting(8, "LMF_HARD_CANDIDATES", "candidates scored per hard negative")
    reservoir: int = setting(100_000, "LMF_RESERVOIR", "size of the reservoir of recent clicks")
    batch: int = setting(2000, "LMF_BATCH", "events per mini-batch (one Redis round trip each way)")
    adagrad: bool = setting(False, "LMF_ADAGRAD", "AdaGrad learning-rate scaling")
    clip: float = setting(5.0, "LMF_CLIP", "gradient norm clip")
    init_scale: float = setting(0.01, "LMF_INIT_SCALE", "std of the random init of new rows")
    init: str = setting("random", "LMF_INIT", "new users: random (small) | foldin (least squares on their first clicks)")
    exposure_window_s: float = setting(0.0, "LMF_EXPOSURE_WINDOW_S",
                                       "shown-not-clicked after this many seconds is a negative (0 = off)")
    exposure_weight: float = setting(0.2, "LMF_EXPOSURE_WEIGHT", "gradient weight of exposure negatives")
    seen_cap: int = setting(128, "LMF_SEEN_CAP", "recent clicked items kept per user (<= 128 keeps Redis' compact zset encoding)")
    seen_ttl_days: float = setting(30.0, "LMF_SEEN_TTL_DAYS", "expiry of a user's recent-click set")
    lmf_group: str = setting("", "LMF_GROUP", "consumer group (default <prefix>-lmf)")
    seed: int = setting(0, "LMF_SEED", "seed of the sampler and init")
    idle_seconds: float = setting(3.0, "IDLE_SECONDS", "--until-idle: exit after this long caught up")
    poll_timeout_ms: int = setting(500, "POLL_TIMEOUT_MS", "consumer poll timeout")

    def __post_init__(self) -> None:
        super().__post_init__()
        _ranges(self, {"lr": (1e-6, 10), "reg": (0, 10), "negatives": (0, 100), "sample_alpha": (0, 1),
                       "hard_share": (0, 1), "hard_candidates": (1, 1000), "reservoir": (100, 10**8),
                       "batch": (1, 100_000), "clip": (1e-3, 1e6), "init_scale": (0, 1),
                       "exposure_window_s": (0, 86400 * 30), "exposure_weight": (0, 10),
                       "seen_cap": (1, 100_000), "seen_ttl_days": (0.001, 3650), "idle_seconds": (0.1, 3600),
                       "poll_timeout_ms": (1, 60_000)})
        if self.init not in ("random", "foldin"):
            raise ConfigError(f"ZEROCF_LMF_INIT={self.init!r}; use random or foldin")

    @property
    def group(self) -> str:
        return self.lmf_group or f"{self.topic_prefix}-lmf"


@dataclass(frozen=True)
class ALSConfig(ModelSettings):
    """``zerocf als``: the periodic implicit-ALS re-solve."""

    als_iterations: int = setting(15, "ALS_ITERATIONS", "ALS sweeps per re-solve")
    als_reg: float = setting(0.05, "ALS_REG", "L2 regularisation lambda")
    als_alpha: float = setting(1.0, "ALS_ALPHA", "confidence c = 1 + alpha * f (or the log variant)")
    als_confidence: str = setting("linear", "ALS_CONFIDENCE", "linear | log")
    als_eps: float = setting(1.0, "ALS_EPS", "epsilon of the log confidence 1 + alpha*log(1 + f/eps)")
    als_solver: str = setting("cg", "ALS_SOLVER", "cg | exact")
    als_backend: str = setting("numpy", "ALS_BACKEND", "numpy (ours, numba) | spark (Spark MLlib, extra `spark`)")
    als_cg_steps: int = setting(3, "ALS_CG_STEPS", "conjugate-gradient steps per row and sweep")
    als_threads: int = setting(2, "ALS_THREADS", "solver threads")
    checkpoint_dir: str = setting("./zerocf-als", "ALS_CHECKPOINT_DIR", "snapshot checkpoint directory")
    gc_grace_s: float = setting(600.0, "ALS_GC_GRACE_S", "retired generations are deleted after this")
    calib_samples: int = setting(20_000, "ALS_CALIB_SAMPLES", "clicks used to calibrate scale/bias at the swap")
    als_seed: int = setting(0, "ALS_SEED", "seed of init and calibration sampling")

    def __post_init__(self) -> None:
        super().__post_init__()
        _ranges(self, {"als_iterations": (1, 1000), "als_reg": (0, 1e6), "als_alpha": (0, 1e6),
                       "als_eps": (1e-9, 1e9), "als_cg_steps": (1, 100), "als_threads": (1, 256),
                       "gc_grace_s": (0, 1e7), "calib_samples": (0, 10**8)})
        if self.als_confidence not in ("linear", "log"):
            raise ConfigError(f"ZEROCF_ALS_CONFIDENCE={self.als_confidence!r}; use linear or log")
        if self.als_solver not in ("cg", "exact"):
            raise ConfigError(f"ZEROCF_ALS_SOLVER={self.als_solver!r}; use cg or exact")
        if self.als_backend not in ("numpy", "spark"):
            raise ConfigError(f"ZEROCF_ALS_BACKEND={self.als_backend!r}; use numpy or spark")


@dataclass(frozen=True)
class ServeConfig(ModelSettings):
    """``zerocf serve`` and the lookup client."""

    host: str = setting("0.0.0.0", "SERVE_HOST", "HTTP bind address")
    port: int = setting(8080, "SERVE_PORT", "HTTP port of /recommend, /healthz, /metrics")
    max_k: int = setting(1000, "SERVE_MAX_K", "largest k a request may ask for")
    item_refresh_s: float = setting(5.0, "SERVE_ITEM_REFRESH_S",
                                    "how often the cached item matrix checks for new items")

    def __post_init__(self) -> None:
        super().__post_init__()
        _ranges(self, {"port": (1, 65535), "max_k": (1, 100_000), "item_refresh_s": (0, 86400)})
