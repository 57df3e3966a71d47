"""Unit tests of workers.batch.interactions: id maps, CSR building, memory accounting, atomic checkpoints."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from workers.batch import interactions as im_mod
from workers.batch.interactions import InteractionMatrix


def _filled(seed: int = 0, n: int = 500) -> InteractionMatrix:
    rng = np.random.default_rng(seed)
    m = InteractionMatrix()
    m.add_batch(
        [f"u{x}" for x in rng.integers(0, 30, n)],
        [f"i{x}" for x in rng.integers(0, 40, n)],
        rng.integers(1, 4, n).astype(np.float32),
    )
    return m


def test_id_maps_are_dense_and_stable() -> None:
    m = InteractionMatrix()
    m.add_batch(["b", "a", "b"], ["x", "y", "z"])
    m.add("c", "x", 2.0)
    assert m.user_ids == ["b", "a", "c"] and m.item_ids == ["x", "y", "z"]
    assert m.user_index(["a", "c", "nope"]).tolist() == [1, 2, -1]
    assert m.item_index(["z"]).dtype == np.int32
    assert m.shape == (3, 3)


def test_to_csr_sums_duplicates_with_dtypes() -> None:
    m = InteractionMatrix()
    m.add_batch(["u", "u", "v", "u"], ["a", "a", "b", "b"], [1.0, 2.5, 1.0, 4.0])
    c = m.to_csr()
    assert c.dtype == np.float32 and c.indices.dtype == np.int32 and c.indptr.dtype == np.int32
    np.testing.assert_array_equal(c.toarray(), [[3.5, 4.0], [0.0, 1.0]])
    assert c.has_canonical_format


def test_matches_dense_reference_across_buffer_growth_and_compaction() -> None:
    rng = np.random.default_rng(3)
    m = InteractionMatrix()
    dense = np.zeros((50, 60), np.float32)
    for _ in range(40):  # 40 * 300 events into 3,000 cells: forces compaction and growth
        u, i = rng.integers(0, 50, 300), rng.integers(0, 60, 300)
        w = rng.integers(1, 3, 300).astype(np.float32)
        m.add_batch([f"u{x:02d}" for x in u], [f"i{x:02d}" for x in i], w)
        np.add.at(dense, (u, i), w)
    rows = np.array([int(s[1:]) for s in m.user_ids])
    cols = np.array([int(s[1:]) for s in m.item_ids])
    np.testing.assert_allclose(m.to_csr().toarray(), dense[np.ix_(rows, cols)])
    assert m.nnz < 40 * 300 and m._rows.size < 40 * 300  # compaction: buffer below the event count


def test_zero_weight_registers_ids_without_entries() -> None:
    m = InteractionMatrix()
    m.add_batch(["u1", "u2"], ["a", "b"], [0.0, 1.0])
    assert m.shape == (2, 2)
    assert m.to_csr().nnz == 1 and m.to_csr()[0].nnz == 0


@pytest.mark.parametrize("w", [float("nan"), float("inf")])
def test_bad_weights_rejected_and_nothing_added(w: float) -> None:
    m = InteractionMatrix()
    with pytest.raises(ValueError, match="weight"):
        m.add_batch(["u1", "u2"], ["a", "b"], [1.0, w])
    assert m.shape == (0, 0) and m.nnz == 0


def test_length_mismatch_and_non_str_ids_rejected() -> None:
    m = InteractionMatrix()
    with pytest.raises(ValueError, match="one of each"):
        m.add_batch(["u1"], ["a", "b"])
    with pytest.raises(TypeError, match="must be str"):
        m.add_batch([7], ["a"])  # type: ignore[list-item]


def test_save_load_round_trip(tmp_path) -> None:
    m = _filled()
    meta = {"offsets": {"zerocf.events/0": 1041}, "dedupe": {"zerocf.clicks/2": [1041, 0]}}
    m.save(tmp_path / "ck", metadata=meta)
    r = InteractionMatrix.load(tmp_path / "ck")
    assert r.user_ids == m.user_ids and r.item_ids == m.item_ids
    assert (r.to_csr() != m.to_csr()).nnz == 0
    assert r.metadata == meta and m.metadata == meta
    r.add("u0", "new-item")  # a loaded matrix keeps accumulating
    assert r.shape == (m.shape[0], m.shape[1] + 1)


def test_crash_before_rename_keeps_old_checkpoint(tmp_path, monkeypatch) -> None:
    old = _filled(seed=1)
    old.save(tmp_path, metadata={"offset": 1})
    new = _filled(seed=2, n=900)

    def crash(src, dst):
        raise OSError("simulated crash after writing the temp dir, before the rename")

    monkeypatch.setattr(im_mod.os, "replace", crash)
    with pytest.raises(OSError, match="simulated crash"):
        new.save(tmp_path, metadata={"offset": 2})
    monkeypatch.undo()
    assert any(p.name.endswith(".tmp") for p in tmp_path.iterdir())  # the half-written temp dir
    r = InteractionMatrix.load(tmp_path)
    assert r.metadata == {"offset": 1} and (r.to_csr() != old.to_csr()).nnz == 0
    new.save(tmp_path, metadata={"offset": 2})  # the next save commits and cleans up
    assert InteractionMatrix.load(tmp_path).metadata == {"offset": 2}
    assert sorted(p.name for p in tmp_path.iterdir())[1:] == ["ckpt-00000003"]  # CURRENT + one dir


def test_crash_between_dir_rename_and_pointer_swap(tmp_path, monkeypatch) -> None:
    _filled(seed=1).save(tmp_path, metadata={"offset": 1})
    real = os.replace
    calls = []

    def second_fails(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            raise OSError("simulated crash before CURRENT is swapped")
        real(src, dst)

    monkeypatch.setattr(im_mod.os, "replace", second_fails)
    with pytest.raises(OSError):
        _filled(seed=2).save(tmp_path, metadata={"offset": 2})
    assert InteractionMatrix.load(tmp_path).metadata == {"offset": 1}


def test_unserialisable_metadata_and_missing_checkpoint(tmp_path) -> None:
    with pytest.raises(ValueError, match="JSON"):
        _filled().save(tmp_path, metadata={"x": object()})
    with pytest.raises(FileNotFoundError, match="CURRENT"):
        InteractionMatrix.load(tmp_path / "nothing")


def test_format_version_checked(tmp_path) -> None:
    d = _filled().save(tmp_path)
    meta = json.loads((d / "meta.json").read_text())
    meta["format"] = 999
    (d / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="format 999"):
        InteractionMatrix.load(tmp_path)


def test_nbytes_and_estimate() -> None:
    m = InteractionMatrix()
    m.add_batch([f"u{x % 1000}" for x in range(20_000)], [f"i{x % 997}" for x in range(20_000)])
    n_pairs = m.to_csr().nnz
    est = InteractionMatrix.estimate_bytes(n_pairs, *m.shape)
    assert 0 < m.nbytes() <= est
    assert m.nbytes() >= n_pairs * im_mod.BYTES_PER_EVENT
