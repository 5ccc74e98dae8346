"""Said, not hidden: fewer features than requested (a warning, recorded in config.json and the
report), a refusal contrast on too few refused or answered requests (an error with the counts),
the chat template's system prompt (recorded, settable, empty included), and ``--n`` with a real
model in ``run refusal`` (an error pointing to --limit)."""

from __future__ import annotations

import json
import re

import pytest
import torch
from test_pipeline import MarginTask, build
from test_refusal import REQUESTS, TINY_KW, tiny  # noqa: F401  (tiny: a module fixture)

from saerecover.cli import main
from saerecover.core.selection import attribution_scores, fewer_features_note, select_by_attribution
from saerecover.core.sites import load_site
from saerecover.experiments.refusal import build_setting
from saerecover.models import load_model
from saerecover.tasks.refusal.task import Refusal

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_fewer_features_note_names_both_counts():
    assert fewer_features_note("blocks.1.hook_resid_post", 64, 64, "x") is None
    assert fewer_features_note("blocks.1.hook_resid_post", 64, 49, "a positive attribution to the behavior") == (
        "blocks.1.hook_resid_post: 49 features selected where top_k=64 was asked: only 49 have a positive "
        "attribution to the behavior")


def test_fewer_features_than_requested_warn_and_are_recorded(tmp_path, monkeypatch, capsys):
    """top_k = d_sae (96) can only be met if every feature has a positive attribution; the run
    clamps the positive ones, warns, and config.json and report.md say how many."""
    import saerecover.cli.ioi as cli_ioi

    build(tmp_path)
    model = load_model(str(tmp_path / "tiny-gpt2"), device="cpu")
    site = load_site(tmp_path / "sae", model=model)
    task = MarginTask()
    n_positive = int((attribution_scores(model, site, task, task.examples()) > 0).sum())
    assert 0 < n_positive < 96
    with pytest.warns(UserWarning, match=f"{n_positive} features selected where top_k=96 was asked"):
        assert len(select_by_attribution(model, site, task, task.examples(), top_k=96)) == n_positive
    monkeypatch.setattr(cli_ioi, "ioi_task", lambda tokenizer, opts: MarginTask())
    out = tmp_path / "run"
    with pytest.warns(UserWarning, match="top_k=96"):
        assert main(["run", "ioi", "--model", str(tmp_path / "tiny-gpt2"), "--sae", str(tmp_path / "sae"),
                     "--top-k", "96", "--steps", "1", "--modes", "none", "--device", "cpu", "--quiet",
                     "--out", str(out)]) == 0
    selection = json.loads((out / "config.json").read_text())["selection"]
    assert selection["top_k"] == 96 and selection["n_selected"] == n_positive
    assert selection["notes"] == [fewer_features_note(site.hook_name, 96, n_positive,
                                                      "a positive attribution to the behavior")]
    assert f"feature selection: {selection['notes'][0]}" in (out / "report.md").read_text()


def test_refusal_contrast_on_too_few_requests_is_an_error_with_the_counts(tiny):  # noqa: F811
    model, sites = tiny
    ctask = Refusal(model, REQUESTS, **TINY_KW)
    refused, answered = int(ctask.base_refused().sum()), int(ctask.base_answered().sum())
    assert refused >= 1 and answered >= 1
    need = max(refused, answered) + 1
    with pytest.raises(ValueError, match=(f"needs at least {need} refused and {need} answered requests; the base "
                                          f"model refused {refused} and answered {answered} of {len(REQUESTS)} "
                                          r"contrast requests: give --contrast more")):
        build_setting(model, sites, REQUESTS, REQUESTS, top_k=8, min_contrast=need, **TINY_KW)
    setting = build_setting(model, sites, REQUESTS, REQUESTS, top_k=8, min_contrast=min(refused, answered),
                            **TINY_KW)
    assert setting.selection["min_contrast"] == min(refused, answered)


DEFAULT_SYSTEM = "You are a default assistant"
TEMPLATE_WITH_DEFAULT_SYSTEM = (
    "{% if messages[0]['role'] != 'system' %}[system] " + DEFAULT_SYSTEM + " {% endif %}"
    "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }} {% endfor %}[assistant]")


def test_system_prompt_is_recorded_and_settable(tiny):  # noqa: F811
    model, _ = tiny
    tok = model.tokenizer
    old = tok.chat_template
    try:
        tok.chat_template = TEMPLATE_WITH_DEFAULT_SYSTEM
        default = Refusal(model, ["the cat"], max_new_tokens=2).describe()
        assert default["system_prompt"] is None  # the template's own, and what it renders is on record:
        assert default["chat_prompt"] == f"[system] {DEFAULT_SYSTEM} [user] {{request}} [assistant]"
        empty = Refusal(model, ["the cat"], system_prompt="", max_new_tokens=2)
        assert empty.prompt_text("the cat") == "[system]  [user] the cat [assistant]"
        own = Refusal(model, ["the cat"], system_prompt="Be brief.", max_new_tokens=2).describe()
        assert own["system_prompt"] == "Be brief." and DEFAULT_SYSTEM not in own["chat_prompt"]
    finally:
        tok.chat_template = old
    with pytest.raises(ValueError, match="system_prompt needs the chat template"):
        Refusal(model, ["the cat"], system_prompt="Be brief.", max_new_tokens=2)


@pytest.mark.parametrize("flag", ["--n", "--n-contrast"])
def test_n_with_a_model_in_run_refusal_points_to_limit(tmp_path, capsys, flag):
    """Refused before anything loads (the model path need not hold a model)."""
    requests = tmp_path / "r.txt"
    requests.write_text("a\nb\n")
    assert main(["run", "refusal", "--model", str(tmp_path), "--saes", str(tmp_path), "--requests", str(requests),
                 flag, "5", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and f"{flag} draws toy-world requests and does nothing with --model" in err
    assert "use --limit N" in err


def test_system_prompt_flag_reaches_the_options(tmp_path):
    from saerecover.cli.app import build_parser
    from saerecover.cli.resolve import resolve_command

    args = build_parser().parse_args(["run", "refusal", "--system-prompt", "", "--out", str(tmp_path)])
    assert resolve_command(args, "run refusal")["system_prompt"] == ""
    torch.manual_seed(0)


def test_the_command_line_says_our_warnings_in_one_line(tmp_path):
    """At the command line a saerecover warning is one ``saerecover: warning:`` line (like the
    errors), not Python's two-line format with the source line that raised it."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    src = Path(__file__).resolve().parents[1] / "python"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(src), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "saerecover.cli", "run", "ioi", "--toy", "--n", "4", "--steps", "1",
                           "--top-k", "4000", "--modes", "none", "--quiet", "--out", str(tmp_path / "o")],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    ours = [line for line in done.stderr.splitlines() if "top_k=4000" in line]
    assert len(ours) == 1 and re.fullmatch(
        r"saerecover: warning: blocks\.1\.hook_resid_post: \d+ features selected where top_k=4000 was asked: "
        r"only \d+ have a positive attribution to the behavior", ours[0]), done.stderr
    assert "select_by_attribution(" not in done.stderr  # no source line
