"""The benchmark's report: the per-cell table with ratios against the best alternative, GFLOP/s
against the GEMM peak, and the summary lines."""

from __future__ import annotations

import json
import os
import statistics
from collections.abc import Callable
from typing import Any, Sequence

import numpy as np

from saerecover.bench.projection.options import (
    ENCODER_APPLY_IMPLS,
    ENCODER_FACTOR_IMPLS,
    JACOBIAN_IMPLS,
    QUIET_CORES,
    Config,
)


def fmt_time(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 1e-3:
        return f"{seconds * 1e6:.3g}us"
    if seconds < 1.0:
        return f"{seconds * 1e3:.3g}ms"
    return f"{seconds:.3g}s"


def _fmt_ratio(ratio: float | None) -> str:
    if ratio is None:
        return ""
    return f"{ratio:.3g}x" if ratio < 100 else f"{ratio:.0f}x"


def _cell_text(row: dict[str, Any] | None, with_ratio: bool) -> str:
    if row is None:
        return "n/a"
    if row["status"] == "skipped":
        mark = row.get("note", "") or ""
        ref = mark.split("]", 1)[0] + "]" if mark.startswith("[") else ""
        return f"skip{ref}"
    if row["status"] == "error":
        return "ERROR"
    text = fmt_time(row["median_s"])
    if with_ratio and row.get("speedup_of_rust") is not None:
        text += " " + _fmt_ratio(row["speedup_of_rust"])
    return text


def _table(headers: list[str], body: list[list[str]]) -> list[str]:
    widths = [max([len(h)] + [len(r[i]) for r in body]) for i, h in enumerate(headers)]

    def fmt(cells: list[str]) -> str:
        return "  ".join(c.rjust(w) for c, w in zip(cells, widths))

    return [fmt(headers), "  ".join("-" * w for w in widths), *(fmt(r) for r in body)]


def _index(rows: list[dict[str, Any]], keys: tuple[str, ...]) -> dict[tuple[int, ...], dict[str, dict[str, Any]]]:
    cells: dict[tuple[int, ...], dict[str, dict[str, Any]]] = {}
    for row in rows:
        cells.setdefault(tuple(row[k] for k in keys), {})[row["impl"]] = row
    return dict(sorted(cells.items()))


def _busy_mark(cell: dict[str, dict[str, Any]]) -> str:
    loads = [r.get("other_load") for r in cell.values() if r.get("other_load") is not None]
    return "*" if loads and max(loads) >= QUIET_CORES else ""


def _gf_text(row: dict[str, Any] | None) -> tuple[str, str]:
    if row is None or row.get("gflops") is None:
        return "-", "-"
    frac = row.get("frac_peak")
    return f"{row['gflops']:.3g}", (f"{100 * frac:.3g}%" if frac is not None else "-")


def format_report(meta: dict[str, Any], rows: list[dict[str, Any]], config: Config, notes: Sequence[str]) -> str:
    """The whole report: setup, the per-cell tables, the summary and the numbered notes."""
    cfg = config
    peak = meta["peak"]
    out: list[str] = []
    m = meta
    out.append("saerecover projection benchmark")
    out.append(
        f"machine: {m['machine']['cpu']} ({m['machine']['logical_cpus']} logical CPUs; "
        f"{' '.join(m['machine']['cpu_flags'])})"
    )
    others = m.get("other_processes_cores")
    load0 = m.get("loadavg_start")
    if others is not None or load0:
        out.append(
            (f"other processes kept {others:.2f} cores busy on average during the run" if others is not None else "")
            + (f"; load average at start {load0[0]:.2f}" if load0 else "")
            + ("  WARNING: timings are disturbed by other load" if others is not None and others > 0.1 else "")
        )
    out.append(
        "versions: "
        + ", ".join(f"{k} {v}" for k, v in m["versions"].items())
        + f"; Rust core: {'yes' if m['core']['available'] else 'NOT AVAILABLE (' + m['core'].get('error', '') + ')'}"
    )
    th = m["threads"]
    blas = m["blas"]["numpy"]
    blas_txt = "; ".join(
        f"{b.get('internal_api')} {b.get('version')} kernel={b.get('architecture')} threads={b.get('num_threads')}"
        for b in blas
        if b.get("user_api") == "blas"
    ) or "unknown"
    out.append(
        f"threads: torch {th['torch']} (interop {th['torch_interop']}), rayon {th['rayon_effective']} "
        f"(RAYON_NUM_THREADS={th['RAYON_NUM_THREADS'] or 'unset'}); NumPy BLAS: {blas_txt}; torch BLAS: {m['blas']['torch']}"
    )
    env = m["env"]
    out.append(
        f"env: OPENBLAS_CORETYPE={env['OPENBLAS_CORETYPE'] or 'unset'} OPENBLAS_L2_SIZE={env['OPENBLAS_L2_SIZE'] or 'unset'}"
        + (
            "  (set: NumPy may run a slower kernel; see docs/benchmarks.md)"
            if env["OPENBLAS_CORETYPE"] or env["OPENBLAS_L2_SIZE"]
            else ""
        )
    )
    out.append(
        f"GEMM peak ({peak['size']}^3, best of NumPy/torch, at start and end): "
        + ", ".join(
            f"{dt} {peak[dt]['best']:.1f} GFLOP/s (numpy {peak[dt]['numpy']:.1f}, torch {peak[dt]['torch']:.1f})"
            for dt in ("float32", "float64")
        )
    )
    out.append(
        f"dtype {cfg.dtype}; budget {cfg.budget:g} s per impl per cell, >= {cfg.min_repeats} calls, median "
        f"reported; implementations other than rust, numpy, torch and the Gram forms are skipped when "
        f"{cfg.min_repeats} calls are estimated > {cfg.max_impl_seconds:g} s"
    )
    out.append("cells: median time per call, then alt_time / rust_time (>1: the Rust core is faster)")

    enc = [r for r in rows if r["op"] == "encoder"]
    if enc:
        out.append("")
        out.append("Encoder null-space projection  Y = X - (X U_r) U_r^T   (apply: basis prebuilt)")
        headers = ["d", "k", "n", "rust", "rust(torch)", "numpy", "torch", "rowsolve(ref)", "GF/s", "%peak",
                   "fact:rust", "fact:numpy", "fact:torch"]
        body = []
        for (d, k, n), cell in _index(enc, ("d", "k", "n")).items():
            gf, pk = _gf_text(cell.get("rust"))
            body.append(
                [str(d), str(k), str(n) + _busy_mark(cell)]
                + [_cell_text(cell.get(name), name != "rust") for name in ENCODER_APPLY_IMPLS]
                + [gf, pk]
                + [_cell_text(cell.get(name), name != "rust_factor") for name in ENCODER_FACTOR_IMPLS]
            )
        out += _table(headers, body)
    jac = [r for r in rows if r["op"] == "jacobian"]
    if jac:
        out.append("")
        out.append("Jacobian null-space projection  Y = G - G J^T (J J^T)^+ J   (factorization of J in every call)")
        headers = ["m", "n", "b", "rust", "rust(torch)", "np:gram", "np:svd", "np:pinv", "np:lstsq",
                   "t:gram", "t:svd", "t:pinv", "t:lstsq", "GF/s", "%peak"]
        body = []
        for (mm, n, b), cell in _index(jac, ("m", "n", "batch")).items():
            gf, pk = _gf_text(cell.get("rust"))
            body.append(
                [str(mm), str(n), str(b) + _busy_mark(cell)]
                + [_cell_text(cell.get(name), name != "rust") for name in JACOBIAN_IMPLS]
                + [gf, pk]
            )
        out += _table(headers, body)
    busy = [r for r in rows if (r.get("other_load") or 0.0) >= QUIET_CORES]
    if busy:
        cells = {(r["op"], *(r[k] for k in (("d", "k", "n") if r["op"] == "encoder" else ("m", "n", "batch")))) for r in busy}
        worst = max(r["other_load"] for r in busy)
        out.append("")
        out.append(
            f"* {len(cells)} cell(s) ran while other processes kept >= {QUIET_CORES} cores busy "
            f"(up to {worst:.2f}): their times are disturbed (rerun them with --wait-quiet or explicit shapes)"
        )
    if notes:
        out.append("")
        out.append("notes:")
        out += [f"  [{i}] {text}" for i, text in enumerate(notes, 1)]
    out.append("")
    out += summary_lines(rows, peak, cfg.dtype)
    return "\n".join(out)


def _best(
    cell: dict[str, dict[str, Any]], prefix: str, phase: str = "apply", exclude_gram: bool = False
) -> dict[str, Any] | None:
    cands = [
        r
        for name, r in cell.items()
        if (name == prefix or name.startswith(prefix + "_"))
        and r["phase"] == phase
        and r["median_s"] is not None
        and not (exclude_gram and name.endswith("_gram"))
    ]
    return min(cands, key=lambda r: r["median_s"]) if cands else None


def summary(rows: list[dict[str, Any]], peak: dict[str, Any], dtype: str) -> dict[str, Any]:
    """The headline numbers: rust vs best NumPy / torch, vs the per-row solve, fraction of peak."""
    out: dict[str, Any] = {}
    cells = {
        "encoder": _index([r for r in rows if r["op"] == "encoder"], ("d", "k", "n")),
        "jacobian": _index([r for r in rows if r["op"] == "jacobian"], ("m", "n", "batch")),
    }
    for lib, label, no_gram in (("numpy", "numpy", False), ("torch", "torch", False), ("numpy", "numpy_no_gram", True)):
        ratios: dict[str, list[tuple[float, tuple[int, ...], str]]] = {"encoder": [], "jacobian": []}
        for op, op_cells in cells.items():
            if no_gram and op != "jacobian":
                continue
            for key, cell in op_cells.items():
                rust = cell.get("rust")
                best = _best(cell, lib, exclude_gram=no_gram)
                if rust and rust["median_s"] and best:
                    ratios[op].append((best["median_s"] / rust["median_s"], key, best["impl"]))
        both = ratios["encoder"] + ratios["jacobian"]
        out[f"vs_best_{label}"] = {
            "median": statistics.median(r for r, _, _ in both) if both else None,
            "cells": len(both),
            **{f"median_{op}": (statistics.median(r for r, _, _ in v) if v else None) for op, v in ratios.items()},
            "slower_cells": [
                {"op": op, "shape": list(key), "ratio": r, "best": impl}
                for op, v in ratios.items()
                for r, key, impl in v
                if r < 1.0
            ],
        }
    row_ratios, row_skipped = [], []
    for key, cell in cells["encoder"].items():
        if key[2] < 64:
            continue
        ref = cell.get("rowsolve")
        rust = cell.get("rust")
        if ref is None or rust is None or not rust["median_s"]:
            continue
        if ref["median_s"] is not None:
            row_ratios.append((ref["median_s"] / rust["median_s"], key))
        elif ref["status"] == "skipped":
            est = ref.get("est_s") or ref.get("single_call_s")
            row_skipped.append((key, est / rust["median_s"] if est else None))
    lo = min(row_ratios) if row_ratios else None
    out["vs_rowsolve_n_ge_64"] = {
        "min": lo[0] if lo else None,
        "at": list(lo[1]) if lo else None,
        "measured_cells": len(row_ratios),
        "below_10x": [{"shape": list(k), "ratio": r} for r, k in row_ratios if r < 10],
        "skipped_cells": [{"shape": list(k), "estimated_ratio": e} for k, e in row_skipped],
    }
    pk = peak.get(dtype, {}).get("best")
    largest: dict[str, Any] = {}
    for op, op_cells in cells.items():
        measured = [(c["rust"]["flops"], key, c["rust"]) for key, c in op_cells.items() if c.get("rust") and c["rust"]["median_s"]]
        if measured:
            _, key, row = max(measured)
            largest[op] = {"shape": list(key), "gflops": row["gflops"], "frac_peak": row["gflops"] / pk if pk else None}
    out["largest"] = largest
    out["peak_gflops"] = pk
    return out


def _worst(cells: list[dict[str, Any]], fmt: Callable[[dict[str, Any]], str], show: int = 6) -> str:
    """The `show` lowest-ratio cells, worst first, and how many more (all are in the JSON)."""
    ordered = sorted(cells, key=lambda c: c["ratio"])
    text = ", ".join(fmt(c) for c in ordered[:show])
    return text + (f", and {len(ordered) - show} more (see the JSON)" if len(ordered) > show else "")


def summary_lines(rows: list[dict[str, Any]], peak: dict[str, Any], dtype: str) -> list[str]:
    s = summary(rows, peak, dtype)
    lines = ["summary:"]
    if not any(r["impl"] == "rust" and r["median_s"] for r in rows):
        lines.append("  Rust core not measured (saerecover.linalg unavailable or excluded): no ratios.")
        return lines

    def fr(x: float | None) -> str:
        return "n/a" if x is None else f"{x:.3g}x"

    for lib in ("numpy", "torch"):
        v = s[f"vs_best_{lib}"]
        slower = v["slower_cells"]
        lines.append(
            f"  rust vs best {lib} (best_{lib}_time / rust_time): median over {v['cells']} cells {fr(v['median'])} "
            f"(encoder {fr(v['median_encoder'])}, jacobian {fr(v['median_jacobian'])}); "
            f"rust slower in {len(slower)} cell(s)"
            + (": " + _worst(slower, lambda c: f"{c['op']} {tuple(c['shape'])} {c['ratio']:.2f}x vs {c['best']}") if slower else "")
        )
    v = s["vs_best_numpy_no_gram"]
    if v["cells"]:
        lines.append(
            f"  jacobian, rust vs best NumPy without the Gram form (svd / pinv / lstsq, which keep cond(J) "
            f"unsquared like the core): median over {v['cells']} cells {fr(v['median'])}; rust slower in "
            f"{len(v['slower_cells'])} cell(s)"
            + (": " + _worst(v["slower_cells"], lambda c: f"{tuple(c['shape'])} {c['ratio']:.2f}x vs {c['best']}") if v["slower_cells"] else "")
        )
    v = s["vs_rowsolve_n_ge_64"]
    at = tuple(v["at"]) if v["at"] else None
    lines.append(
        f"  rust vs per-row reference solve, n >= 64: min {fr(v['min'])} at (d,k,n)={at} over {v['measured_cells']} "
        f"measured cells; {len(v['skipped_cells'])} cell(s) skipped as too slow"
        + (
            " (estimated ratios " + ", ".join(fr(c["estimated_ratio"]) for c in v["skipped_cells"]) + ")"
            if v["skipped_cells"]
            else ""
        )
        + (f"; below 10x: {', '.join(str(tuple(c['shape'])) for c in v['below_10x'])}" if v["below_10x"] else "")
    )
    for op, info in s["largest"].items():
        frac = info["frac_peak"]
        lines.append(
            f"  largest {op} shape {tuple(info['shape'])}: rust {info['gflops']:.3g} GFLOP/s"
            + (f" = {100 * frac:.3g}% of the {dtype} GEMM peak {s['peak_gflops']:.1f} GFLOP/s" if frac else "")
        )
    return lines


def write_json(path: str, meta: dict[str, Any], rows: list[dict[str, Any]]) -> None:
    """The meta row then the rows, as one JSON list (written to a temporary file, then renamed)."""
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump([meta, *rows], fh, indent=1, default=_json_default)
        fh.write("\n")
    os.replace(tmp, path)


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return float(obj)
    if isinstance(obj, (tuple, set)):
        return list(obj)
    return str(obj)
