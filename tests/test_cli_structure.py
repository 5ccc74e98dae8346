"""The command line's structure and contract: every --help text (snapshots in
tests/data/cli_help, regenerate with ``python tests/test_cli_structure.py --write`` after an
intended change), every command's resolved defaults (pinned), the defaults' derivation from
RecoveryConfig, one dispatch style, and the lazy-import rule of saerecover.cli (its docstring)."""

from __future__ import annotations

import argparse
import ast
import contextlib
import dataclasses
import io
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from saerecover.cli import build_parser, main, options
from saerecover.toy import ASSETS

ROOT = Path(__file__).resolve().parents[1]
HELP_DIR = Path(__file__).resolve().parent / "data" / "cli_help"
CLI_DIR = ROOT / "python" / "saerecover" / "cli"
DEMO_MODEL = str(ASSETS / "model")
DEMO_SAE = str(ASSETS / "saes" / "blocks.1.hook_resid_post")


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "python"), os.environ.get("PYTHONPATH", "")])}


# --------------------------------------------------------------------------- --help snapshots


def _commands(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Every command path of the parser tree: (), ("run",), ("run", "ioi"), ..."""
    out = [path]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                out += _commands(sub, (*path, name))
    return out


def _help(command: tuple[str, ...]) -> str:
    """``saerecover COMMAND --help`` at COLUMNS=100, as the snapshots were made."""
    old = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = "100"
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exit_:
            main([*command, "--help"])
    finally:
        if old is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = old
    assert exit_.value.code in (0, None)
    return out.getvalue()


def _snapshot(command: tuple[str, ...]) -> Path:
    return HELP_DIR / f"top_{'_'.join(command)}.txt"


COMMANDS = _commands(build_parser())


def test_every_command_has_a_help_snapshot():
    assert {_snapshot(c).name for c in COMMANDS} == {p.name for p in HELP_DIR.glob("*.txt")}


@pytest.mark.parametrize("command", COMMANDS, ids=[" ".join(c) or "saerecover" for c in COMMANDS])
def test_help_text_is_unchanged(command):
    assert _help(command) == _snapshot(command).read_text(encoding="utf-8")


# --------------------------------------------------------------------------- resolved defaults

#: Every command's resolved defaults (key order included), as they were before the CLI became a
#: package (python/saerecover/cli/app.py, tasks.py, refusal.py at commit 94386d7).
PINNED: dict[tuple[str, bool], dict[str, Any]] = {
    ("run ioi", False): {  # run ioi
        "protocol": "saerecover", "model": "gpt2", "sae": "gpt2-small-res-jb/blocks.4.hook_resid_pre", "hook": None, "backend": "hf",
        "device": None, "dtype": None, "n": 64, "patterns": "BABA", "ioi_prompts": "saerecover", "top_k": 64, "features": None,
        "clamp_mode": "set", "clamp_value": -5.0, "clamp_where": "active", "modes": "none,encoder",
        "steps": 100, "lr": 0.1, "budget": 20.0, "budget_rel": None, "optimizer": "adam", "positions": "answer",
        "shared_delta": False, "reclamp": False,
        "early_stop": False, "lambda_act": 0.0, "lambda_decode": 0.0, "lambda_delta": 0.0, "max_drift": None,
        "batch_size": 32, "seed": 0, "out": None,
    },
    ("demo", False): {  # demo
        "protocol": "saerecover", "model": DEMO_MODEL, "sae": DEMO_SAE, "hook": "blocks.1.hook_resid_post", "backend": "hf",
        "device": None, "dtype": None, "n": 160, "patterns": "BABA,ABBA", "ioi_prompts": "toy", "top_k": 16, "features": None,
        "clamp_mode": "set", "clamp_value": -5.0, "clamp_where": "active", "modes": "none,encoder",
        "steps": 100, "lr": 0.1, "budget": 20.0, "budget_rel": 0.25, "optimizer": "adam", "positions": "answer",
        "shared_delta": False, "reclamp": False,
        "early_stop": False, "lambda_act": 0.0, "lambda_decode": 0.0, "lambda_delta": 0.0, "max_drift": None,
        "batch_size": 64, "seed": 0, "out": "runs/demo",
    },
    ("run tpp", False): {  # run tpp
        "protocol": "saerecover", "model": None, "sae": None, "hook": None, "backend": "hf", "device": None, "dtype": None,
        "dataset": "bias_in_bios", "data": None, "test_data": None, "text_column": None, "label_column": None,
        "data_classes": None, "classes": None, "n_train": 2000, "n_test": 500, "context_length": 128,
        "top_n": 10, "probe_trainer": "saerecover", "probe_epochs": 20, "probe_lr": 0.001, "probe_batch_size": 16, "probe_l1": 0.001,
        "loss": "logit", "modes": "none,encoder", "steps": 100, "lr": 0.1, "budget": 20.0, "budget_rel": None,
        "optimizer": "adam", "positions": "all", "batch_size": 32, "seed": 0, "out": None,
    },
    ("run tpp", True): {  # run tpp --toy
        "protocol": "saerecover", "model": None, "sae": None, "hook": "blocks.1.hook_resid_post", "backend": "hf", "device": None,
        "dtype": None, "dataset": "toy", "data": None, "test_data": None, "text_column": None,
        "label_column": None, "data_classes": None, "classes": None, "n_train": 40, "n_test": 20,
        "context_length": 128, "top_n": 16, "probe_trainer": "saerecover", "probe_epochs": 20, "probe_lr": 0.01, "probe_batch_size": 16,
        "probe_l1": 0.001, "loss": "logit", "modes": "none,encoder", "steps": 100, "lr": 0.1, "budget": 1.0, "budget_rel": None,
        "optimizer": "adam", "positions": "all", "batch_size": 32, "seed": 0, "out": None,
    },
    ("run unlearning", False): {  # run unlearning
        "protocol": "saerecover", "model": None, "sae": None, "hook": None, "backend": "hf", "device": None,
        "dtype": None, "questions": None, "forget_corpus": None, "retain_corpus": None, "corpus_column": "text",
        "limit": 0, "forget_relation": "inventor", "prompt_format": "wmdp", "top_n": 20, "retain_threshold": 0.01,
        "retain_rule": "at_most", "clamp_value": -20.0, "loss": "margin", "reduce": "max", "success": "margin",
        "strict": True, "features": None, "modes": "none,encoder",
        "steps": 150, "lr": 0.08, "budget": 20.0, "budget_rel": None, "optimizer": "adam", "positions": "all", "batch_size": 32,
        "seed": 0, "out": None,
    },
    ("run unlearning", True): {  # run unlearning --toy
        "protocol": "saerecover", "model": None, "sae": None, "hook": "blocks.1.hook_resid_post", "backend": "hf",
        "device": None, "dtype": None, "questions": None, "forget_corpus": None, "retain_corpus": None,
        "corpus_column": "text", "limit": 0, "forget_relation": "inventor", "prompt_format": "toy", "top_n": 16,
        "retain_threshold": 0.01, "retain_rule": "at_most", "clamp_value": -20.0, "loss": "margin",
        "reduce": "max", "success": "margin", "strict": True, "features": None, "modes": "none,encoder", "steps": 150, "lr": 0.08, "budget": 10.0,
        "budget_rel": None, "optimizer": "adam", "positions": "all", "batch_size": 32, "seed": 0, "out": None,
    },
    ("run refusal", False): {  # run refusal
        "protocol": "saerecover", "model": None, "saes": None, "hooks": None, "backend": "hf", "device": None, "dtype": None,
        "requests": None, "column": None, "limit": None, "contrast": None, "contrast_column": None, "n": 24,
        "n_contrast": 48, "min_contrast": 5, "top_k": 16, "features": None, "clamp": "mean", "clamp_scale": 1.0,
        "clamp_multiplier": 3.0, "contrast_positions": None,
        "template": None, "system_prompt": None, "max_new_tokens": None, "lists": "gcg", "match": "opening", "strict": True,
        "judge": "ours", "generation_deltas": "prompt", "prefix_weight": 2.0,
        "prefix_tokens": 4, "discourage_refusal": 0.0, "store_generations": False,
        "modes": "none,encoder,jacobian,sketch,suffix", "delta_site": None, "steps": 100, "lr": 0.2,
        "budget": 40.0, "budget_rel": None, "optimizer": "adam", "positions": "prompt", "reclamp": False,
        "lambda_act": 0.0,
        "drift_penalty": "relative_l2", "penalty_after_projection": False, "drift_correction_steps": 0,
        "drift_correction_lr": 0.05, "lambda_delta": 0.0, "max_drift": None, "checkpoint_every": 1,
        "checkpoint_after_update": False, "checkpoint_fallback_weight": None, "sketch_probes": 4,
        "anchor_steps": 0, "anchor_lr": 0.1, "anchor_budget": None, "response_rows": None,
        "phi_positions": "from_delta", "suffix_tokens": 8, "suffix_lr": None,
        "suffix_budget": None, "batch_size": 16, "seed": 0, "attribute": False, "top_k_attribution": 10,
        "out": None,
    },
}

#: ``sweep --task T [--toy]``: the task's options (the toy world's preset without its model and
#: SAE for IOI), then the grids.
_GRIDS = {"budgets": "1,2,5,10,20", "ks": "4,8,16,32"}
_TOY_IOI = {k: v for k, v in PINNED[("demo", False)].items() if k not in ("model", "sae", "out")}
_TOY_SWEEP_IOI = {k: v for k, v in _TOY_IOI.items() if k != "budget_rel"}  # sweeps set absolute budgets
PINNED[("run ioi", True)] = {**PINNED[("run ioi", False)], **_TOY_IOI, "model": DEMO_MODEL, "sae": DEMO_SAE}
PINNED[("sweep ioi", False)] = {**PINNED[("run ioi", False)], **_GRIDS}
PINNED[("sweep ioi", True)] = {**PINNED[("run ioi", False)], **_TOY_SWEEP_IOI, **_GRIDS}
PINNED[("sweep unlearning", False)] = {**PINNED[("run unlearning", False)], **_GRIDS}
PINNED[("sweep unlearning", True)] = {**PINNED[("run unlearning", True)], **_GRIDS}

PINNED_PARSER_DEFAULTS = {
    ("attribute", "R"): {"top_k": 10, "batch_size": 16, "modes": None, "device": None, "no_plot": False},
    ("analyze", "R"): {"atol": 1e-05, "rtol": None, "top_k": 10, "device": "cpu", "no_save": False},
    ("bench",): {"dtype": "float32", "min_repeats": 3, "max_repeats": 2000, "rounds": 5, "ridge": 0.0001, "seed": 0},
    ("bench", "projection"): {"dtype": "float32", "min_repeats": 3, "max_repeats": 2000, "rounds": 5, "ridge": 0.0001,
                              "seed": 0},
    ("bench", "recovery"): {"shape": "gpt2-small", "device": "cpu", "dtype": "float32",
                            "modes": "none,encoder,sketch,jacobian", "n": None, "steps": 2, "warmup": 1,
                            "single": None, "features": 32, "feature_rate": 0.1, "positions": "prompt"},
}


@pytest.mark.parametrize("command,toy", list(PINNED), ids=[f"{c}{' --toy' * t}" for c, t in PINNED])
def test_resolved_defaults_are_pinned(command, toy):
    got = options.defaults(command, toy=toy)
    want = PINNED[(command, toy)]
    assert list(got.items()) == list(want.items())
    assert [type(v) for v in got.values()] == [type(v) for v in want.values()]  # 20 is not 20.0 to coerce


@pytest.mark.parametrize("argv", list(PINNED_PARSER_DEFAULTS), ids=[" ".join(a) for a in PINNED_PARSER_DEFAULTS])
def test_parser_defaults_are_pinned(argv):
    args = vars(build_parser().parse_args(list(argv)))
    want = PINNED_PARSER_DEFAULTS[argv]
    assert {k: args[k] for k in want} == want


def test_the_handlers_resolve_the_pinned_defaults(tmp_path, monkeypatch):
    """``run ioi`` hands the defaults (and the flags given) to the run it makes."""
    from saerecover.cli import ioi

    seen: dict[str, Any] = {}
    monkeypatch.setattr(ioi, "run_ioi", lambda opts, **kw: seen.update(opts) or _Done())
    assert main(["run", "ioi", "--out", str(tmp_path / "o"), "--steps", "3"]) == 0
    assert seen == {**PINNED[("run ioi", False)], "out": str(tmp_path / "o"), "steps": 3}


class _Done:
    path, seconds = "x", 0.0

    def table(self) -> str:
        return ""


def test_recovery_defaults_come_from_recovery_config():
    """Each command's recovery options are RecoveryConfig's field defaults, except where a named
    preset (task or toy world) says otherwise."""
    from saerecover.core.config import RecoveryConfig

    config = {f.name: f.default for f in dataclasses.fields(RecoveryConfig)}
    presets = {
        "run ioi": {}, "demo": options.toy_ioi(), "run tpp": options.TPP_RECOVERY,
        "run unlearning": options.UNLEARNING_RECOVERY, "sweep ioi": {}, "sweep unlearning": options.UNLEARNING_RECOVERY,
        "run refusal": options.REFUSAL_RECOVERY,
    }
    for command, preset in presets.items():
        for key, value in options.defaults(command).items():
            if key in config and key not in preset:
                assert value == config[key] and type(value) is type(config[key]), (command, key)


def test_presets_only_override_known_options():
    for command, preset in [("run tpp", options.TOY_TPP), ("run unlearning", options.TOY_UNLEARNING),
                            ("sweep unlearning", options.TOY_UNLEARNING), ("run ioi", options.toy_ioi())]:
        assert set(preset) <= set(options.defaults(command)), command


def test_analyze_top_k_is_the_decomposition_default():
    from saerecover.core.decomposition import DEFAULT_TOP_K

    assert options.ANALYZE["top_k"] == DEFAULT_TOP_K


def test_optional_numbers_from_flags_and_config_files_are_coerced():
    from saerecover.cli.checks import coerce
    from saerecover.cli.parsing import OptionError

    assert coerce("max_drift", 0.03, None) == 0.03 and coerce("suffix_lr", "1e-3", None) == 1e-3
    assert coerce("max_drift", None, None) is None
    with pytest.raises(OptionError, match="max_drift must be a finite number"):
        coerce("max_drift", "abc", None)


# --------------------------------------------------------------------------- dispatch


def _leaves(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        return [parser]
    return [leaf for a in subs for sub in a.choices.values() for leaf in _leaves(sub)]


def test_every_leaf_parser_sets_its_handler():
    leaves = _leaves(build_parser())
    assert sorted(p.prog for p in leaves) == sorted(
        f"saerecover {c}" for c in ("demo", "run ioi", "run tpp", "run unlearning", "run refusal", "report",
                                    "sweep budget", "sweep features", "compare defenses", "compare saes", "attribute",
                                    "analyze", "merge", "bench projection", "bench recovery", "convert",
                                    "train-sae"))
    assert all(callable(leaf.get_default("handler")) for leaf in leaves), [p.prog for p in leaves]


def test_python_m_saerecover_cli_and_the_console_script_target():
    proc = subprocess.run([sys.executable, "-m", "saerecover.cli", "--version"], capture_output=True, text=True,
                          check=False, env=_env(), timeout=120)
    assert proc.returncode == 0 and proc.stdout.startswith("saerecover ")
    text = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    assert 'saerecover = "saerecover.cli:main"' in text


# --------------------------------------------------------------------------- lazy imports


def test_building_the_parser_never_imports_torch():
    code = ("import saerecover.cli, sys; from saerecover.cli import build_parser; build_parser(); "
            "print('torch' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False, env=_env(),
                          timeout=120)
    assert proc.stdout.strip() == "False", proc.stderr


def test_no_cli_module_imports_torch_and_argparse_errors_stay_light():
    modules = sorted(p.stem for p in CLI_DIR.glob("*.py") if p.stem not in ("__init__", "__main__"))
    code = ("import importlib, sys\n"
            f"for m in {modules!r}: importlib.import_module('saerecover.cli.' + m)\n"
            "from saerecover.cli import main\n"
            "try:\n    main(['run', 'ioi', '--steps', 'x'])\nexcept SystemExit:\n    pass\n"
            "print('torch' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False, env=_env(),
                          timeout=120)
    assert proc.stdout.strip() == "False", proc.stderr


#: What a command's work may import inside a function (saerecover.cli's docstring).
WORK = ("saerecover.core", "saerecover.models", "saerecover.tasks", "saerecover.data", "saerecover.experiments",
        "saerecover.report", "saerecover.runs", "saerecover.toy", "saerecover.bench", "torch")
#: The torch-free pieces cli modules import at module level, besides the standard library.
LIGHT = ("saerecover.cli", "saerecover.__version__", "saerecover.core.config", "saerecover.core.protocol",
         "saerecover.runs.errors", "saerecover.runs.interrupt", "saerecover.bench.projection",
         "saerecover.bench.recovery")


def _imports(tree: ast.AST) -> list[tuple[int, str, str | None]]:
    """(line, dotted name, enclosing function or None) of every import; ``from X import Y`` is X.Y."""
    out: list[tuple[int, str, str | None]] = []

    def visit(node: ast.AST, func: str | None) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.Import):
                out.extend((child.lineno, a.name, func) for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                out.extend((child.lineno, f"{child.module}.{a.name}", func) for a in child.names)
            visit(child, child.name if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)) else func)

    visit(tree, None)
    return out


def _under(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def test_imports_follow_the_one_lazy_pattern():
    bad = []
    for path in sorted(CLI_DIR.glob("*.py")):
        for line, name, func in _imports(ast.parse(path.read_text(encoding="utf-8"))):
            where = f"{path.name}:{line} {name}"
            if func is None and (_under(name, WORK) or name.startswith("saerecover")) and not _under(name, LIGHT):
                bad.append(f"{where}: a command's work imported at module level")
            if func is not None and not (_under(name, WORK) or (func, name.split(".")[0]) in
                                         (("load_config_file", "tomllib"), ("load_config_file", "tomli"),
                                          ("load_config_file", "yaml"))):
                bad.append(f"{where}: imported inside {func}(), but not a command's work")
    assert not bad, "\n".join(bad)


# --------------------------------------------------------------------------- regenerate

if __name__ == "__main__":
    if sys.argv[1:] != ["--write"]:
        sys.exit("usage: python tests/test_cli_structure.py --write   (rewrite tests/data/cli_help)")
    HELP_DIR.mkdir(parents=True, exist_ok=True)
    for c in COMMANDS:
        _snapshot(c).write_text(_help(c), encoding="utf-8")
        print(_snapshot(c))
