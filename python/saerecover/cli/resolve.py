"""From flags and a config file to one dict of options: defaults < config file (``--config``) <
flags given on the command line. Parsers leave every option flag's default at None, so that a flag
not given never hides a config file's value."""

from __future__ import annotations

import argparse
import difflib
import json
import sys
from pathlib import Path
from typing import Any

from saerecover.cli.parsing import CLIError, one_line

__all__ = ["load_config_file", "resolve", "resolve_options"]


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Read a YAML, TOML or JSON run config (flat keys, the flag names with underscores).
    tomllib and yaml are imported here, when a config file is given."""
    path = Path(path)
    if not path.is_file():
        raise CLIError(f"config file {path} does not exist")
    suffix = path.suffix.lower()
    if suffix not in (".toml", ".yaml", ".yml", ".json"):
        raise CLIError(f"config file {path} must end in .yaml, .yml, .toml or .json")
    try:
        text = path.read_text(encoding="utf-8")
        if suffix == ".toml":
            if sys.version_info >= (3, 11):
                import tomllib
            else:  # Python 3.10: the same parser, as the tomli package
                import tomli as tomllib

            data = tomllib.loads(text)
        elif suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text) or {}  # safe_load: no python/* tags, no code
        else:
            data = json.loads(text)
    except Exception as err:  # tomllib / yaml / json / UnicodeDecodeError: one line, no traceback
        kind = {".toml": "TOML", ".json": "JSON"}.get(suffix, "YAML")
        raise CLIError(f"config file {path} is not valid {kind}: {one_line(err)}") from err
    if not isinstance(data, dict):
        raise CLIError(f"config file {path} must hold a mapping of option names to values")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def resolve_options(defaults: dict[str, Any], file_opts: dict[str, Any], flag_opts: dict[str, Any]) -> dict[str, Any]:
    """defaults < config file < flags given on the command line. Unknown keys are an error."""
    unknown = sorted(set(file_opts) - set(defaults))
    if unknown:
        hints = [f"{k} (did you mean {m[0]}?)" if (m := difflib.get_close_matches(k, defaults, 1)) else k
                 for k in unknown]
        raise CLIError(f"unknown config key(s): {', '.join(hints)}; valid keys: {', '.join(sorted(defaults))}")
    opts = dict(defaults)
    opts.update(file_opts)
    opts.update({k: v for k, v in flag_opts.items() if v is not None})
    return opts


def resolve(args: argparse.Namespace, defaults: dict[str, Any]) -> dict[str, Any]:
    """A command's options: ``defaults`` < the file of ``args.config`` < the flags of ``args``
    that name an option of ``defaults``."""
    file_opts = load_config_file(args.config) if getattr(args, "config", None) else {}
    return resolve_options(defaults, file_opts, {k: v for k, v in vars(args).items() if k in defaults})
