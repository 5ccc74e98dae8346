"""The projection benchmark's options: the grids of shapes, the implementations compared, the
verification tolerances, and the command-line flags that set them (``Config``)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

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
