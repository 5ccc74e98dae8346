"""Projection benchmark: the Rust core against NumPy, torch and the paper's per-row solve.

Times, in one run and on the same inputs, the two null-space projections of PAPER_NOTES.md:

* encoder (C1): ``Y = X - (X U_r) U_r^T`` with ``U_r`` an orthonormal basis of span(A_S),
  ``A_S: (d, k)`` selected encoder columns, ``X: (n, d)`` rows. The Rust core is timed with its
  basis prebuilt (the factorization is timed separately, once per feature set);
* Jacobian: ``Y = G - G J^T (J J^T)^+ J`` for ``J: (m, n)`` and a batch ``G: (b, n)``; J changes
  every optimizer step, so every implementation is timed factorization included.

Every cell is first checked against a float64 ground truth (all implementations must agree);
then each implementation is timed with adaptive repetitions (a time budget per cell, at least
``--min-repeats`` calls, the median reported). Wired into the CLI as ``saerecover bench`` via
``add_arguments`` and ``run_from_args``; ``main(argv)`` is the stand-alone entry point.
docs/benchmarks.md explains the columns and how to read the ratios.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

# The reference implementation's ridge (Mingyuee88/sae-post-intervention-recovery,
# recovery_core/core.py: project_to_encoder_null(..., ridge=1e-4)).
REFERENCE_RIDGE = 1e-4

DEFAULT_GRID: dict[str, list[int]] = {
    "d": [768, 2304, 4096],
    "k": [8, 64, 512],
    "n": [1, 64, 4096],
    "m": [16, 256, 2048],
    "jac_n": [2304, 6912, 65536],
    "batch": [1, 16],
}
QUICK_GRID: dict[str, list[int]] = {
    "d": [768],
    "k": [8, 64],
    "n": [1, 64],
    "m": [16],
    "jac_n": [2304],
    "batch": [1, 16],
}

ENCODER_APPLY_IMPLS = ("rust", "rust_torch", "numpy", "torch", "rowsolve")
ENCODER_FACTOR_IMPLS = ("rust_factor", "numpy_factor", "torch_factor")
JACOBIAN_IMPLS = (
    "rust",
    "rust_torch",
    "numpy_gram",
    "numpy_svd",
    "numpy_pinv",
    "numpy_lstsq",
    "torch_gram",
    "torch_svd",
    "torch_pinv",
    "torch_lstsq",
)
ALL_IMPLS = tuple(dict.fromkeys(ENCODER_APPLY_IMPLS + ENCODER_FACTOR_IMPLS + JACOBIAN_IMPLS))

# Estimates by flop scaling only from calls at least this long (shorter ones are mostly overhead).
MIN_CALIBRATION_S = 0.05

# Other processes using at least this many cores disturb a cell (marked in the table).
QUIET_CORES = 0.15

# Calls at least this long count their verification call as the first timed call.
SLOW_CALL_S = 1.0

# Verification tolerance on max_i ||y_i - y_i*|| / max_i ||x_i|| (per-row error relative to the
# largest input row), before any formulation-specific allowance.
BASE_TOL = {"float32": 2e-4, "float64": 1e-10}


# --------------------------------------------------------------------------------------------
# options


def _int_list(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from exc
    if not values or any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _name_list(text: str) -> list[str]:
    names = [part.strip() for part in text.split(",") if part.strip()]
    unknown = [name for name in names if name not in ALL_IMPLS]
    if unknown:
        raise argparse.ArgumentTypeError(
            f"unknown implementation(s) {unknown}; choose from {', '.join(ALL_IMPLS)}"
        )
    return names


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the projection benchmark's options to `parser` (used by `saerecover bench`)."""
    parser.add_argument("--only", choices=("encoder", "jacobian"), help="run one projection only")
    parser.add_argument(
        "--quick", action="store_true", help="a small grid and short budgets (well under a minute)"
    )
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    shapes = parser.add_argument_group("shapes (comma-separated; override the grid)")
    shapes.add_argument("--d", type=_int_list, help="encoder: model width d (default 768,2304,4096)")
    shapes.add_argument("--k", type=_int_list, help="encoder: selected features k (default 8,64,512)")
    shapes.add_argument("--n", type=_int_list, help="encoder: rows n of X (default 1,64,4096)")
    shapes.add_argument("--m", type=_int_list, help="jacobian: defended coordinates m (default 16,256,2048)")
    shapes.add_argument(
        "--jac-n", type=_int_list, dest="jac_n", help="jacobian: perturbation size n (default 2304,6912,65536)"
    )
    shapes.add_argument("--batch", type=_int_list, help="jacobian: vectors per call b (default 1,16)")
    timing = parser.add_argument_group("timing")
    timing.add_argument(
        "--budget", type=float, help="seconds of timed calls per implementation per cell (default 0.4; quick 0.05)"
    )
    timing.add_argument("--min-repeats", type=int, default=3, help="timed calls at least (default 3)")
    timing.add_argument("--max-repeats", type=int, default=2000, help="timed calls at most (default 2000)")
    timing.add_argument(
        "--max-impl-seconds",
        type=float,
        help="skip an implementation in a cell when min-repeats calls are estimated to take longer than "
        "this; never the Rust core nor the cheapest NumPy and torch formulations (default 15; quick 3)",
    )
    timing.add_argument(
        "--rounds",
        type=int,
        default=5,
        help="the budget is spent in this many interleaved rounds over the implementations (default 5)",
    )
    timing.add_argument(
        "--settle",
        type=float,
        help="seconds to sleep before each implementation's block of calls, so that the worker threads "
        "of the library timed before (OpenBLAS, OpenMP, rayon) stop spinning (default 0.02)",
    )
    timing.add_argument(
        "--peak-size", type=int, help="size of the square GEMM that measures the peak (default 2048; quick 512)"
    )
    timing.add_argument(
        "--wait-quiet",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="before each cell, wait up to this long for other processes to leave the CPUs idle "
        f"(< {QUIET_CORES} cores busy); cells run while others were busy are marked '*' either way",
    )
    parser.add_argument(
        "--impls", type=_name_list, help=f"only these implementations (comma-separated): {', '.join(ALL_IMPLS)}"
    )
    parser.add_argument(
        "--threads",
        type=int,
        help="threads for every library: torch.set_num_threads, the NumPy BLAS (threadpoolctl) and "
        "RAYON_NUM_THREADS (default: leave each as configured)",
    )
    parser.add_argument("--rcond", type=float, help="rank tolerance passed to every implementation")
    parser.add_argument(
        "--ridge", type=float, default=REFERENCE_RIDGE, help="ridge of the per-row reference solve (default 1e-4)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", metavar="PATH", help="write the rows (and a leading meta row) as JSON")
    parser.add_argument(
        "--report",
        nargs="+",
        metavar="JSON",
        help="run nothing: print the table and summary of earlier --json files, merged",
    )
    return parser


@dataclass
class Config:
    """Resolved options of one benchmark run."""

    ops: tuple[str, ...]
    dtype: str
    grid: dict[str, list[int]]
    budget: float
    min_repeats: int
    max_repeats: int
    max_impl_seconds: float
    peak_size: int
    settle: float
    rounds: int
    wait_quiet: float
    impls: tuple[str, ...]
    threads: int | None
    rcond: float | None
    ridge: float
    seed: int
    json_path: str | None
    quick: bool

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "Config":
        base = QUICK_GRID if args.quick else DEFAULT_GRID
        grid = {key: list(getattr(args, key) or base[key]) for key in base}
        ops = (args.only,) if args.only else ("encoder", "jacobian")
        return cls(
            ops=ops,
            dtype=args.dtype,
            grid=grid,
            budget=args.budget if args.budget is not None else (0.05 if args.quick else 0.4),
            min_repeats=max(1, args.min_repeats),
            max_repeats=max(args.max_repeats, args.min_repeats, 1),
            max_impl_seconds=(
                args.max_impl_seconds if args.max_impl_seconds is not None else (3.0 if args.quick else 15.0)
            ),
            peak_size=args.peak_size or (512 if args.quick else 2048),
            settle=args.settle if args.settle is not None else 0.02,
            rounds=max(1, args.rounds),
            wait_quiet=max(0.0, args.wait_quiet),
            impls=tuple(args.impls) if args.impls else ALL_IMPLS,
            threads=args.threads,
            rcond=args.rcond,
            ridge=args.ridge,
            seed=args.seed,
            json_path=args.json,
            quick=args.quick,
        )


# --------------------------------------------------------------------------------------------
# environment


def _load_core() -> tuple[Any | None, str]:
    """saerecover.linalg if it imports (and has the two entry points), else None and why."""
    try:
        from saerecover import linalg  # noqa: PLC0415 - optional until the extension is built
    except Exception as exc:  # ImportError, or a broken extension
        return None, f"{type(exc).__name__}: {exc}"
    missing = [n for n in ("EncoderNullProjector", "jacobian_null_project") if not hasattr(linalg, n)]
    if missing:
        return None, f"saerecover.linalg lacks {', '.join(missing)}"
    return linalg, ""


def _apply_threads(threads: int | None) -> Any:
    """Pin every library to `threads` (None: leave as configured); returns a threadpoolctl guard."""
    if threads is None:
        return None
    import torch

    os.environ["RAYON_NUM_THREADS"] = str(threads)  # read when rayon's global pool starts
    torch.set_num_threads(threads)
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return None
    return threadpool_limits(limits=threads, user_api="blas")


def _blas_info() -> list[dict[str, Any]]:
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        info: list[dict[str, Any]] = []
        try:
            cfg = np.show_config(mode="dicts")  # type: ignore[call-arg]
            blas = cfg.get("Build Dependencies", {}).get("blas", {})
            info.append(
                {
                    "user_api": "blas",
                    "internal_api": blas.get("name"),
                    "version": blas.get("version"),
                    "architecture": "unknown (install threadpoolctl to see the kernel)",
                    "num_threads": None,
                    "source": "numpy.show_config",
                }
            )
        except Exception:  # older NumPy without mode="dicts"
            pass
        return info
    keys = ("user_api", "internal_api", "prefix", "version", "architecture", "num_threads", "threading_layer")
    return [{key: entry.get(key) for key in keys} for entry in threadpool_info()]


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cpu_flags() -> list[str]:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("flags"):
                    flags = line.split(":", 1)[1].split()
                    return sorted(f for f in flags if f.startswith(("avx", "fma")))
    except OSError:
        pass
    return []


def cpu_snapshot() -> tuple[float, float, float] | None:
    """(wall s, busy CPU-seconds of the whole machine, CPU-seconds of this process), or None."""
    try:
        import resource

        with open("/proc/stat", encoding="utf-8") as fh:
            fields = [int(v) for v in fh.readline().split()[1:]]
        tick = os.sysconf("SC_CLK_TCK")
        busy = (sum(fields[:8]) - fields[3] - fields[4]) / tick  # all but idle and iowait
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return time.perf_counter(), busy, usage.ru_utime + usage.ru_stime
    except (OSError, ValueError, ImportError, IndexError):
        return None


def other_load(start: tuple[float, float, float] | None, end: tuple[float, float, float] | None) -> float | None:
    """Average number of cores that *other* processes kept busy between two snapshots."""
    if start is None or end is None or end[0] <= start[0]:
        return None
    return max(0.0, ((end[1] - start[1]) - (end[2] - start[2])) / (end[0] - start[0]))


def collect_meta(core: Any | None, core_error: str) -> dict[str, Any]:
    """Machine, versions, threads and BLAS configuration, for the header and the JSON meta row."""
    import torch

    torch_cfg = torch.__config__.show()
    torch_blas = next(
        (part.split("=", 1)[1] for part in torch_cfg.replace(",", " ").split() if part.startswith("BLAS_INFO=")),
        "unknown",
    )
    try:
        from saerecover import __version__ as sr_version
    except Exception:
        sr_version = "unknown"
    core_info: dict[str, Any] = {"available": core is not None}
    if core is None:
        core_info["error"] = core_error
    else:
        ext = sys.modules.get("saerecover._core")
        core_info["module"] = getattr(ext, "__file__", None)
    return {
        "op": "meta",
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "loadavg_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "machine": {
            "cpu": _cpu_model(),
            "cpu_flags": _cpu_flags(),
            "logical_cpus": os.cpu_count(),
            "affinity_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
            "platform": platform.platform(),
        },
        "versions": {
            "python": platform.python_version(),
            "numpy": np.__version__,
            "torch": torch.__version__,
            "saerecover": sr_version,
        },
        "threads": {
            "torch": torch.get_num_threads(),
            "torch_interop": torch.get_num_interop_threads(),
            "RAYON_NUM_THREADS": os.environ.get("RAYON_NUM_THREADS"),
            "rayon_effective": int(os.environ["RAYON_NUM_THREADS"])
            if os.environ.get("RAYON_NUM_THREADS", "").isdigit()
            else os.cpu_count(),
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
            "OPENBLAS_NUM_THREADS": os.environ.get("OPENBLAS_NUM_THREADS"),
        },
        "env": {
            key: os.environ.get(key)
            for key in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE", "OPENBLAS_VERBOSE", "MKL_NUM_THREADS")
        },
        "blas": {"numpy": _blas_info(), "torch": torch_blas},
        "core": core_info,
    }


# --------------------------------------------------------------------------------------------
# timing


def time_calls(fn: Callable[[], Any], budget: float, min_repeats: int, max_repeats: int) -> list[float]:
    """Wall-clock seconds of repeated calls: at least `min_repeats`, then until `budget` is spent."""
    times: list[float] = []
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        start = time.perf_counter()
        while True:
            t0 = time.perf_counter()
            fn()
            t1 = time.perf_counter()
            times.append(t1 - t0)
            if len(times) >= max_repeats:
                break
            if len(times) >= min_repeats and t1 - start >= budget:
                break
    finally:
        if gc_was_enabled:
            gc.enable()
    return times


def time_interleaved(impls: list[Any], first_call: dict[str, float], cfg: "Config") -> dict[str, list[float]]:
    """Per-call seconds of each implementation, timed in `cfg.rounds` interleaved rounds.

    Each round gives every implementation `budget / rounds` seconds (order reversed every other
    round), so that a burst of load from elsewhere, or a library's threads still spinning, hits
    all implementations alike rather than one. Before each block: `cfg.settle` seconds of sleep
    and, for calls under 10 ms, one untimed call. An implementation whose calls take longer than
    a round's share stops once it has `min_repeats` calls. A call of a second or more is its own
    warm-up: its verification call counts as the first sample.
    """
    rounds = max(1, cfg.rounds)
    share = cfg.budget / rounds
    per_round_max = max(1, math.ceil(cfg.max_repeats / rounds))
    samples = {impl.name: ([first_call[impl.name]] if first_call[impl.name] >= SLOW_CALL_S else []) for impl in impls}
    for rnd in range(rounds):
        order = impls if rnd % 2 == 0 else impls[::-1]
        for impl in order:
            got = samples[impl.name]
            left = rounds - rnd
            need = max(0, math.ceil((cfg.min_repeats - len(got)) / left))
            slow = first_call[impl.name] >= share
            room = min(per_round_max, cfg.max_repeats - len(got))
            if (slow and need == 0) or room <= 0:
                continue
            if cfg.settle > 0:
                time.sleep(cfg.settle)  # let the previous library's spinning worker threads park
            if first_call[impl.name] < 0.01:
                impl.call()
            got += time_calls(impl.call, share, min(max(need, 1), room), room)
    return samples


def measure_peak(size: int, budget: float) -> dict[str, Any]:
    """Best GEMM rate (GFLOP/s) of NumPy and torch at float32 and float64 for a square `size` GEMM."""
    import torch

    rng = np.random.default_rng(12345)
    out: dict[str, Any] = {"size": size}
    flops = 2.0 * size**3
    for dtype in ("float32", "float64"):
        a = rng.standard_normal((size, size)).astype(dtype)
        b = rng.standard_normal((size, size)).astype(dtype)
        ta, tb = torch.from_numpy(a), torch.from_numpy(b)
        a @ b, ta @ tb  # warm up
        t_np = min(time_calls(lambda: a @ b, budget, 3, 50))
        t_torch = min(time_calls(lambda: ta @ tb, budget, 3, 50))
        rates = {"numpy": flops / t_np / 1e9, "torch": flops / t_torch / 1e9}
        out[dtype] = {**rates, "best": max(rates.values())}
    return out


# --------------------------------------------------------------------------------------------
# implementations


@dataclass
class Impl:
    """One way to compute a projection. `call` is what is timed; `verify_rows(p)` (per-row
    reference only) computes the first p rows, to verify and estimate a call too slow to run."""

    name: str
    call: Callable[[], Any]
    phase: str = "apply"  # "apply" (verified against the truth) or "factor" (timed only)
    rust: bool = False
    anchor: bool = False  # never skipped: the core and the cheapest NumPy / torch formulation
    same_as: str | None = None  # the same computation as this implementation (for estimates)
    extra_tol: float = 0.0
    verify_rows: Callable[[int], Any] | None = None


def as_numpy(result: Any) -> np.ndarray:
    """A result (NumPy array or CPU torch tensor) as a NumPy array."""
    if isinstance(result, np.ndarray):
        return result
    detach = getattr(result, "detach", None)
    if detach is not None:
        return detach().cpu().numpy()
    return np.asarray(result)


def default_rcond(shape: Sequence[int], dtype: str) -> float:
    """NumPy's matrix_rank convention: singular values below max(shape) * eps * s_max are dropped."""
    return max(shape) * float(np.finfo(dtype).eps)


def numpy_basis(A: np.ndarray, rcond: float) -> np.ndarray:
    """Orthonormal basis U_r (d, r) of span(A) by thin SVD, rank by relative tolerance `rcond`."""
    U, s, _ = np.linalg.svd(A, full_matrices=False)
    r = int(np.count_nonzero(s > rcond * s[0])) if s.size and s[0] > 0 else 0
    return np.ascontiguousarray(U[:, :r])


def torch_basis(A: Any, rcond: float) -> Any:
    import torch

    U, s, _ = torch.linalg.svd(A, full_matrices=False)
    r = int((s > rcond * s[0]).sum()) if s.numel() and float(s[0]) > 0 else 0
    return U[:, :r].contiguous()


def numpy_encoder_apply(X: np.ndarray, U: np.ndarray) -> np.ndarray:
    """X - (X U) U^T with two GEMMs and one in-place subtraction (no d x d matrix)."""
    Y = (X @ U) @ U.T
    np.subtract(X, Y, out=Y)
    return Y


def torch_encoder_apply(X: Any, U: Any) -> Any:
    """X - (X U) U^T; the second GEMM fused with the subtraction (addmm, beta=1, alpha=-1)."""
    import torch

    return torch.addmm(X, X @ U, U.T, alpha=-1.0)


def reference_rowsolve(X: Any, A: Any, ridge: float) -> Any:
    """The paper's reference encoder projection, as its code runs it every optimizer step.

    Mirrors project_to_encoder_null in Mingyuee88/sae-post-intervention-recovery
    (recovery_core/core.py), called once per row of the gradient: per row, the Gram matrix
    A^T A, the ridge solve (A^T A + ridge I) c = A^T x, then x - A c; rows stacked at the end.
    Only the column gather W_enc[:, idx] is left out (it would add cost). Written from scratch.
    """
    import torch

    def project_row(vec: Any) -> Any:
        cols = A.to(vec.device, dtype=vec.dtype)
        gram = cols.T @ cols
        eye = torch.eye(gram.shape[0], device=vec.device, dtype=vec.dtype)
        coeff = torch.linalg.solve(gram + ridge * eye, cols.T @ vec)
        return vec - cols @ coeff

    return torch.stack([project_row(row) for row in X], dim=0)


def encoder_impls(
    A: np.ndarray,
    X: np.ndarray,
    *,
    core: Any | None,
    rcond: float | None,
    ridge: float,
    kappa: float = 1.0,
    sigma_min: float = 1.0,
) -> list[Impl]:
    """Every encoder-projection implementation on the same A (d, k) and X (n, d).

    `kappa` and `sigma_min` (of A) size the tolerance allowances of the Gram-based per-row
    solve: it squares the condition number and its ridge biases the result by up to
    ridge / sigma_min^2 relative to ||x||.
    """
    import torch

    dtype = str(A.dtype)
    eps = float(np.finfo(dtype).eps)
    tol_rcond = rcond if rcond is not None else default_rcond(A.shape, dtype)
    At, Xt = torch.from_numpy(A), torch.from_numpy(X)
    U = numpy_basis(A, tol_rcond)
    Ut = torch_basis(At, tol_rcond)
    impls: list[Impl] = []
    if core is not None:
        projector = core.EncoderNullProjector(A, rcond=rcond)
        impls += [
            Impl("rust", lambda: projector.apply(X), rust=True, anchor=True),
            Impl("rust_torch", lambda: projector.apply(Xt), rust=True, same_as="rust"),
            Impl(
                "rust_factor",
                lambda: core.EncoderNullProjector(A, rcond=rcond),
                phase="factor",
                rust=True,
                anchor=True,
            ),
        ]
    impls += [
        Impl("numpy", lambda: numpy_encoder_apply(X, U), anchor=True),
        Impl("torch", lambda: torch_encoder_apply(Xt, Ut), anchor=True),
        Impl(
            "rowsolve",
            lambda: reference_rowsolve(Xt, At, ridge),
            extra_tol=2.0 * ridge / max(sigma_min, 1e-30) ** 2 + 50.0 * eps * kappa**2,
            verify_rows=lambda p: reference_rowsolve(Xt[:p], At, ridge),
        ),
        Impl("numpy_factor", lambda: numpy_basis(A, tol_rcond), phase="factor"),
        Impl("torch_factor", lambda: torch_basis(At, tol_rcond), phase="factor"),
    ]
    return impls


def numpy_jacobian_gram(J: np.ndarray, G: np.ndarray) -> np.ndarray:
    """G - ((G J^T) (J J^T)^+) J: the formula as written, with a Hermitian pseudo-inverse."""
    K = J @ J.T
    C = (G @ J.T) @ np.linalg.pinv(K, hermitian=True)
    return G - C @ J


def numpy_jacobian_svd(J: np.ndarray, G: np.ndarray, rcond: float) -> np.ndarray:
    """Thin SVD of J; the rows of V_r^T span J's row space; G - (G V_r) V_r^T."""
    _, s, Vt = np.linalg.svd(J, full_matrices=False)
    r = int(np.count_nonzero(s > rcond * s[0])) if s.size and s[0] > 0 else 0
    V = Vt[:r]
    return G - (G @ V.T) @ V


def numpy_jacobian_pinv(J: np.ndarray, G: np.ndarray) -> np.ndarray:
    """G - G (J^+ J)^T = G - (G J^T) (J^+)^T."""
    P = np.linalg.pinv(J)
    return G - (G @ J.T) @ P.T


def numpy_jacobian_lstsq(J: np.ndarray, G: np.ndarray) -> np.ndarray:
    """The row-space component of each g is J^T c with c = argmin ||J^T c - g|| (gelsd)."""
    c = np.linalg.lstsq(J.T, G.T, rcond=None)[0]
    return G - (J.T @ c).T


def torch_jacobian_gram(J: Any, G: Any) -> Any:
    import torch

    K = J @ J.T
    C = (G @ J.T) @ torch.linalg.pinv(K, hermitian=True)
    return torch.addmm(G, C, J, alpha=-1.0)


def torch_jacobian_svd(J: Any, G: Any, rcond: float) -> Any:
    import torch

    _, s, Vt = torch.linalg.svd(J, full_matrices=False)
    r = int((s > rcond * s[0]).sum()) if s.numel() and float(s[0]) > 0 else 0
    V = Vt[:r]
    return torch.addmm(G, G @ V.T, V, alpha=-1.0)


def torch_jacobian_pinv(J: Any, G: Any) -> Any:
    import torch

    P = torch.linalg.pinv(J)
    return torch.addmm(G, G @ J.T, P.T, alpha=-1.0)


def torch_jacobian_lstsq(J: Any, G: Any) -> Any:
    import torch

    c = torch.linalg.lstsq(J.T, G.T).solution  # CPU default driver: gelsy
    return G - (J.T @ c).T


def jacobian_impls(
    J: np.ndarray, G: np.ndarray, *, core: Any | None, rcond: float | None, kappa: float = 1.0
) -> list[Impl]:
    """Every Jacobian-projection implementation on the same J (m, n) and G (b, n); each call
    factorizes J (it changes every step). `kappa` (of J) sizes the allowance of the Gram forms."""
    import torch

    dtype = str(J.dtype)
    eps = float(np.finfo(dtype).eps)
    tol_rcond = rcond if rcond is not None else default_rcond(J.shape, dtype)
    gram_tol = 50.0 * eps * kappa**2
    Jt, Gt = torch.from_numpy(J), torch.from_numpy(G)
    impls: list[Impl] = []
    if core is not None:
        impls += [
            Impl("rust", lambda: core.jacobian_null_project(J, G, rcond=rcond), rust=True, anchor=True),
            Impl("rust_torch", lambda: core.jacobian_null_project(Jt, Gt, rcond=rcond), rust=True, same_as="rust"),
        ]
    impls += [
        Impl("numpy_gram", lambda: numpy_jacobian_gram(J, G), extra_tol=gram_tol, anchor=True),
        Impl("numpy_svd", lambda: numpy_jacobian_svd(J, G, tol_rcond)),
        Impl("numpy_pinv", lambda: numpy_jacobian_pinv(J, G)),
        Impl("numpy_lstsq", lambda: numpy_jacobian_lstsq(J, G)),
        Impl("torch_gram", lambda: torch_jacobian_gram(Jt, Gt), extra_tol=gram_tol, anchor=True),
        Impl("torch_svd", lambda: torch_jacobian_svd(Jt, Gt, tol_rcond)),
        Impl("torch_pinv", lambda: torch_jacobian_pinv(Jt, Gt)),
        Impl("torch_lstsq", lambda: torch_jacobian_lstsq(Jt, Gt)),
    ]
    return impls


# --------------------------------------------------------------------------------------------
# ground truth and flop counts


def encoder_truth(A: np.ndarray, X: np.ndarray, rcond: float) -> dict[str, Any]:
    """float64 result, rank and singular-value extremes of A."""
    A64 = A.astype(np.float64)
    U, s, _ = np.linalg.svd(A64, full_matrices=False)
    r = int(np.count_nonzero(s > rcond * s[0])) if s.size and s[0] > 0 else 0
    Ur = U[:, :r]
    X64 = X.astype(np.float64)
    Y = X64 - (X64 @ Ur) @ Ur.T
    s_min = float(s[r - 1]) if r else 0.0
    return {"Y": Y, "rank": r, "kappa": float(s[0] / s_min) if s_min else math.inf, "sigma_min": s_min}


def jacobian_truth(J: np.ndarray, G: np.ndarray, rcond: float) -> dict[str, Any]:
    """float64 result by an eigendecomposition of J J^T (cheaper than an SVD of J; exact to
    ~kappa^2 * 1e-16, far below the float32 tolerance), rank and condition number of J."""
    J64 = J.astype(np.float64)
    G64 = G.astype(np.float64)
    w, V = np.linalg.eigh(J64 @ J64.T)
    sig = np.sqrt(np.clip(w, 0.0, None))
    keep = sig > rcond * sig.max() if sig.size and sig.max() > 0 else np.zeros_like(sig, dtype=bool)
    Vr, wr = V[:, keep], w[keep]
    C = ((G64 @ J64.T) @ Vr / wr) @ Vr.T
    Y = G64 - C @ J64
    r = int(keep.sum())
    s_min = float(sig[keep].min()) if r else 0.0
    return {"Y": Y, "rank": r, "kappa": float(sig.max() / s_min) if s_min else math.inf}


def rel_row_error(Y: np.ndarray, Y_true: np.ndarray, scale: float) -> float:
    """max_i ||y_i - y_i*|| / scale, with scale = max_i ||x_i|| of the input rows."""
    Y = np.asarray(Y)
    if Y.shape != Y_true.shape:
        raise ValueError(f"result has shape {Y.shape}, expected {Y_true.shape}")
    diff = Y.astype(np.float64) - Y_true
    return float(np.sqrt((diff * diff).sum(axis=1)).max() / scale) if diff.size else 0.0


def qr_flops(rows: int, cols: int) -> float:
    """Householder QR of a tall rows x cols matrix: 2 cols^2 (rows - cols/3)."""
    p, q = min(rows, cols), max(rows, cols)
    return 2.0 * p * p * (q - p / 3.0)


def encoder_apply_flops(d: int, n: int, r: int) -> float:
    return 4.0 * n * d * r


def jacobian_flops(m: int, n: int, b: int, r: int) -> float:
    """Nominal useful work per call: a QR-sized factorization of J plus the two thin GEMMs.
    The same count for every implementation, so GFLOP/s compares like with like."""
    return qr_flops(n, m) + 4.0 * b * n * r


# --------------------------------------------------------------------------------------------
# running a cell


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


def wait_for_quiet(max_wait: float, threshold: float = QUIET_CORES) -> tuple[float, float | None]:
    """Sleep in 1 s steps, up to `max_wait` seconds, until other processes use less than
    `threshold` cores; returns (seconds waited, the last load seen)."""
    waited, load = 0.0, None
    while waited < max_wait:
        start = cpu_snapshot()
        time.sleep(1.0)
        waited += 1.0
        load = other_load(start, cpu_snapshot())
        if load is None or load < threshold:
            break
    return waited, load


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


# --------------------------------------------------------------------------------------------
# reporting


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


def format_report(meta: dict[str, Any], rows: list[dict[str, Any]], ctx: Context) -> str:
    cfg = ctx.config
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
    if ctx.notes:
        out.append("")
        out.append("notes:")
        out += [f"  [{i}] {text}" for i, text in enumerate(ctx.notes, 1)]
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


# --------------------------------------------------------------------------------------------
# entry points


def run(config: Config) -> tuple[dict[str, Any], list[dict[str, Any]], Context]:
    """Run the benchmark described by `config`; returns the meta row, the rows and the context."""
    guard = _apply_threads(config.threads)
    try:
        core, core_error = _load_core()
        if core is None:
            print(f"note: Rust core unavailable ({core_error}); timing the alternatives only", file=sys.stderr)
        meta = collect_meta(core, core_error)
        th = meta["threads"]
        print(
            f"threads: torch {th['torch']}, rayon {th['rayon_effective']} (RAYON_NUM_THREADS="
            f"{th['RAYON_NUM_THREADS'] or 'unset'}), NumPy BLAS "
            + ",".join(str(b.get("num_threads")) for b in meta["blas"]["numpy"] if b.get("user_api") == "blas"),
            file=sys.stderr,
            flush=True,
        )
        snap = cpu_snapshot()
        peak = measure_peak(config.peak_size, budget=0.2 if config.quick else 0.5)
        meta["peak"] = peak
        meta["config"] = {
            k: v for k, v in vars(config).items() if k not in ("json_path",)
        }
        ctx = Context(config=config, core=core, peak=peak, meta=meta)
        rows: list[dict[str, Any]] = []
        if "encoder" in config.ops:
            rows += encoder_cells(ctx)
        if "jacobian" in config.ops:
            rows += jacobian_cells(ctx)
        meta["loadavg_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
        meta["other_processes_cores"] = other_load(snap, cpu_snapshot())
        # The peak again at the end, keeping the better of the two measurements: a burst of
        # load from elsewhere during one of them would understate it.
        peak_end = measure_peak(config.peak_size, budget=0.2 if config.quick else 0.5)
        for dtype in ("float32", "float64"):
            for lib in ("numpy", "torch", "best"):
                peak[dtype][lib] = max(peak[dtype][lib], peak_end[dtype][lib])
        for row in rows:
            best = peak.get(row["dtype"], {}).get("best")
            if best and row.get("gflops") is not None:
                row["frac_peak"] = row["gflops"] / best
        meta["summary"] = summary(rows, peak, config.dtype)
        meta["notes"] = ctx.notes
        meta["errors"] = ctx.errors
        return meta, rows, ctx
    finally:
        if guard is not None:
            guard.unregister()


def report_from_json(paths: Sequence[str]) -> str:
    """The table and summary of earlier runs' --json files, merged (e.g. a grid run in parts).
    The header is the first file's; notes are renumbered; a shape measured twice keeps the
    later file's rows."""
    meta: dict[str, Any] | None = None
    notes: list[str] = []
    merged: dict[tuple[Any, ...], dict[str, Any]] = {}
    for path in paths:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
        head, rows = data[0], data[1:]
        if meta is None:
            meta = head
        offset = len(notes)
        notes += head.get("notes", [])
        for row in rows:
            row = dict(row)
            note = row.get("note") or ""
            if note.startswith("["):
                idx, rest = note[1:].split("]", 1)
                row["note"] = f"[{int(idx) + offset}]{rest}"
            key = tuple(row.get(k) for k in ("op", "d", "k", "m", "n", "batch", "impl"))
            merged[key] = row
    if meta is None:
        raise ValueError("no JSON files given")
    rows = list(merged.values())
    cfg = meta["config"]
    config = Config(**{**cfg, "json_path": None, "grid": cfg["grid"], "ops": tuple(cfg["ops"]), "impls": tuple(cfg["impls"])})
    ctx = Context(config=config, core=None, peak=meta["peak"], notes=notes)
    sources = f"merged from {', '.join(paths)}" if len(paths) > 1 else f"from {paths[0]}"
    return f"({sources})\n" + format_report(meta, rows, ctx)


def run_from_args(args: argparse.Namespace) -> int:
    """Run from parsed options (what `saerecover bench` calls); prints the report, writes JSON."""
    if args.report:
        print(report_from_json(args.report))
        return 0
    config = Config.from_args(args)
    t0 = time.perf_counter()
    meta, rows, ctx = run(config)
    meta["wall_s"] = time.perf_counter() - t0
    print(format_report(meta, rows, ctx))
    print(f"\ntotal wall time {meta['wall_s']:.1f} s", flush=True)
    if config.json_path:
        write_json(config.json_path, meta, rows)
    if ctx.errors:
        print(f"{ctx.errors} cell(s) failed verification", file=sys.stderr)
        return 1
    return 0


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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="saerecover bench",
        description="Time the Rust projections against NumPy, torch and the paper's per-row solve.",
    )
    return add_arguments(parser)


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry point: `python -m saerecover.bench.projection [options]`."""
    return run_from_args(build_parser().parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
