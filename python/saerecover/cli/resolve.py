"""From flags and a config file to one dict of options: defaults < config file (``--config``) <
flags given on the command line; for the commands with ``--protocol``, defaults < protocol preset <
toy preset < config file < flags (:func:`resolve_command`). Parsers leave every option flag's
default at None, so that a flag not given never hides a config file's value."""

from __future__ import annotations

import argparse
import difflib
import json
import sys
from pathlib import Path
from typing import Any

from saerecover.cli import options
from saerecover.cli.parsing import CLIError, one_line
from saerecover.core import protocol as protocols

__all__ = ["load_config_file", "protocol_record", "resolve", "resolve_command", "resolve_options"]


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
    for key, value in data.items():
        if expanded_size(value, MAX_CONFIG_ITEMS) > MAX_CONFIG_ITEMS:
            raise CLIError(f"config file {path}: the value of {key!r} expands to more than {MAX_CONFIG_ITEMS:,} "
                           "items (YAML anchors and aliases repeat what they name); give the values themselves")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


#: The most items (list and dict entries, nested, each alias counted every time it appears) one
#: config value may expand to. The longest legitimate value is a list of feature indices; a YAML
#: file of a few hundred bytes whose aliases nest can otherwise expand to billions of items.
MAX_CONFIG_ITEMS = 100_000


def expanded_size(value: Any, limit: int) -> int:
    """The number of items ``value`` holds once every alias is expanded (a list or dict counts
    its entries, nested ones included), counted without expanding anything and stopping past
    ``limit``, so that an alias bomb or a recursive alias costs at most ``limit`` steps."""
    count, stack = 0, [value]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            children = [*item.keys(), *item.values()]
        elif isinstance(item, (list, tuple)):
            children = list(item)
        else:
            continue
        count += len(children)
        if count > limit:
            return count
        stack.extend(children)
    return count


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


def resolve_command(args: argparse.Namespace, command: str, *, toy: bool = False) -> dict[str, Any]:
    """``command``'s options ("run ioi", "sweep unlearning", ...): its defaults < the preset of the
    protocol (``--protocol``, else the config file's ``protocol``, else saerecover) < its toy preset
    (``toy``) < the config file < the flags given. An absolute ``budget`` given (file or flag)
    without ``budget_rel`` turns a preset's relative budget off."""
    file_opts = load_config_file(args.config) if getattr(args, "config", None) else {}
    name = getattr(args, "protocol", None) or file_opts.get("protocol") or protocols.DEFAULT
    if name not in protocols.PROTOCOLS:
        raise CLIError(f"option protocol: unknown value {name!r}; valid: {', '.join(protocols.PROTOCOLS)}")
    defaults = options.defaults(command, toy=toy, protocol=name)
    flags = {k: v for k, v in vars(args).items() if k in defaults}
    opts = resolve_options(defaults, file_opts, flags)
    given = set(file_opts) | {k for k, v in flags.items() if v is not None}
    if "budget" in given and "budget_rel" not in given and "budget_rel" in opts \
            and not str(opts["budget"]).strip().lower().endswith("x"):
        opts["budget_rel"] = None  # an absolute budget given wins over a preset's relative one
    return opts


def protocol_record(opts: dict[str, Any], command: str) -> dict[str, Any]:
    """config.json's ``protocol`` entry of a run from its resolved options: the protocol's name and
    every choice of the command's scope as resolved."""
    return protocols.record(options.PROTOCOL_SCOPES[command], opts["protocol"], opts)
