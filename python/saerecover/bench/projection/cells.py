"""One cell of the grid: every implementation verified against the float64 truth, then timed;
estimates by flop scaling for calls too slow to run."""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from saerecover.bench.projection.environment import cpu_snapshot, other_load, wait_for_quiet
from saerecover.bench.projection.implementations import (
    Impl,
    as_numpy,
    default_rcond,
    encoder_apply_flops,
    encoder_impls,
    encoder_truth,
    jacobian_flops,
    jacobian_impls,
    jacobian_truth,
    qr_flops,
    rel_row_error,
)
from saerecover.bench.projection.options import BASE_TOL, MIN_CALIBRATION_S, QUIET_CORES, Config
from saerecover.bench.projection.report import fmt_time, write_json
from saerecover.bench.projection.timing import time_interleaved


@dataclass
class Context:
    config: Config
    core: Any | None
    peak: dict[str, Any]
    calib: dict[tuple[str, str], tuple[float, float]] = field(default_factory=dict)  # (op, impl) -> (flops, s)
    notes: list[str] = field(default_factory=list)
    errors: int = 0
    meta: dict[str, Any] = field(default_factory=dict)
    done: list[dict[str, Any]] = field(default_factory=list)

    def checkpoint(self, rows: list[dict[str, Any]]) -> None:
        """Keep a finished cell's rows; rewrite --json with everything so far (marked partial),
        so that an interrupted run keeps what it measured."""
        self.done += rows
        if self.config.json_path:
            write_json(self.config.json_path, {**self.meta, "partial": True, "notes": self.notes}, self.done)

    def note(self, text: str) -> int:
        self.notes.append(text)
        print(f"  note [{len(self.notes)}]: {text}", file=sys.stderr, flush=True)
        return len(self.notes)


def _shape_text(shape: dict[str, int]) -> str:
    return ",".join(f"{key}={value}" for key, value in shape.items())


def _estimate(ctx: Context, op: str, name: str, flops: float) -> tuple[float, str] | None:
    """Seconds per call from the fastest call of this implementation's largest measured cell,
    scaled by nominal flops (errs towards running rather than skipping)."""
    entry = ctx.calib.get((op, name))
    if entry is None:
        return None
    ref_flops, ref_s = entry
    if ref_s < MIN_CALIBRATION_S:  # overhead-dominated: linear scaling would overestimate
        return None
    return flops / ref_flops * ref_s, f"scaled by nominal flops from its fastest call of {ref_s:.3g} s in a smaller cell"


def run_cell(
    ctx: Context,
    op: str,
    shape: dict[str, int],
    impls: list[Impl],
    truth: dict[str, Any],
    scale: float,
    flops_of: Callable[[Impl], float],
) -> list[dict[str, Any]]:
    """Verify every implementation against the truth, then time each; one row per implementation."""
    cfg = ctx.config
    dtype = cfg.dtype
    rank = truth["rank"]
    cap = cfg.max_impl_seconds
    rows: dict[str, dict[str, Any]] = {}
    first_call: dict[str, float] = {}
    skip: set[str] = set()
    failures: list[str] = []
    base_tol = BASE_TOL[dtype]

    for impl in impls:
        flops = flops_of(impl)
        row: dict[str, Any] = {
            "op": op,
            **shape,
            "dtype": dtype,
            "impl": impl.name,
            "phase": impl.phase,
            "rank": rank,
            "status": "ok",
            "median_s": None,
            "min_s": None,
            "repeats": 0,
            "flops": flops,
            "gflops": None,
            "frac_peak": None,
            "speedup_of_rust": None,
            "max_err": None,
            "tol": None,
            "note": None,
        }
        rows[impl.name] = row
        # An alternative estimated too slow for min-repeats calls is not run at all.
        est: tuple[float, str] | None = None
        if not impl.anchor:
            if impl.same_as is not None:
                est = (
                    (first_call[impl.same_as], f"the verification call of {impl.same_as}, the same computation")
                    if first_call.get(impl.same_as, 0.0) >= MIN_CALIBRATION_S
                    else None
                )
            elif impl.verify_rows is not None and shape.get("n", 0) <= 4:
                est = None  # a few rows: cheap enough to run whole
            elif impl.verify_rows is not None:
                p = 4
                impl.verify_rows(p)  # warm up
                probes = []
                for _ in range(3):  # the fastest of 3: an estimate that errs towards running
                    t0 = time.perf_counter()
                    partial = as_numpy(impl.verify_rows(p))
                    probes.append(time.perf_counter() - t0)
                per_row = min(probes) / p
                est = (
                    per_row * shape["n"],
                    f"n={shape['n']} x {per_row * 1e3:.3g} ms/row, the fastest of 3 timings of {p} rows",
                )
                tol = base_tol + impl.extra_tol
                err = rel_row_error(partial, truth["Y"][:p], scale) if impl.phase == "apply" else 0.0
                row["max_err"], row["tol"] = err, tol
                if err > tol:
                    failures.append(f"{impl.name} (first {p} rows): error {err:.3g} > tol {tol:.3g}")
            else:
                est = _estimate(ctx, op, impl.name, flops)
            if est is not None and est[0] * cfg.min_repeats > cap:
                skip.add(impl.name)
                row["status"] = "skipped"
                row["est_s"] = est[0]
                idx = ctx.note(
                    f"{op} {_shape_text(shape)} {impl.name}: skipped, estimated {est[0]:.3g} s/call "
                    f"({est[1]}); {cfg.min_repeats} calls exceed --max-impl-seconds {cap:g}"
                )
                row["note"] = f"[{idx}] estimated {est[0]:.3g} s/call ({est[1]}); not run"
                continue
        t0 = time.perf_counter()
        try:
            result = impl.call()
        except Exception as exc:  # a failing implementation fails its cell, not the run
            failures.append(f"{impl.name}: raised {type(exc).__name__}: {exc}")
            row["status"] = "error"
            row["note"] = f"raised {type(exc).__name__}: {exc}"
            continue
        first_call[impl.name] = time.perf_counter() - t0
        if impl.phase == "apply":
            tol = base_tol + impl.extra_tol
            try:
                err = rel_row_error(as_numpy(result), truth["Y"], scale)
            except ValueError as exc:
                failures.append(f"{impl.name}: {exc}")
                row["status"] = "error"
                continue
            row["max_err"], row["tol"] = err, tol
            if not err <= tol:  # also catches NaN
                failures.append(f"{impl.name}: error {err:.3g} > tol {tol:.3g}")
        elif impl.name == "rust_factor":
            got = getattr(result, "rank", rank)
            if got != rank:
                failures.append(f"rust_factor: rank {got}, expected {rank}")
        del result

    if failures:
        ctx.errors += 1
        message = "; ".join(failures)
        print(f"  ERROR {op} {_shape_text(shape)}: implementations disagree: {message}", file=sys.stderr, flush=True)
        for row in rows.values():
            if row["status"] == "ok":
                row["status"] = "error"
                row["note"] = f"cell aborted: {message}"
        return list(rows.values())

    timed: list[Impl] = []
    for impl in impls:
        row = rows[impl.name]
        if row["status"] != "ok":
            continue
        if not impl.anchor and first_call[impl.name] * cfg.min_repeats > cap:
            row["status"] = "skipped"
            row["single_call_s"] = first_call[impl.name]
            idx = ctx.note(
                f"{op} {_shape_text(shape)} {impl.name}: timing skipped, its verification call took "
                f"{first_call[impl.name]:.3g} s; {cfg.min_repeats} calls exceed --max-impl-seconds {cap:g}"
            )
            row["note"] = f"[{idx}] one verification call took {first_call[impl.name]:.3g} s; not timed"
            continue
        timed.append(impl)

    samples = time_interleaved(timed, {i.name: first_call[i.name] for i in timed}, cfg)
    peak = ctx.peak.get(dtype, {}).get("best")
    for impl in timed:
        row, times = rows[impl.name], samples[impl.name]
        med = statistics.median(times)
        row.update(
            median_s=med,
            min_s=min(times),
            repeats=len(times),
            gflops=row["flops"] / med / 1e9 if med > 0 else None,
        )
        if peak and row["gflops"] is not None:
            row["frac_peak"] = row["gflops"] / peak
        prev = ctx.calib.get((op, impl.name))
        if prev is None or row["flops"] >= prev[0]:
            ctx.calib[(op, impl.name)] = (row["flops"], min(times))

    for phase, rust_name in (("apply", "rust"), ("factor", "rust_factor")):
        rust_row = rows.get(rust_name)
        if rust_row is None or not rust_row["median_s"]:
            continue
        for row in rows.values():
            if row["phase"] == phase and row["median_s"] is not None:
                row["speedup_of_rust"] = row["median_s"] / rust_row["median_s"]
    return list(rows.values())


def _make_rng(seed: int, *shape: int) -> np.random.Generator:
    return np.random.default_rng([seed, *shape])


def encoder_cells(ctx: Context) -> list[dict[str, Any]]:
    cfg = ctx.config
    g = cfg.grid
    shapes = [(d, k, n) for d in g["d"] for k in g["k"] for n in g["n"]]
    shapes.sort(key=lambda s: (encoder_apply_flops(s[0], s[2], min(s[0], s[1])), s))  # cheap first
    out: list[dict[str, Any]] = []
    for d, k, n in shapes:
        rng = _make_rng(cfg.seed, 1, d, k, n)
        A = rng.standard_normal((d, k)).astype(cfg.dtype)
        A /= np.linalg.norm(A, axis=0, keepdims=True)  # unit encoder columns
        X = rng.standard_normal((n, d)).astype(cfg.dtype)
        rcond = cfg.rcond if cfg.rcond is not None else default_rcond(A.shape, cfg.dtype)
        truth = encoder_truth(A, X, rcond)
        scale = float(np.sqrt((X.astype(np.float64) ** 2).sum(axis=1)).max())
        impls = [
            i
            for i in encoder_impls(
                A, X, core=ctx.core, rcond=cfg.rcond, ridge=cfg.ridge, kappa=truth["kappa"], sigma_min=truth["sigma_min"]
            )
            if i.name in cfg.impls
        ]
        r = truth["rank"]
        factor_flops = qr_flops(d, k)

        def flops_of(impl: Impl, d: int = d, n: int = n, r: int = r, ff: float = factor_flops) -> float:
            return ff if impl.phase == "factor" else encoder_apply_flops(d, n, r)

        shape = {"d": d, "k": k, "n": n}
        out += measured_cell(ctx, "encoder", shape, impls, truth, scale, flops_of)
    return out


def jacobian_cells(ctx: Context) -> list[dict[str, Any]]:
    cfg = ctx.config
    g = cfg.grid
    shapes = [(m, n, b) for m in g["m"] for n in g["jac_n"] for b in g["batch"]]
    shapes.sort(key=lambda s: (jacobian_flops(s[0], s[1], s[2], min(s[0], s[1])), s))
    out: list[dict[str, Any]] = []
    for m, n, b in shapes:
        rng = _make_rng(cfg.seed, 2, m, n, b)
        J = rng.standard_normal((m, n), dtype=np.float32 if cfg.dtype == "float32" else np.float64)
        G = rng.standard_normal((b, n), dtype=J.dtype)
        rcond = cfg.rcond if cfg.rcond is not None else default_rcond(J.shape, cfg.dtype)
        truth = jacobian_truth(J, G, rcond)
        scale = float(np.sqrt((G.astype(np.float64) ** 2).sum(axis=1)).max())
        impls = [
            i for i in jacobian_impls(J, G, core=ctx.core, rcond=cfg.rcond, kappa=truth["kappa"]) if i.name in cfg.impls
        ]
        flops = jacobian_flops(m, n, b, truth["rank"])
        shape = {"m": m, "n": n, "batch": b}
        out += measured_cell(ctx, "jacobian", shape, impls, truth, scale, lambda impl, f=flops: f)
        del J, G, truth, impls
    return out


def measured_cell(
    ctx: Context,
    op: str,
    shape: dict[str, int],
    impls: list[Impl],
    truth: dict[str, Any],
    scale: float,
    flops_of: Callable[[Impl], float],
) -> list[dict[str, Any]]:
    """`run_cell`, after waiting for a quiet machine (--wait-quiet), recording in every row how
    many cores other processes kept busy meanwhile (`other_load`)."""
    if ctx.config.wait_quiet > 0:
        waited, load = wait_for_quiet(ctx.config.wait_quiet)
        if load is not None and load >= QUIET_CORES:
            print(f"  still {load:.2f} cores busy elsewhere after waiting {waited:.0f} s", file=sys.stderr)
    t0 = time.perf_counter()
    snap = cpu_snapshot()
    rows = run_cell(ctx, op, shape, impls, truth, scale, flops_of)
    load = other_load(snap, cpu_snapshot())
    for row in rows:
        row["other_load"] = load
    _progress(op, shape, rows, time.perf_counter() - t0, load)
    ctx.checkpoint(rows)
    return rows


def _progress(op: str, shape: dict[str, int], rows: list[dict[str, Any]], seconds: float, load: float | None) -> None:
    parts = []
    for row in rows:
        if row["median_s"] is not None:
            parts.append(f"{row['impl']}={fmt_time(row['median_s'])}")
        else:
            parts.append(f"{row['impl']}={row['status']}")
    busy = f" (other processes: {load:.2f} cores)" if load is not None and load >= QUIET_CORES else ""
    print(f"[{op} {_shape_text(shape)}] {seconds:.1f}s{busy}: {' '.join(parts)}", file=sys.stderr, flush=True)
