"""Reliability at the command line: a run stopped by SIGINT / SIGTERM and resumed, config files
that expand without bound, numbers past their bounds, negative list values, a non-UTF-8 --out,
learning rates that overflow float32, the meta device, damaged summaries, and the run-directory
refusals that must come before the model loads. Then the encoder mode's warning when the clamped
encoder columns leave it no null space.

Everything runs the toy world (or a tiny model) with a few examples and steps; in-process runs
reuse one loaded toy world (``saerecover.toy.load`` patched to return it)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch

from saerecover import toy
from saerecover.cli import main
from saerecover.cli.resolve import load_config_file
from test_pipeline import MarginTask, assert_same_records

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest: one torch thread

SRC = Path(__file__).resolve().parents[1] / "python"
#: A toy run small enough to take a few seconds, with several batches per mode (the toy world's
#: seed-0 prompts: 12 examples, 9 valid flips per mode).
RUN = ["run", "ioi", "--toy", "--n", "12", "--steps", "8", "--batch-size", "2", "--quiet"]


def cli(argv: list[str], capsys) -> tuple[int, str, str]:
    """``saerecover ARGV`` in this process: (exit status, stdout, stderr)."""
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exit_:
        code = exit_.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def one_error(err: str) -> str:
    """The single ``saerecover: error: ...`` line of stderr (asserted to be the only line)."""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("saerecover: error: "), err
    assert "Traceback" not in err
    return lines[0].removeprefix("saerecover: error: ")


def read_records(path: Path) -> list[dict]:
    """records.jsonl's records; every line complete (ends with a newline and is one JSON object)."""
    text = (path / "records.jsonl").read_text(encoding="utf-8")
    assert text == "" or text.endswith("\n"), "records.jsonl ends in a cut-off line"
    return [json.loads(line) for line in text.splitlines()]


@pytest.fixture(scope="module")
def world():
    return toy.load()


@pytest.fixture
def cached_toy(world, monkeypatch):
    """``saerecover.toy.load`` returns the module's loaded toy world (the CLI path is unchanged)."""
    monkeypatch.setattr(toy, "load", lambda **kwargs: world)
    return world


@pytest.fixture
def no_load(monkeypatch):
    """Loading the toy world or a model fails the test: the error must come before it."""
    import saerecover.models as models

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the error")

    monkeypatch.setattr(toy, "load", refuse)
    monkeypatch.setattr(models, "load_model", refuse)


def run_in(world, argv: list[str]) -> int:
    """``saerecover ARGV`` with the toy world ``world`` (for module fixtures: no monkeypatch)."""
    real = toy.load
    toy.load = lambda **kwargs: world
    try:
        return main(argv)
    finally:
        toy.load = real


@pytest.fixture(scope="module")
def reference(world, tmp_path_factory):
    """The uninterrupted run of RUN: its records."""
    out = tmp_path_factory.mktemp("reference") / "run"
    assert run_in(world, [*RUN, "--out", str(out)]) == 0
    records = read_records(out)
    assert len(records) == 24 and sum(r["valid"] for r in records) == 18  # 12 examples x 2 modes; 9 flips each
    return records


# ------------------------------------------------------------------------ 1. SIGINT / SIGTERM


def start(argv: list[str]) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    return subprocess.Popen([sys.executable, "-m", "saerecover.cli", *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)


def wait_for_records(proc: subprocess.Popen, out: Path, *, valid: bool, timeout: float = 120.0) -> None:
    """Until records.jsonl holds a line (``valid``: a recovered example's line, i.e. the first
    batch is written)."""
    path = out / "records.jsonl"
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        assert proc.poll() is None, f"the run ended before it was signalled: {proc.communicate()}"
        text = path.read_text(encoding="utf-8") if path.exists() else ""
        if any('"valid": true' in line for line in text.splitlines()) if valid else text.strip():
            return
        time.sleep(0.005)
    raise AssertionError("no record was written in time")


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_stops_after_the_batch_and_the_same_command_resumes(signum, reference, cached_toy, tmp_path,
                                                                     capsys):
    """The first signal lets the batch in flight finish and be written, then the command ends
    with 128 + the signal (130 / 143) and one line saying how to resume; rerunning the command
    finishes the run with every (example, mode) once and the uninterrupted run's records."""
    out = tmp_path / "run"
    proc = start([*RUN, "--out", str(out)])
    wait_for_records(proc, out, valid=True)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=120)
    name = signal.Signals(signum).name
    assert proc.returncode == 128 + int(signum)
    kept = read_records(out)
    assert 0 < len(kept) < 24  # the run stopped early, every line complete
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines == [f"saerecover: {name} received: stopping once the current batch is written (send it again to "
                     "stop now)",
                     f"saerecover: interrupted by {name}; {out} keeps {len(kept)} record(s) of the examples finished "
                     "so far: run the same command again (same --out) to resume where it stopped"]
    code, _, err = cli([*RUN, "--out", out], capsys)
    assert code == 0, err
    records = read_records(out)
    keys = [(r["mode"], r["example_id"]) for r in records]
    assert len(keys) == len(set(keys)) == 24
    assert_same_records(records, reference)


def test_a_second_signal_stops_at_once(tmp_path):
    """A second SIGINT raises in the middle of the batch: the batch (400 steps, seconds long)
    is lost, records.jsonl keeps its complete lines (the flips' records written before it), and
    the exit is 130 with the resume line."""
    out = tmp_path / "run"
    proc = start(["run", "ioi", "--toy", "--n", "12", "--steps", "400", "--batch-size", "12", "--quiet",
                  "--out", str(out)])
    wait_for_records(proc, out, valid=False)  # the invalid examples' records: the batch starts now
    proc.send_signal(signal.SIGINT)
    time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    t0 = time.monotonic()
    _, err = proc.communicate(timeout=120)
    assert time.monotonic() - t0 < 10
    assert proc.returncode == 130
    kept = read_records(out)
    assert kept and not any(r["valid"] for r in kept)  # the batch in flight was not written
    assert err.strip().splitlines()[-1] == (
        f"saerecover: interrupted by SIGINT; {out} keeps {len(kept)} record(s) of the examples finished so far: "
        "run the same command again (same --out) to resume where it stopped")
    assert "Traceback" not in err


# ---------------------------------------------------------------------- 2. YAML alias bombs


def alias_bomb(key: str, levels: int = 9, width: int = 9) -> str:
    """``key: [&a0 [9 items], &a1 [*a0 x 9], ...]``: under 500 bytes, 9**9 (387 million) items."""
    first = "BABA" if key == "patterns" else ("none" if key == "modes" else "1")
    parts = [f"&a0 [{', '.join([first] * width)}]"]
    parts += [f"&a{i} [{', '.join([f'*a{i - 1}'] * width)}]" for i in range(1, levels)]
    return f"{key}: [{', '.join(parts)}]\n"


@pytest.mark.parametrize("key", ["patterns", "features", "modes"])
def test_a_yaml_alias_bomb_under_a_list_key_is_one_line_at_once(key, no_load, tmp_path, capsys):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(alias_bomb(key))
    assert cfg.stat().st_size < 500
    t0 = time.perf_counter()
    code, _, err = cli(["run", "ioi", "--toy", "--config", cfg, "--out", tmp_path / "o"], capsys)
    assert time.perf_counter() - t0 < 1.0
    assert code == 2
    assert one_error(err) == (f"config file {cfg}: the value of {key!r} expands to more than 100,000 items (YAML "
                              "anchors and aliases repeat what they name); give the values themselves")


def test_a_modest_anchor_and_alias_still_load(tmp_path):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("features: &f [1, 2, 3]\nclasses: [*f, *f]\nmodes: [&m none, encoder]\n")
    assert load_config_file(cfg) == {"features": [1, 2, 3], "classes": [[1, 2, 3], [1, 2, 3]],
                                     "modes": ["none", "encoder"]}


# ------------------------------------------------------------------- 3. counts past the bound


def test_n_past_the_bound_is_refused_before_loading(no_load, tmp_path, capsys):
    code, _, err = cli(["run", "ioi", "--toy", "--n", "100000000", "--out", tmp_path / "o"], capsys)
    assert code == 2
    assert one_error(err) == "option n must be at most 1,000,000 examples, got 100,000,000"
    # YAML 1.1 reads 1e26 (no dot) as text, 1.0e+26 as a number; JSON 1e26 is a number
    for name, text, shown in (("a.yaml", "n: 1e26\n", "'1e26'"), ("b.yaml", "n: 1.0e+26\n", "1e+26"),
                              ("c.json", '{"n": 1e26}', "1e+26")):
        (tmp_path / name).write_text(text)
        code, _, err = cli(["run", "ioi", "--toy", "--config", tmp_path / name, "--out", tmp_path / "o"], capsys)
        assert code == 2
        assert one_error(err) == f"option n must be at most 1,000,000 examples, got {shown}"
    assert not (tmp_path / "o").exists()


# --------------------------------------------------------------------- 4. negative list values


def test_negative_features_and_budgets_reach_their_own_checks(no_load, tmp_path, capsys):
    """``-1,2`` is a value, not an unknown option (argparse alone said "expected one argument")."""
    code, _, err = cli(["run", "ioi", "--toy", "--features", "-1,2", "--out", tmp_path / "o"], capsys)
    assert code == 2
    assert one_error(err) == "--features: feature indices are >= 0, got -1 in '-1,2'"
    code, _, err = cli(["sweep", "budget", "--toy", "--budgets", "-1,2", "--out", tmp_path / "s"], capsys)
    assert code == 2
    assert one_error(err) == "every budget must be a finite number > 0, got -1.0"


# ------------------------------------------------------------------------- 5. non-UTF-8 --out


def test_a_non_utf8_out_is_refused_before_loading(no_load, tmp_path, capsys):
    out = os.fsdecode(bytes(tmp_path) + b"/run\xff")
    code, _, err = cli(["run", "ioi", "--toy", "--out", out], capsys)
    assert code == 2
    assert one_error(err) == (f"--out {ascii(out)} is not valid UTF-8 (bytes {os.fsencode(out)!r}); the run records "
                              "its paths as UTF-8 text: choose a UTF-8 name")
    assert os.listdir(tmp_path) == []


# ------------------------------------------------------------------- 6. lr overflowing float32


@pytest.mark.parametrize("optimizer,lr", [("adam", "1e38"), ("adam", "1e308"), ("sgd", "1e308")])
def test_an_overflowing_lr_fails_the_examples_and_the_run_finishes(optimizer, lr, cached_toy, tmp_path, capsys):
    """Adam at lr 1e38 and SGD at 1e308 fail inside the optimizer's step (torch cannot turn the
    scaled lr into a float32); Adam at 1e308 steps to an infinite delta, caught before any
    projection. Each valid example is marked failed with the overflow named; the run, its
    summary and a rerun finish."""
    argv = ["run", "ioi", "--toy", "--n", "4", "--steps", "2", "--lr", lr, "--optimizer", optimizer, "--quiet",
            "--out", tmp_path / "o"]
    code, out, err = cli(argv, capsys)
    assert code == 0, err
    assert "Traceback" not in err
    records = read_records(tmp_path / "o")
    valid = [r for r in records if r["valid"]]
    assert len(records) == 8 and len(valid) == 6  # the toy world's 4 prompts: 3 flips per mode
    for r in valid:
        assert r["failed"] is True and r["recovered"] is None
        shown = re.escape(f"{float(lr):g}")
        assert re.fullmatch(rf"the {optimizer} step overflowed at step 0 \(lr={shown}\): 'value cannot be converted "
                            rf"to type float without overflow'|non-finite delta after the {optimizer} step at step 0 "
                            rf"for examples \['{r['example_id']}'\]: the step overflowed float32 \(lr={shown} is "
                            r"too large\)", r["error"]), r["error"]
    summary = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert [summary["modes"][m]["n_failed"] for m in ("none", "encoder")] == [3, 3]
    code, _, err = cli(argv, capsys)  # everything is recorded: the rerun only rewrites the summary
    assert code == 0 and "Traceback" not in err
    assert read_records(tmp_path / "o") == records


# ------------------------------------------------------------- 6b. --max-drift, flag and file


@pytest.mark.parametrize("how", ["flag", "config"])
def test_max_drift_as_documented_runs(how, cached_toy, tmp_path, capsys):
    """``--max-drift 0.03`` (and ``max_drift: 0.03`` in a config file) ran into a RecursionError in
    the option coercion: it runs, and the run records the limit."""
    if how == "flag":
        extra = ["--max-drift", "0.03"]
    else:
        (tmp_path / "c.yaml").write_text("max_drift: 0.03\n")
        extra = ["--config", tmp_path / "c.yaml"]
    code, _, err = cli(["run", "ioi", "--toy", "--n", "4", "--steps", "2", "--quiet", "--out", tmp_path / "o", *extra],
                       capsys)
    assert code == 0, err
    assert json.loads((tmp_path / "o" / "config.json").read_text())["recovery"]["max_drift"] == 0.03


def test_analyze_of_a_cut_short_tensor_file_names_it(cached_toy, tmp_path, capsys):
    """A truncated .safetensors is one PROBLEM line naming the file, not a SafetensorError traceback."""
    out = tmp_path / "o"
    assert cli(["run", "ioi", "--toy", "--n", "4", "--steps", "2", "--quiet", "--out", out], capsys)[0] == 0
    damaged = sorted((out / "tensors").rglob("*.safetensors"))[0]
    with open(damaged, "r+b") as f:
        f.truncate(100)
    code, stdout, err = cli(["analyze", out], capsys)
    assert code == 1 and "Traceback" not in err
    problems = [line for line in stdout.splitlines() if line.startswith("PROBLEM:")]
    assert problems == [f"PROBLEM: cannot read {damaged}: Error while deserializing header: invalid header length "
                        "(a damaged or cut-short safetensors file)"]


# ------------------------------------------------------------------------------ 7. meta device


def test_the_meta_device_is_refused(no_load, tmp_path, capsys):
    code, _, err = cli(["run", "ioi", "--toy", "--device", "meta", "--out", tmp_path / "o"], capsys)
    assert code == 2
    assert one_error(err) == ("device 'meta' holds shapes but no values: nothing can be computed on it; use e.g. "
                              "'cpu' or 'cuda'")


# ------------------------------------------------------------------------ 8. damaged summaries


@pytest.fixture(scope="module")
def finished(world, tmp_path_factory):
    """A finished toy run (4 examples, 1 step)."""
    out = tmp_path_factory.mktemp("finished") / "run"
    assert run_in(world, ["run", "ioi", "--toy", "--n", "4", "--steps", "1", "--quiet", "--out", str(out)]) == 0
    return out


@pytest.mark.parametrize("text,what", [
    ("[]", "it holds a list, not an object"),
    ('{"modes": 5}', '"modes" is the number 5, not an object of modes'),
    ('{"modes": {"none": "x"}}', "mode 'none' is a string, not an object"),
])
def test_report_of_a_damaged_run_summary_is_one_line(text, what, finished, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    (run / "summary.json").write_text(text)
    code, _, err = cli(["report", run], capsys)
    assert code == 2
    assert one_error(err) == (f"{run / 'summary.json'} is not a run summary: {what}; rerun the run (it resumes and "
                              "rewrites the summary) or restore the file")


@pytest.mark.parametrize("kind,rows", [("budget_sweep", "budget_sweep"), ("feature_sweep", "feature_sweep"),
                                       ("tpp", "per_class")])
def test_report_of_a_collection_summary_without_its_rows_is_one_line(kind, rows, tmp_path, capsys):
    root = tmp_path / "sweep"
    root.mkdir()
    (root / "summary.json").write_text(json.dumps({"collection": kind, "task": "toy-ioi", "modes": ["none"],
                                                   "budgets": [1.0, 2.0], "ks": [1, 2], "n_examples": 4}))
    code, _, err = cli(["report", root], capsys)
    assert code == 2
    assert one_error(err) == (f"{root / 'summary.json'} is not a readable {kind} summary: it has no {rows!r}; rerun "
                              "the command that wrote it (it resumes)")


# ---------------------------------------------------------------------------- 9. 64-bit seeds


def test_a_seed_past_64_bits_is_refused_before_loading(no_load, tmp_path, capsys):
    message = "seed must be a 64-bit integer (-2**63 <= seed < 2**63), got "
    code, _, err = cli(["run", "ioi", "--toy", "--seed", str(2**70), "--out", tmp_path / "o"], capsys)
    assert code == 2 and one_error(err) == message + str(2**70)
    (tmp_path / "s.yaml").write_text("seed: 1.0e+23\n")
    code, _, err = cli(["run", "ioi", "--toy", "--config", tmp_path / "s.yaml", "--out", tmp_path / "o"], capsys)
    assert code == 2 and one_error(err) == "option " + message + "1e+23"
    code, _, err = cli(["run", "ioi", "--toy", "--seed", "1e23", "--out", tmp_path / "o"], capsys)
    assert code == 2
    assert one_error(err) == "run ioi: argument --seed: invalid int value: '1e23' (see saerecover run ioi --help)"


# ---------------------------------------------- 10. run-directory refusals before the model loads


def test_out_inside_a_file_is_refused_before_loading(no_load, tmp_path, capsys):
    (tmp_path / "f").write_text("x")
    code, _, err = cli(["run", "ioi", "--toy", "--out", tmp_path / "f" / "run"], capsys)
    assert code == 2
    assert one_error(err) == (f"--out {tmp_path / 'f' / 'run'} is inside {tmp_path / 'f'}, which is a file; choose "
                              "a path inside a directory")


HOLDER = """
import sys, time
sys.path.insert(0, {src!r})
from saerecover.runs.directory import RunDirectory
run = RunDirectory({out!r}, config={{"task": {{"name": "toy-ioi"}}}})
print("locked", flush=True)
time.sleep(60)
"""


def test_a_directory_in_use_is_refused_before_loading(no_load, tmp_path, capsys):
    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER.format(src=str(SRC), out=str(out))],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked", holder.stderr.read()
        code, _, err = cli(["run", "ioi", "--toy", "--out", out], capsys)
        assert code == 2
        assert one_error(err) == (f"--out {out} is in use by another process (pid {holder.pid}); wait for it to "
                                  "finish, or choose another --out")
    finally:
        holder.kill()
        holder.wait()


def test_a_differing_config_is_refused_before_loading_with_both_values(cached_toy, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    base = ["run", "ioi", "--toy", "--n", "4", "--quiet", "--out", out]
    code, _, err = cli([*base, "--steps", "20", "--features", "1,2"], capsys)
    assert code == 0, err

    def refuse(**kwargs):
        raise AssertionError("the toy world was loaded before the error")

    monkeypatch.setattr(toy, "load", refuse)
    code, _, err = cli([*base, "--steps", "22", "--lr", "0.5", "--features", "1,2"], capsys)
    assert code == 2
    assert one_error(err) == (f"{out} holds a run with another config; differing key(s): recovery.steps, recovery.lr; "
                              "recovery.steps: run has 20, new config has 22; recovery.lr: run has 0.1, new config "
                              "has 0.5; choose a new --out, or pass --overwrite to discard the old run")


# ------------------------------------------------------------------------------------ 11. merge


def test_cli_merge_into_a_folder_inside_a_shard_is_refused(tmp_path, capsys):
    from test_run_files import CONFIG, finished_run

    shards = [finished_run(tmp_path / f"s{i}", {**CONFIG, "shard": {"index": i, "count": 2}}) for i in range(2)]
    code, _, err = cli(["merge", shards[0] / "merged", *shards], capsys)
    assert code == 2
    assert one_error(err) == (f"OUT {shards[0] / 'merged'} is inside the input {shards[0]}; merging would write into "
                              "a shard: choose an OUT outside every input")
    assert not (shards[0] / "merged").exists()


# ------------------------------------------------- 13. encoder mode without a null space to move in


@pytest.fixture(scope="module")
def square(tmp_path_factory):
    """A tiny GPT-2 with d_model 16, an SAE of 48 features on it, the margin task and the
    features ranked by attribution."""
    from sae_lens import SAE

    from saerecover.core.selection import attribution_scores
    from saerecover.core.sites import load_site
    from saerecover.models import load_model
    from saerecover.testing import tiny_gpt2

    root = tmp_path_factory.mktemp("square")
    model_dir = tiny_gpt2(root, n_layers=2, d_model=16)
    torch.manual_seed(0)
    sae = SAE.from_dict({"architecture": "standard", "d_in": 16, "d_sae": 48, "dtype": "float32", "device": "cpu",
                         "apply_b_dec_to_input": True, "normalize_activations": "none",
                         "metadata": {"hook_name": "blocks.0.hook_resid_post"}})
    with torch.no_grad():
        sae.b_enc.add_(0.05)
    sae.save_model(root / "sae")
    model = load_model(str(model_dir))
    site = load_site(root / "sae", model=model)
    task = MarginTask(n=12)
    ranked = torch.argsort(attribution_scores(model, site, task, task.examples()), descending=True)
    return root, model, site, task, ranked


def _recover_square(square, k: int, out: Path):
    from saerecover.core.clamp import Clamp
    from saerecover.experiments.pipeline import recover

    _, model, site, task, ranked = square
    clamp = Clamp({site: ranked[:k]}, value=-3.0, where="all")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run = recover(model, clamp, task, projection=["none", "encoder"], steps=8, lr=0.1, budget=4.0, batch_size=12,
                      progress=False, out=out)
    return run, [str(w.message) for w in caught if "encoder mode" in str(w.message)]


def test_encoder_mode_warns_when_the_clamped_columns_span_the_residual(square, tmp_path):
    """16 clamped features in d_model 16: A_S (16 x 16, random) has rank 16, the null space of
    A_S^T is {0}, the encoder mode's delta is projected to 0 and recovers nothing; the run warns,
    and says so in summary.json and report.md."""
    from saerecover.core.projection import MIN_ENCODER_NULL_FRACTION

    assert MIN_ENCODER_NULL_FRACTION == 0.05
    run, caught = _recover_square(square, 16, tmp_path / "run")
    message = ("encoder mode at blocks.0.hook_resid_post: the 16 clamped features' encoder columns have rank 16 in "
               "d_model 16, leaving a null space of dimension 0 (under 5% of d_model): encoder mode cannot move "
               "delta there, so its recovery rate says nothing about the clamp")
    assert caught == [message]
    summary = json.loads((run.path / "summary.json").read_text())
    assert summary["warnings"] == [{"kind": "encoder_null_space", "site": "blocks.0.hook_resid_post", "n_features": 16,
                                    "rank": 16, "d_model": 16, "null_dim": 0, "message": message}]
    enc = summary["modes"]["encoder"]
    assert (enc["recovered"], enc["n_valid"]) == (0, 6)
    assert max(r["delta_norm"] for r in run.records if r["mode"] == "encoder" and r["valid"]) == 0.0
    report = (run.path / "report.md").read_text()
    assert f"## Warnings\n\n{message}\n" in report
    assert message.replace("'", "&#39;") in (run.path / "report.html").read_text()


def test_encoder_mode_does_not_warn_with_a_few_clamped_features(square, tmp_path):
    """4 clamped features in d_model 16: a null space of dimension 12 (75%), no warning."""
    run, caught = _recover_square(square, 4, tmp_path / "run")
    assert caught == []
    summary = json.loads((run.path / "summary.json").read_text())
    assert "warnings" not in summary
    assert "## Warnings" not in (run.path / "report.md").read_text()
