"""Where a run command's work runs: in this process (no flag), or on Ray (``--ray [ADDRESS]``,
``--workers``, ``--units``, ``--gpus-per-worker``, ``--cpus-per-worker``), checked before
anything loads (docs/clusters.md)."""

from __future__ import annotations

import argparse
from typing import Any

from saerecover.cli.parsing import CLIError

__all__ = ["executor_from_args"]

_SIZES = ("workers", "units", "gpus_per_worker", "cpus_per_worker")


def executor_from_args(args: argparse.Namespace, *, shard: tuple[int, int] | None = None) -> Any:
    """The executor the flags ask for: None (this process) or a RayExecutor. Ray missing is one
    line naming the extra that installs it."""
    address = getattr(args, "ray", None)
    given = [f"--{k.replace('_', '-')}" for k in _SIZES if getattr(args, k, None) is not None]
    if address is None:
        if given:
            raise CLIError(f"{', '.join(given)} need{'s' if len(given) == 1 else ''} --ray")
        return None
    if shard is not None:
        raise CLIError("--shard and --ray exclude each other: with --ray the run is sharded into units itself")
    from saerecover.experiments.ray_executor import RayExecutor, RayMissingError

    try:
        return RayExecutor(address, workers=args.workers, units=args.units, gpus_per_worker=args.gpus_per_worker,
                           cpus_per_worker=args.cpus_per_worker)
    except RayMissingError as err:
        raise CLIError(f"--ray: {err}") from None
    except ValueError as err:
        raise CLIError(f"--ray: {err}") from None
