"""The two protocols (saerecover.core.protocol): the table of choices, the command-line resolution
order (defaults < protocol preset < toy preset < config file < flags), and what a run records."""

from __future__ import annotations

import argparse
import json

import pytest
from saerecover.cli import build_parser, options
from saerecover.cli.parsing import CLIError
from saerecover.cli.resolve import protocol_record, resolve_command
from saerecover.core import protocol as protocols
from saerecover.core.config import RecoveryConfig

#: The commands of each protocol scope.
COMMANDS = {scope: [c for c, s in options.PROTOCOL_SCOPES.items() if s == scope]
            for scope in set(options.PROTOCOL_SCOPES.values())}


def test_every_choice_is_an_option_whose_default_is_ours():
    """Each choice of a scope is an option of every command of that scope, and its default (no toy
    world) is the table's ``ours``; keys are unique within a scope."""
    for scope, commands in COMMANDS.items():
        keys = [c.key for c in protocols.choices(scope)]
        assert len(keys) == len(set(keys)), scope
        for command in commands:
            got = options.defaults(command)
            for c in protocols.choices(scope):
                assert c.key in got, (command, c.key)
                assert got[c.key] == c.ours and type(got[c.key]) is type(c.ours), (command, c.key)


def test_every_choice_differs_and_says_what_and_where():
    for scope, table in protocols.CHOICES.items():
        for c in table:
            assert c.ours != c.reference, (scope, c.key)
            assert c.what and c.source, (scope, c.key)


def test_reference_preset_sits_under_the_toy_preset():
    ref = options.defaults("run unlearning", protocol="reference")
    assert (ref["reduce"], ref["success"], ref["positions"], ref["prompt_format"], ref["retain_rule"]) == \
        ("mean", "argmax", "answer", "reference", "below")
    toy = options.defaults("run unlearning", toy=True, protocol="reference")
    assert toy["prompt_format"] == "toy" and toy["reduce"] == "mean"  # the toy world's own prompts win
    assert options.defaults("run tpp", protocol="reference")["top_n"] == 500
    assert options.defaults("run tpp", toy=True, protocol="reference")["top_n"] == options.TOY_TPP["top_n"]
    assert options.defaults("run unlearning") == {**options.defaults("run unlearning", protocol="saerecover")}
    with pytest.raises(ValueError, match="unknown protocol 'paper'; valid: saerecover, reference"):
        options.defaults("run tpp", protocol="paper")


def _args(argv: list[str]) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def test_config_file_and_flags_win_over_the_protocol(tmp_path):
    cfg = tmp_path / "run.json"
    cfg.write_text(json.dumps({"protocol": "reference", "reduce": "max"}))
    args = _args(["run", "unlearning", "--toy", "--config", str(cfg), "--out", "o"])
    opts = resolve_command(args, "run unlearning", toy=True)
    # the file's protocol applies, its own reduce wins over it
    assert (opts["protocol"], opts["reduce"], opts["success"], opts["positions"]) == ("reference", "max", "argmax",
                                                                                      "answer")
    args = _args(["run", "unlearning", "--toy", "--config", str(cfg), "--protocol", "saerecover", "--success",
                  "argmax", "--out", "o"])
    opts = resolve_command(args, "run unlearning", toy=True)
    assert (opts["protocol"], opts["reduce"], opts["success"], opts["positions"]) == ("saerecover", "max", "argmax",
                                                                                      "all")
    entry = protocol_record(opts, "run unlearning")
    assert entry == {"name": "saerecover", "choices": {"positions": "all", "reduce": "max", "success": "argmax",
                                                       "prompt_format": "toy", "retain_rule": "at_most"}}


def test_a_bad_protocol_is_one_error(tmp_path, capsys):
    from saerecover.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["run", "tpp", "--toy", "--protocol", "paper", "--out", str(tmp_path / "o")])
    assert exit_.value.code == 2
    assert "invalid choice: 'paper'" in capsys.readouterr().err
    cfg = tmp_path / "run.yaml"
    cfg.write_text("protocol: paper\n")
    with pytest.raises(CLIError, match="option protocol: unknown value 'paper'; valid: saerecover, reference"):
        resolve_command(_args(["run", "tpp", "--toy", "--config", str(cfg)]), "run tpp", toy=True)


def test_apply_sets_only_what_the_caller_left_open():
    """recover(protocol=...): a choice that is a RecoveryConfig field takes the protocol's value
    unless given as a keyword, chosen by the protocol entry, or set away from its default."""
    cfg = RecoveryConfig()
    entry = protocols.apply(cfg, "reference", "unlearning")
    assert cfg.positions == "answer" and entry == {"name": "reference", "choices": {"positions": "answer"}}
    cfg = RecoveryConfig(positions="all")  # a config's own (non-default) value stays
    assert protocols.apply(cfg, "reference", "unlearning")["choices"] == {"positions": "all"}
    cfg = RecoveryConfig()
    assert protocols.apply(cfg, "reference", "unlearning", explicit={"positions"})["choices"] == \
        {"positions": "answer"}  # the default, given explicitly
    given = {"name": "reference", "choices": {"positions": "prompt", "reduce": "mean"}}
    cfg = RecoveryConfig(positions="prompt")
    assert protocols.apply(cfg, given, "unlearning") == given
    assert protocols.apply(RecoveryConfig(), None, None) == {"name": "saerecover", "choices": {}}
    with pytest.raises(ValueError, match="unknown protocol"):
        protocols.apply(RecoveryConfig(), "paper", None)
    with pytest.raises(ValueError, match="unknown protocol scope 'ioii'"):
        protocols.choices("ioii")


def test_resolve_takes_explicit_then_entry_then_protocol():
    out = protocols.resolve("unlearning", {"name": "reference", "choices": {"reduce": "max"}},
                            {"success": "margin", "retain_rule": None})
    assert (out["reduce"], out["success"], out["retain_rule"], out["prompt_format"]) == \
        ("max", "margin", "below", "reference")
    assert protocols.resolve("tpp", None, {})["top_n"] == 10


def test_an_absolute_budget_given_turns_the_presets_relative_one_off():
    opts = resolve_command(_args(["run", "ioi", "--toy", "--out", "o"]), "run ioi", toy=True)
    assert (opts["budget"], opts["budget_rel"]) == (20.0, 0.25)  # the toy preset: 0.25 x the residual
    opts = resolve_command(_args(["run", "ioi", "--toy", "--budget", "20", "--out", "o"]), "run ioi", toy=True)
    assert (opts["budget"], opts["budget_rel"]) == (20.0, None)
    opts = resolve_command(_args(["run", "ioi", "--toy", "--budget", "0.5x", "--out", "o"]), "run ioi", toy=True)
    assert (opts["budget"], opts["budget_rel"]) == ("0.5x", 0.25)  # split by check_options into budget_rel 0.5
    from saerecover.cli.checks import split_budget

    assert split_budget(opts)["budget_rel"] == 0.5


def test_refusal_reference_protocol_is_the_flags_docs_refusal_lists():
    """``run refusal --protocol reference`` resolves to the options of the explicit command in
    docs/refusal.md ("the flags --protocol reference sets, one by one")."""
    import re
    import shlex
    from pathlib import Path

    from saerecover.cli.app import build_parser
    from saerecover.cli.resolve import resolve_command

    text = (Path(__file__).resolve().parents[1] / "docs" / "refusal.md").read_text(encoding="utf-8")
    block = re.search(r"```\n(saerecover run refusal --n 8 .*?)```", text, re.S).group(1)
    argv = shlex.split(block.replace("\\\n", " "))[1:]
    explicit = resolve_command(build_parser().parse_args(argv), "run refusal", toy=True)
    preset = resolve_command(build_parser().parse_args([*argv[:argv.index("--clamp")], "--protocol", "reference"]),
                             "run refusal", toy=True)
    assert preset["protocol"] == "reference"
    assert {k: v for k, v in preset.items() if k != "protocol"} == {k: v for k, v in explicit.items() if k != "protocol"}
