"""Runs: the on-disk contract. A run directory (config, records, tensors, summary), its atomic
files, the summary statistics, and collections of runs. Nothing here loads a model."""

from saerecover.runs.directory import (
    CONFIG_FILE,
    LOCK_FILE,
    RECORDS_FILE,
    RUN_SCHEMA,
    SUMMARY_FILE,
    TENSORS_DIR,
    VOLATILE_KEYS,
    RunDirectory,
    config_hash,
    open_run,
    run_in_use,
    validate_name,
)
from saerecover.runs.errors import RunDirectoryError
from saerecover.runs.files import atomic_write_bytes, atomic_write_json, atomic_write_text

__all__ = [
    "CONFIG_FILE",
    "LOCK_FILE",
    "RECORDS_FILE",
    "SUMMARY_FILE",
    "TENSORS_DIR",
    "RUN_SCHEMA",
    "VOLATILE_KEYS",
    "RunDirectory",
    "RunDirectoryError",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
    "config_hash",
    "open_run",
    "run_in_use",
    "validate_name",
]
