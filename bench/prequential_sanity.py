"""Sanity check of the prequential protocol on ml-100k: is "below popularity" the data or a bug?

    python -m bench.prequential_sanity [--split 50000]

Ranks every click after ``--split`` (time order) the way the prequential evaluation does — among all items,
the user's earlier clicks excluded — with two frozen ALS models (ours, k 64, alpha 1, reg 0.05, 15
iterations) and with all-time popularity up to that click:

- ``past``: ALS fitted on the clicks before the split (what a re-solve at the split knows);
- ``oracle``: ALS fitted on all clicks, the future included (an upper bound no online system can reach).

If the oracle beats popularity by a wide margin the ranking code is right, and a gap between ``past`` and
popularity is a property of the data (later clicks come from users the past model never saw). Prints JSON.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from stream.replay.datasets import read_interactions, time_ordered
from workers.kernels.als import als_fit

DATA = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "ml-100k" / "u.data"


def hit_rates(
    user: np.ndarray, item: np.ndarray, U: np.ndarray, V: np.ndarray, split: int, k: int = 10
) -> tuple[float, float]:
    """(model HR@k, popularity HR@k) over the clicks from ``split`` on."""
    counts = np.zeros(V.shape[0])
    seen: dict[int, set[int]] = {}
    hm = hp = n = 0
    for j in range(user.size):
        u, i = int(user[j]), int(item[j])
        if j >= split:
            mask = np.ones(V.shape[0], bool)
            mask[list(seen.get(u, ()))] = False
            scores = V @ U[u]
            hm += int(np.sum(scores[mask] > scores[i]) < k)
            hp += int(np.sum(counts[mask] > counts[i]) < k)
            n += 1
        counts[i] += 1
        seen.setdefault(u, set()).add(i)
    return hm / max(n, 1), hp / max(n, 1)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dataset", default=str(DATA))
    ap.add_argument("--split", type=int, default=50_000)
    args = ap.parse_args(argv)
    rows = time_ordered(read_interactions(args.dataset, "movielens"))
    uid: dict[str, int] = {}
    iid: dict[str, int] = {}
    user = np.array([uid.setdefault(r.user_id, len(uid)) for r in rows])
    item = np.array([iid.setdefault(r.item_id, len(iid)) for r in rows])

    def fit(n: int) -> tuple[np.ndarray, np.ndarray]:
        F = sp.csr_matrix((np.ones(n, np.float32), (user[:n], item[:n])), shape=(len(uid), len(iid)))
        U, V, _ = als_fit(F, factors=64, reg=0.05, alpha=1.0, iterations=15, rng=np.random.default_rng(0))
        return U, V

    out = {"clicks": len(rows), "split": args.split}
    for name, n in (("past", args.split), ("oracle", len(rows))):
        model, pop = hit_rates(user, item, *fit(n), args.split)
        out[name] = {"model_hr10": round(model, 4), "popularity_hr10": round(pop, 4)}
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
