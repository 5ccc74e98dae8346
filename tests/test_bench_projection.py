"""The projection benchmark: its JSON rows, its honesty about skipped cells, and that every
implementation it times computes the same projection. No timing assertions."""

from __future__ import annotations

import json

import numpy as np
import pytest
from saerecover.bench import projection as bp
from saerecover.bench.projection import environment
from saerecover.bench.projection import implementations
from saerecover.bench.projection import options

TINY = [
    "--d", "48", "--k", "3,7", "--n", "1,9",
    "--m", "4", "--jac-n", "40", "--batch", "1,3",
    "--budget", "0.001", "--min-repeats", "3", "--max-repeats", "4",
    "--peak-size", "64", "--settle", "0", "--rounds", "2",
]  # fmt: skip

ROW_KEYS = {
    "op", "impl", "phase", "dtype", "rank", "status", "median_s", "min_s", "repeats",
    "flops", "gflops", "frac_peak", "speedup_of_rust", "max_err", "tol", "note",
}  # fmt: skip


def _core():
    core, _ = environment.load_core()
    return core


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_tiny_grid_rows_schema(tmp_path, capsys, dtype):
    out = tmp_path / "rows.json"
    assert bp.main([*TINY, "--dtype", dtype, "--json", str(out)]) == 0
    meta, *rows = json.loads(out.read_text())

    assert meta["op"] == "meta"
    for key in ("machine", "versions", "threads", "blas", "env", "peak", "summary", "core", "config"):
        assert key in meta, key
    assert meta["peak"][dtype]["best"] > 0
    assert meta["threads"]["torch"] >= 1

    core = _core()
    enc = [r for r in rows if r["op"] == "encoder"]
    jac = [r for r in rows if r["op"] == "jacobian"]
    enc_impls = {"numpy", "torch", "rowsolve", "numpy_factor", "torch_factor"}
    jac_impls = {"numpy_gram", "numpy_svd", "numpy_pinv", "numpy_lstsq", "torch_gram", "torch_svd", "torch_pinv", "torch_lstsq"}
    if core is not None:
        enc_impls |= {"rust", "rust_torch", "rust_factor"}
        jac_impls |= {"rust", "rust_torch"}
    assert {(r["d"], r["k"], r["n"]) for r in enc} == {(48, k, n) for k in (3, 7) for n in (1, 9)}
    assert {(r["m"], r["n"], r["batch"]) for r in jac} == {(4, 40, 1), (4, 40, 3)}
    for cell in {(r["d"], r["k"], r["n"]) for r in enc}:
        assert {r["impl"] for r in enc if (r["d"], r["k"], r["n"]) == cell} == enc_impls
    for cell in {(r["m"], r["n"], r["batch"]) for r in jac}:
        assert {r["impl"] for r in jac if (r["m"], r["n"], r["batch"]) == cell} == jac_impls

    for row in rows:
        assert ROW_KEYS <= row.keys(), row
        assert row["dtype"] == dtype
        assert row["status"] == "ok", row
        assert row["repeats"] >= 3
        assert row["median_s"] > 0 and row["min_s"] <= row["median_s"]
        assert row["flops"] > 0 and row["gflops"] > 0
        if row["phase"] == "apply":  # every implementation agreed with the float64 truth
            assert row["max_err"] <= row["tol"], row
        if core is not None and row["impl"] not in ("rust", "rust_factor"):
            assert row["speedup_of_rust"] > 0
    assert {r["rank"] for r in enc if r["k"] == 7} == {7}

    text = capsys.readouterr().out
    assert "Encoder null-space projection" in text and "Jacobian null-space projection" in text
    assert "summary:" in text and "GEMM peak" in text


def test_only_and_overrides():
    args = bp.build_parser().parse_args(["--quick", "--only", "jacobian", "--m", "8,9", "--batch", "2"])
    cfg = options.Config.from_args(args)
    assert cfg.ops == ("jacobian",)
    assert cfg.grid["m"] == [8, 9] and cfg.grid["batch"] == [2]
    assert cfg.grid["jac_n"] == options.QUICK_GRID["jac_n"]
    full = options.Config.from_args(bp.build_parser().parse_args([]))
    assert full.grid == options.DEFAULT_GRID and full.dtype == "float32"
    with pytest.raises(SystemExit):
        bp.build_parser().parse_args(["--impls", "nonsense"])


def test_too_slow_alternatives_are_skipped_not_invented(tmp_path):
    out = tmp_path / "rows.json"
    argv = [*TINY, "--only", "encoder", "--k", "3", "--n", "9", "--max-impl-seconds", "1e-9", "--json", str(out)]
    assert bp.main(argv) == 0
    _, *rows = json.loads(out.read_text())
    by_impl = {r["impl"]: r for r in rows}
    ref = by_impl["rowsolve"]
    assert ref["status"] == "skipped" and ref["median_s"] is None and ref["repeats"] == 0
    assert ref["est_s"] > 0 and "estimated" in ref["note"]
    assert ref["max_err"] <= ref["tol"]  # the rows it did compute were still verified
    for name in ("numpy_factor", "torch_factor", "rust_torch"):  # verified, then not timed
        if name in by_impl:
            row = by_impl[name]
            assert row["status"] == "skipped" and row["median_s"] is None and row["single_call_s"] > 0
    # never skipped: the core and the cheapest NumPy / torch formulation
    for name in ("rust", "rust_factor", "numpy", "torch"):
        if name in by_impl:
            assert by_impl[name]["status"] == "ok" and by_impl[name]["repeats"] >= 3


def _encoder_problem(dtype, d=40, k=6, n=5, duplicate=False, seed=0):
    rng = np.random.default_rng(seed)
    A = rng.standard_normal((d, k)).astype(dtype)
    A /= np.linalg.norm(A, axis=0, keepdims=True)
    if duplicate:  # a rank-deficient feature set: one column repeated
        A[:, -1] = A[:, 0]
    X = rng.standard_normal((n, d)).astype(dtype)
    return A, X


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("duplicate", [False, True])
def test_encoder_impls_agree(dtype, duplicate):
    A, X = _encoder_problem(dtype, duplicate=duplicate)
    rcond = implementations.default_rcond(A.shape, dtype)
    truth = implementations.encoder_truth(A, X, rcond)
    assert truth["rank"] == A.shape[1] - int(duplicate)
    # with a repeated column, the ridge bias depends on the smallest *non-zero* singular value
    impls = implementations.encoder_impls(A, X, core=_core(), rcond=None, ridge=options.REFERENCE_RIDGE, kappa=truth["kappa"], sigma_min=truth["sigma_min"])
    scale = float(np.linalg.norm(X.astype(np.float64), axis=1).max())
    results = {i.name: implementations.as_numpy(i.call()) for i in impls if i.phase == "apply"}
    assert {"numpy", "torch", "rowsolve"} <= results.keys()
    for impl in impls:
        if impl.phase != "apply":
            continue
        Y = results[impl.name]
        assert Y.shape == X.shape and Y.dtype == X.dtype, impl.name
        err = implementations.rel_row_error(Y, truth["Y"], scale)
        assert err <= options.BASE_TOL[dtype] + impl.extra_tol, (impl.name, err)
        assert np.abs(Y.astype(np.float64) @ A.astype(np.float64)).max() <= 1e-3 * scale + impl.extra_tol * scale
    # pairwise: the exact formulations agree with each other to the base tolerance
    exact = [name for name in results if name != "rowsolve"]
    for a in exact:
        for b in exact:
            assert implementations.rel_row_error(results[a], results[b].astype(np.float64), scale) <= 2 * options.BASE_TOL[dtype]
    # the per-row reference on its first rows equals its full call
    ref = next(i for i in impls if i.name == "rowsolve")
    np.testing.assert_allclose(implementations.as_numpy(ref.verify_rows(2)), results["rowsolve"][:2], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("shape", [(5, 60, 1), (5, 60, 4), (12, 30, 3)])
def test_jacobian_impls_agree(dtype, shape):
    m, n, b = shape
    rng = np.random.default_rng(1)
    J = rng.standard_normal((m, n)).astype(dtype)
    G = rng.standard_normal((b, n)).astype(dtype)
    truth = implementations.jacobian_truth(J, G, implementations.default_rcond(J.shape, dtype))
    assert truth["rank"] == min(m, n)
    impls = implementations.jacobian_impls(J, G, core=_core(), rcond=None, kappa=truth["kappa"])
    scale = float(np.linalg.norm(G.astype(np.float64), axis=1).max())
    names = set()
    for impl in impls:
        Y = implementations.as_numpy(impl.call())
        names.add(impl.name)
        assert Y.shape == G.shape and Y.dtype == G.dtype, impl.name
        err = implementations.rel_row_error(Y, truth["Y"], scale)
        assert err <= options.BASE_TOL[dtype] + impl.extra_tol, (impl.name, err)
    assert {"numpy_gram", "numpy_svd", "numpy_pinv", "numpy_lstsq", "torch_gram", "torch_svd", "torch_pinv", "torch_lstsq"} <= names


def test_disagreement_aborts_the_cell(monkeypatch, tmp_path):
    """A wrong implementation makes its cell an error (exit status 1), and nothing is timed."""
    real = implementations.numpy_encoder_apply
    monkeypatch.setattr(implementations, "numpy_encoder_apply", lambda X, U: real(X, U[:, :-1]))  # drops a direction
    out = tmp_path / "rows.json"
    argv = [*TINY, "--only", "encoder", "--k", "3", "--n", "9", "--json", str(out)]
    assert bp.main(argv) == 1
    _, *rows = json.loads(out.read_text())
    assert rows and all(r["status"] == "error" and r["median_s"] is None for r in rows)
    assert any("numpy" in (r["note"] or "") for r in rows)


def test_flop_counts():
    assert implementations.encoder_apply_flops(d=10, n=3, r=2) == 4 * 3 * 10 * 2
    assert implementations.qr_flops(100, 10) == pytest.approx(2 * 10 * 10 * (100 - 10 / 3))
    assert implementations.qr_flops(10, 100) == implementations.qr_flops(100, 10)
    assert implementations.jacobian_flops(m=4, n=50, b=2, r=4) == pytest.approx(implementations.qr_flops(50, 4) + 4 * 2 * 50 * 4)


def test_report_merges_json_files(tmp_path, capsys):
    enc, jac = tmp_path / "enc.json", tmp_path / "jac.json"
    assert bp.main([*TINY, "--only", "encoder", "--k", "3", "--n", "9", "--max-impl-seconds", "1e-9", "--json", str(enc)]) == 0
    assert bp.main([*TINY, "--only", "jacobian", "--batch", "1", "--json", str(jac)]) == 0
    capsys.readouterr()
    assert bp.main(["--report", str(enc), str(jac)]) == 0
    text = capsys.readouterr().out
    assert "merged from" in text
    assert "Encoder null-space projection" in text and "Jacobian null-space projection" in text
    assert "skip[1]" in text and "[1] encoder" in text
