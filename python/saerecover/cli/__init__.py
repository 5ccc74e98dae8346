"""The ``saerecover`` command line (console script ``saerecover = "saerecover.cli:main"``).

Modules, top to bottom:

- ``app``: the parser tree and :func:`main` (parse, dispatch to the leaf parser's ``handler``,
  one-line errors);
- one module per command family, each adding its parsers and handlers: ``ioi`` (run ioi, demo),
  ``tpp``, ``unlearning``, ``sweep``, ``refusal`` (run refusal), ``attribute``, ``runs`` (report,
  analyze, merge), ``bench``; ``world`` is what the --toy commands share;
- ``flags`` (every option flag once, and the groups commands share), ``resolve`` (defaults <
  config file < flags), ``checks`` (values checked before anything loads), ``options`` (every
  command's defaults, from RecoveryConfig plus named task presets), ``parsing`` (one-line errors).

Lazy imports, the one pattern: a command's work (experiments, models, core, tasks, data, report,
the toy world's loader, torch) is imported inside the function that runs it, the command's handler
or a helper only handlers call (the option checks, the model and task builders), when the command
runs; so building the parser, ``saerecover --help`` and argparse errors never import torch. At
module level, cli modules import only the standard library, each other, and the torch-free pieces
the parsers need (saerecover.core.config for the defaults, saerecover.runs.errors,
saerecover.bench.projection's flags). Nothing else is imported inside functions; the documented
exceptions are tomllib and yaml in ``resolve.load_config_file``, imported when a config file is
given. tests/test_cli_structure.py checks both rules.
"""

from saerecover.cli.app import build_parser, main

__all__ = ["build_parser", "main"]
