"""Checks of resolved options, done before anything loads (issue 7): values coerced to their
defaults' types, choices and ranges, list options parsed, local model/SAE paths and the run
directory checked. Every failure is an OptionError / CLIError / ValueError naming the option and
what would be valid (one line, exit status 2)."""

from __future__ import annotations

import argparse
import json
import math
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from saerecover.cli.options import CHOICES
from saerecover.cli.parsing import CLIError, OptionError
from saerecover.core.config import RecoveryConfig

__all__ = ["LIST_OPTIONS", "MAX_EXAMPLES", "POSITIVE_INTS", "budget_arg", "check_options", "check_out",
           "check_out_path", "coerce", "parse_features", "parse_numbers", "parse_shard", "split_budget", "split_list"]

#: Integer options that must be >= 1.
POSITIVE_INTS = ("n", "top_k", "batch_size")
#: The most examples a count option may ask for. Every example is built in memory (tokens, targets)
#: before the first forward pass and becomes a records.jsonl line per mode; 10**6 prompts already
#: take minutes to build and gigabytes to hold, and no setting of the method needs more.
MAX_EXAMPLES = 1_000_000
#: Count options bounded by MAX_EXAMPLES.
COUNT_OPTIONS = ("n", "n_train", "n_test", "n_contrast")
#: Number options whose default None means "off".
OPTIONAL_FLOATS = ("max_drift", "suffix_lr", "suffix_budget", "budget_rel")
#: Comma-separated options a config file may also give as a list.
LIST_OPTIONS = ("modes", "patterns", "classes", "data_classes", "budgets", "ks")
_HOOK_RE = re.compile(r"^blocks\.\d+\.hook_resid_(pre|post)$")


def coerce(key: str, value: Any, default: Any) -> Any:
    """``value`` of option ``key`` in the type of its default (None: any string); OptionError
    naming the key when it does not fit."""
    kind = type(default)
    if key in OPTIONAL_FLOATS and value is not None and default is None:  # default None: "off"
        return coerce(key, value, 0.0)
    if value is None:
        if default is None:
            return None
        what = {bool: "true or false", int: "an integer", float: "a number"}.get(kind, "a string")
        raise OptionError(f"option {key} has no value; give {what} (default {default!r})")
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
        raise OptionError(f"option {key} must be true or false, got {value!r}")
    if isinstance(default, int):
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lstrip("+-").isdigit():
            return int(value)
        _check_int_bound(key, value)
        raise OptionError(f"option {key} must be an integer, got {value!r}")
    if isinstance(default, float):
        if not isinstance(value, bool):
            try:
                out = float(value)  # YAML 1.1 reads 1e-3 (no dot) as a string
            except (TypeError, ValueError):
                out = None
            if out is not None and math.isfinite(out):
                return out
        raise OptionError(f"option {key} must be a finite number, got {value!r}")
    if isinstance(value, (list, tuple)) and key == "features":
        return value
    if isinstance(value, (list, tuple)) and key in LIST_OPTIONS:  # YAML/TOML lists, joined like the flag
        return ",".join(str(x) for x in value)
    if not isinstance(value, str):
        raise OptionError(f"option {key} must be a string, got {value!r}")
    return value


def _check_int_bound(key: str, value: Any) -> None:
    """A number past an integer option's bound (``n: 1e26``, which YAML reads as text, ``seed:
    1.0e+23``) is refused naming the bound, not only as "not an integer"."""
    try:
        number = float(value)
    except (TypeError, ValueError, OverflowError):
        return
    if not math.isfinite(number):
        return
    if key in COUNT_OPTIONS and number > MAX_EXAMPLES:
        raise OptionError(f"option {key} must be at most {MAX_EXAMPLES:,} examples, got {value!r}")
    if key == "seed" and not -(2**63) <= number < 2**63:
        raise OptionError(f"option seed must be a 64-bit integer (-2**63 <= seed < 2**63), got {value!r}")


def budget_arg(text: str) -> float | str:
    """``--budget``: a number (absolute) or a number followed by ``x`` (relative: ``0.25x``, kept as
    text for :func:`split_budget`)."""
    t = str(text).strip()
    try:
        value = float(t[:-1] if t.lower().endswith("x") else t)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, or a number followed by x (relative to the "
                                         f"residual, e.g. 0.25x), got {text!r}") from None
    return t if t.lower().endswith("x") else value


def split_budget(opts: dict[str, Any]) -> dict[str, Any]:
    """A relative ``budget`` ("0.25x", from a flag or a config file) moved to ``budget_rel``; the
    absolute budget then keeps its default (unused)."""
    b = opts.get("budget")
    if not (isinstance(b, str) and b.strip().lower().endswith("x")):
        return opts
    try:
        rel = float(b.strip()[:-1])
    except ValueError:
        raise OptionError(f"option budget must be a number, or a number followed by x (relative), got {b!r}") from None
    out = {**opts, "budget_rel": rel}
    del out["budget"]
    return out


def split_list(text: Any) -> list[str]:
    """The items of a comma-separated option (or of a list from a config file), stripped; None: []."""
    if text is None:
        return []
    if isinstance(text, (list, tuple)):
        return [str(x).strip() for x in text if str(x).strip()]
    return [x.strip() for x in str(text).split(",") if x.strip()]


def parse_features(value: Any) -> list[int] | None:
    """Feature indices from "3,17,42" or a list of integers (1.5 and True are refused, not
    truncated); None stays None."""
    if value is None:
        return None
    items = value if isinstance(value, (list, tuple)) else [x for x in str(value).split(",") if x.strip()]
    try:
        out = [int(str(x).strip()) for x in items]
    except ValueError as err:
        raise OptionError(f"--features must be comma-separated integers, got {value!r}") from err
    negative = [i for i in out if i < 0]
    if negative:
        raise OptionError(f"--features: feature indices are >= 0, got {negative[0]} in {value!r}")
    return out


def parse_numbers(text: Any, key: str, *, integer: bool) -> list[Any]:
    """The numbers of a comma-separated grid option (``budgets``, ``ks``); none is an error."""
    try:
        vals = [int(x) if integer else float(x) for x in split_list(text)]
    except ValueError as err:
        kind = "integers" if integer else "numbers"
        raise CLIError(f"option {key} must be comma-separated {kind}, got {text!r}") from err
    if not vals:
        raise CLIError(f"option {key} is empty")
    return vals


def parse_shard(text: str | None) -> tuple[int, int] | None:
    """``--shard i/n`` as (i, n); None when not given."""
    if not text:
        return None
    try:
        i, n = (int(x) for x in str(text).split("/"))
    except ValueError as err:
        raise CLIError(f"--shard must look like i/n (e.g. 0/4), got {text!r}") from err
    if n < 1 or not 0 <= i < n:
        raise CLIError(f"--shard {text}: need 0 <= i < n")
    return i, n


def check_out_path(out: Any, flag: str = "--out") -> Path:
    """Refuse an output path that can never be written, before anything loads: a name that is
    not UTF-8 (a run records its paths as UTF-8 text), a file, or a path below a file."""
    text = str(out)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise OptionError(f"{flag} {ascii(text)} is not valid UTF-8 (bytes {os.fsencode(text)!r}); the run records "
                          "its paths as UTF-8 text: choose a UTF-8 name") from None
    path = Path(text).expanduser()
    if path.exists() and not path.is_dir():
        raise OptionError(f"{flag} {out} is a file; give a new or existing run directory")
    for parent in path.absolute().parents:
        if parent.exists():
            if not parent.is_dir():
                raise OptionError(f"{flag} {out} is inside {parent}, which is a file; choose a path inside a directory")
            break
    return path


def check_out(out: Any, task: str | None = None, *, expect: Mapping[str, Any] | None = None) -> None:
    """Refuse an --out that can never hold this run, before anything loads (see
    :func:`check_out_path`): a non-empty directory that is not a run, a run another process is
    writing, (``task`` given) a run of another task, or (``expect``: the options of the run's
    config.json known before loading, nested) a run whose config differs at one of them."""
    from saerecover.runs.directory import check_resumable, run_in_use

    path = check_out_path(out)
    pid = run_in_use(path) if path.is_dir() else None
    if pid is not None:
        raise OptionError(f"--out {out} is in use by another process (pid {pid}); wait for it to finish, "
                          "or choose another --out")
    config = path / "config.json"
    if path.is_dir() and not config.exists() and any(p.name != ".lock" for p in path.iterdir()):
        raise OptionError(f"--out {out} is a non-empty directory that is not a saerecover run directory "
                          "(no config.json); choose a new --out")
    if task is not None and config.is_file():
        try:
            stored = (json.loads(config.read_text(encoding="utf-8")).get("task") or {}).get("name")
        except (OSError, ValueError, AttributeError):
            return  # opening the run directory explains what is wrong with it
        if stored is not None and stored != task:
            raise OptionError(f"--out {out} holds a run of task {stored!r}, not {task!r}; choose a new --out "
                              "(or --overwrite to discard it)")
    if expect is not None:
        check_resumable(path, expect)


def check_options(opts: dict[str, Any], defaults: dict[str, Any], *, local: bool = True,
                  positive: tuple[str, ...] = ()) -> dict[str, Any]:
    """Types, choices and ranges of resolved run options, before anything loads. Returns the
    options coerced to their defaults' types; raises OptionError / ValueError / TypeError /
    FileNotFoundError naming the option and what would be valid. ``local``: also check that a
    ``model`` or ``sae`` given as a local path exists (with config.json / cfg.json).
    ``positive``: a command's own integers that must be >= 1. Called by handlers only: the valid
    modes, patterns and sources come from the layers below (torch), imported here."""
    from saerecover.core.projection import PROJECTIONS
    from saerecover.core.sites import check_sae_source
    from saerecover.models import check_model_source, resolve_device
    from saerecover.tasks.ioi import PATTERNS

    opts = split_budget(opts)
    out = {k: coerce(k, opts.get(k, d), d) for k, d in defaults.items()}
    out.update({k: v for k, v in opts.items() if k not in defaults})
    for key, valid in CHOICES.items():
        if out.get(key) is not None and out[key] not in valid:
            raise OptionError(f"option {key}: unknown value {out[key]!r}; valid: {', '.join(valid)}")
    for key in POSITIVE_INTS + tuple(positive):
        if key in out and out[key] is not None and out[key] < 1:
            raise OptionError(f"option {key} must be >= 1, got {out[key]}")
    for key in COUNT_OPTIONS:
        if isinstance(out.get(key), int) and out[key] > MAX_EXAMPLES:
            raise OptionError(f"option {key} must be at most {MAX_EXAMPLES:,} examples, got {out[key]:,}")
    if "modes" in out:
        modes = split_list(out["modes"])
        if not modes or any(m not in PROJECTIONS for m in modes) or len(set(modes)) != len(modes):
            raise OptionError(f"option modes: {out['modes']!r} is not a comma-separated list of distinct modes "
                              f"from {', '.join(PROJECTIONS)}")
    if out.get("patterns") is not None:
        pats = split_list(out["patterns"])
        if not pats or any(p not in PATTERNS for p in pats):
            raise OptionError(f"option patterns: {out['patterns']!r}; valid: {', '.join(PATTERNS)} (comma-separated)")
    if out.get("features") is not None and not parse_features(out["features"]):
        raise OptionError("option features is empty; give comma-separated feature indices or leave it out")
    if out.get("hook") is not None and not _HOOK_RE.match(out["hook"]):
        raise OptionError(f"option hook: unknown hook name {out['hook']!r}; expected 'blocks.L.hook_resid_pre' "
                          "or 'blocks.L.hook_resid_post'")
    fields = RecoveryConfig.__dataclass_fields__
    RecoveryConfig(**{k: v for k, v in out.items() if k in fields}).validate()
    if out.get("device") is not None:
        resolve_device(out["device"])
    if out.get("out") is not None:
        check_out_path(out["out"])
    if local:
        if out.get("model") is not None:
            check_model_source(out["model"])
        if out.get("sae") is not None:
            check_sae_source(out["sae"])
    return out
