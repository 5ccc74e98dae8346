"""The machine a benchmark runs on: thread limits, BLAS and CPU identification, the load of
other processes (so that a disturbed cell is marked), and the run's metadata."""

from __future__ import annotations

import os
import platform
import sys
import time
from typing import Any

import numpy as np

from saerecover.bench.projection.options import QUIET_CORES


def load_core() -> tuple[Any | None, str]:
    """saerecover.linalg if it imports (and has the two entry points), else None and why."""
    try:
        from saerecover import linalg  # noqa: PLC0415 - optional until the extension is built
    except Exception as exc:  # ImportError, or a broken extension
        return None, f"{type(exc).__name__}: {exc}"
    missing = [n for n in ("EncoderNullProjector", "jacobian_null_project") if not hasattr(linalg, n)]
    if missing:
        return None, f"saerecover.linalg lacks {', '.join(missing)}"
    return linalg, ""


def apply_threads(threads: int | None) -> Any:
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
