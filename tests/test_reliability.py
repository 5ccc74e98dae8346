"""Reliability (issue 7): concurrent writers, non-finite losses per example, CUDA out-of-memory
halving and token limits, path escapes, and the audit of how untrusted files are read."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from functools import partial

import torch
from saerecover.core.config import RecoveryConfig
from saerecover.core.defended import DefendedModel
from saerecover.core.recovery import recover_batch
from saerecover.experiments import pipeline
from saerecover.experiments.pipeline import Flips, find_flips, recover
from saerecover.runs.errors import RunDirectoryError
from test_pipeline import MarginTask, build

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest: tiny models, one thread

KW = dict(projection=["none", "encoder"], steps=3, lr=0.1, budget=4.0, batch_size=8, progress=False, report=False)
PACKAGE = Path(__file__).resolve().parents[1] / "python" / "saerecover"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("reliability")
    model, clamp, task = build(root)
    flips = find_flips(DefendedModel(model, clamp), task, task.examples())
    valid = [task.examples().ids[i] for i in torch.nonzero(flips.valid).flatten().tolist()]
    assert len(valid) >= 2, "the test clamp should flip some examples"
    return root, model, clamp, task, valid


@pytest.fixture(scope="module")
def reference(setup):
    root, model, clamp, task, _ = setup
    return recover(model, clamp, task, **KW)


def by_key(records):
    return {(r["mode"], r["example_id"]): r for r in records}


# ----------------------------------------------------------------------- concurrent writers

HOLDER = """
import sys, time
sys.path.insert(0, {src!r})
from saerecover.runs.directory import RunDirectory
run = RunDirectory({out!r}, config={{"task": {{"name": "margin"}}}})
print("locked", flush=True)
time.sleep(60)
"""


def test_second_process_writing_the_same_run_is_refused(setup, tmp_path):
    """While another process writes a run directory, recover() on it stops at once, naming the
    holder's pid, and leaves the directory as it was."""
    _, model, clamp, task, _ = setup
    out = tmp_path / "shared"
    src = str(PACKAGE.parent)
    holder = subprocess.Popen([sys.executable, "-c", HOLDER.format(src=src, out=str(out))],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked", holder.stderr.read()
        before = sorted(p.name for p in out.iterdir())
        calls = {"n": 0}
        real = model.forward

        def counting(*a, **k):
            calls["n"] += 1
            return real(*a, **k)

        model.forward = counting
        try:
            with pytest.raises(RunDirectoryError, match=rf"run directory .*shared is in use by another process "
                                                          rf"\(pid {holder.pid}\); wait for it to finish, or choose "
                                                          r"another --out"):
                recover(model, clamp, task, out=out, **KW)
        finally:
            del model.forward
        assert calls["n"] == 0, "the refused run did work before the lock check"
        assert sorted(p.name for p in out.iterdir()) == before
    finally:
        holder.kill()
        holder.wait()
    # once the holder is gone the directory is free again
    recover(model, clamp, task, out=out, overwrite=True, **{**KW, "projection": "none", "steps": 1})


# ------------------------------------------------------------------ non-finite, per example


class NaNLossTask(MarginTask):
    """MarginTask whose recovery loss is NaN for some example ids (the gradient stays finite:
    the NaN is a constant), or whose score is NaN for them (``score_too``) during recovery."""

    def __init__(self, bad: set[str], *, score_too: bool = False) -> None:
        super().__init__()
        self.bad, self.score_too, self.recovering = bad, score_too, False

    def _nan(self, ex, like):
        flags = torch.tensor([i in self.bad for i in ex.ids], device=like.device)
        return torch.where(flags, torch.full_like(like, float("nan")), torch.zeros_like(like))

    def loss(self, logits, ex):
        base = -super().score(logits, ex)
        return base + self._nan(ex, base)

    def score(self, logits, ex):
        s = super().score(logits, ex)
        return s + self._nan(ex, s) if self.score_too and self.recovering else s


@pytest.mark.parametrize("batch_size", [1, 8])
def test_nan_loss_for_one_example_marks_it_failed_and_the_run_continues(setup, reference, tmp_path, batch_size):
    root, model, clamp, _, valid = setup
    bad = valid[0]
    task = NaNLossTask({bad})
    run = recover(model, clamp, task, out=tmp_path / "nan", **{**KW, "batch_size": batch_size})
    got, want = by_key(run.records), by_key(reference.records)
    assert got.keys() == want.keys()
    for mode in KW["projection"]:
        rec = got[(mode, bad)]
        assert rec["failed"] is True and rec["recovered"] is None
        assert re.search(rf"non-finite loss or score at step 0 for examples \['{bad}'\]", rec["error"]), rec["error"]
        for eid in valid[1:]:  # the others ran, and ran exactly as without the bad example
            assert got[(mode, eid)]["failed"] is False
            assert got[(mode, eid)]["recovered_score"] == pytest.approx(want[(mode, eid)]["recovered_score"],
                                                                        rel=1e-4, abs=1e-5)
    summary = json.loads((run.path / "summary.json").read_text())
    assert all(summary["modes"][m]["n_failed"] == 1 for m in KW["projection"])


def test_nan_score_is_caught_by_recover_batch_and_named(setup):
    _, model, clamp, _, valid = setup
    task = NaNLossTask({valid[1]}, score_too=True)
    task.recovering = True
    ex = task.examples()
    keep = [ex.ids.index(v) for v in valid]
    with pytest.raises(FloatingPointError, match=rf"non-finite loss or score at step 0 for examples \['{valid[1]}'\]"):
        recover_batch(DefendedModel(model, clamp), task, ex.select(keep), mode="encoder", cfg=RecoveryConfig(steps=2))
    # steps=0: the only score is the final one, checked too
    with pytest.raises(FloatingPointError, match=rf"non-finite final score for examples \['{valid[1]}'\]"):
        recover_batch(DefendedModel(model, clamp), task, ex.select(keep), mode="none", cfg=RecoveryConfig(steps=0))


def test_nan_defended_score_is_not_a_flip(setup):
    """A clamp that makes the behavior score NaN must not count as suppressing it: NaN > 0 is
    False, so without the finiteness check such an example would be a "valid flip"."""
    _, model, clamp, _, valid = setup
    task = NaNLossTask({valid[0]}, score_too=True)
    task.recovering = True  # the scores of valid[0] are NaN, with and without the clamp
    with pytest.warns(RuntimeWarning, match=r"1 of \d+ examples have a non-finite base or defended"):
        flips = find_flips(DefendedModel(model, clamp), task, task.examples())
    i = task.examples().ids.index(valid[0])
    assert bool(flips.non_finite[i]) and not bool(flips.valid[i])
    assert int(flips.non_finite.sum()) == 1
    others = [task.examples().ids.index(v) for v in valid[1:]]
    assert bool(flips.valid[others].all())
    # a finite base with a NaN or -inf defended score: only the finite pair is a flip
    direct = Flips(base=torch.tensor([1.0, 1.0, 1.0]), defended=torch.tensor([float("nan"), -1.0, -float("inf")]))
    assert direct.valid.tolist() == [False, True, False]


def test_recover_chunk_isolates_the_culprit(setup):
    _, model, clamp, _, valid = setup
    task = NaNLossTask({valid[0]}, score_too=True)
    task.recovering = True
    ex = task.examples()
    part = ex.select([ex.ids.index(v) for v in valid])
    run = partial(pipeline._recover_residual, DefendedModel(model, clamp), task, mode="none",
                  cfg=RecoveryConfig(steps=1), delta_site=None)
    results = pipeline._recover_chunk(run, part)
    assert [err is not None for _, err in results] == [eid == valid[0] for eid in part.ids]
    assert all(oc is not None for oc, err in results if err is None)


# ------------------------------------------------------------------------- out of memory


def fake_oom(monkeypatch, limit: int, sizes: list[int]):
    """recover_batch raises torch.cuda.OutOfMemoryError for batches larger than ``limit``."""
    real = pipeline.recover_batch

    def flaky(defended, task, ex, **kw):
        sizes.append(len(ex))
        if len(ex) > limit:
            raise torch.cuda.OutOfMemoryError(f"CUDA out of memory. Tried to allocate {len(ex)} GiB")
        return real(defended, task, ex, **kw)

    monkeypatch.setattr(pipeline, "recover_batch", flaky)


def test_oom_halves_the_batch_and_records_it(setup, reference, monkeypatch, tmp_path):
    root, model, clamp, task, valid = setup
    n = len(valid)
    sizes: list[int] = []
    fake_oom(monkeypatch, 1, sizes)
    run = recover(model, clamp, task, out=tmp_path / "oom", **{**KW, "batch_size": 8})
    got, want = by_key(run.records), by_key(reference.records)
    assert got.keys() == want.keys()
    for (mode, eid), rec in got.items():
        if eid not in valid:
            continue
        assert rec["failed"] is False, rec["error"]
        assert rec["recovered_score"] == pytest.approx(want[(mode, eid)]["recovered_score"], rel=1e-4, abs=1e-5)
    # the first chunk (min(n, 8) examples) was halved down to 1; later chunks start at the size that fit
    first = min(n, 8)
    assert sizes[0] == first and max(sizes) == first
    assert sum(s == 1 for s in sizes) == 2 * n
    retried = [r for r in run.records if r.get("oom_retries")]
    assert retried and all(r["oom_retries"] >= 1 for r in retried)
    expected_halvings = first - 1  # splitting a chunk of m down to singletons takes m - 1 halvings
    assert run.summary["oom_retries"] == expected_halvings
    assert json.loads((run.path / "summary.json").read_text())["oom_retries"] == expected_halvings


def test_oom_while_finding_flips_halves_the_chunk(setup, monkeypatch):
    _, model, clamp, task, _ = setup
    defended, ex = DefendedModel(model, clamp), task.examples()
    want = pipeline.find_flips(defended, task, ex, batch_size=8)
    real, sizes = pipeline._score_chunk, []

    def flaky(defended, task, part, with_clamp):
        sizes.append(len(part))
        if len(part) > 3:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(defended, task, part, with_clamp)

    monkeypatch.setattr(pipeline, "_score_chunk", flaky)
    got = pipeline.find_flips(defended, task, ex, batch_size=8)
    # chunks of other sizes may sum in another order: equal to float32 round-off, not bit for bit
    assert torch.allclose(got.base, want.base, rtol=1e-5, atol=1e-6)
    assert torch.allclose(got.defended, want.defended, rtol=1e-5, atol=1e-6)
    # each pass (without, then with the clamp) halves 8 -> 4 -> 2 and keeps 2 for the rest
    assert sizes[:3] == [8, 4, 2] and set(sizes) <= {1, 2, 4, 8}  # 1: an odd remainder at the end
    assert sizes.count(8) == 2 and sum(s for s in sizes if s <= 3) == 2 * len(ex)

    def never(defended, task, part, with_clamp):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 9.00 GiB")

    monkeypatch.setattr(pipeline, "_score_chunk", never)
    with pytest.raises(MemoryError, match=r"CUDA out of memory in scoring without the clamp with a batch of 1 \(example '.*'\)"):
        pipeline.find_flips(defended, task, ex, batch_size=8)


def test_oom_even_for_one_example_fails_it_and_continues(setup, monkeypatch):
    _, model, clamp, task, valid = setup
    sizes: list[int] = []
    fake_oom(monkeypatch, 0, sizes)
    run = recover(model, clamp, task, **{**KW, "projection": "none", "batch_size": 4})
    failed = [r for r in run.records if r["valid"]]
    assert len(failed) == len(valid)
    assert all(r["failed"] and "CUDA out of memory even with a batch of 1" in r["error"] for r in failed)
    assert run.summary["modes"]["none"]["recovery_rate"] == 0.0


def test_max_batch_tokens_caps_every_chunk(setup, monkeypatch):
    _, model, clamp, task, valid = setup
    seen: list[tuple[int, int]] = []
    real = pipeline.recover_batch

    def spy(defended, task_, ex, **kw):
        seen.append((len(ex), int(ex.attention_mask.sum(1).max())))
        return real(defended, task_, ex, **kw)

    monkeypatch.setattr(pipeline, "recover_batch", spy)
    recover(model, clamp, task, **{**KW, "projection": "none", "batch_size": 16, "max_batch_tokens": 17})
    assert sum(n for n, _ in seen) == len(valid)
    assert all(n * longest <= 17 or n == 1 for n, longest in seen)
    assert any(n > 1 for n, _ in seen) or len(valid) == 1


def test_memory_limit_turns_into_a_token_limit(setup):
    _, model, *_ = setup
    per_token = pipeline.estimate_activation_bytes(1, 1, model.d_model, model.n_layers)
    assert per_token == model.d_model * model.n_layers * pipeline.ACTIVATION_VALUES_PER_TOKEN_LAYER * 4
    assert pipeline._token_limit(model, None, 1.0) == 2**20 // per_token
    assert pipeline._token_limit(model, 7, 1.0) == 7
    assert pipeline._token_limit(model, None, None) is None
    assert pipeline._token_limit(model, None, 1e-9) == 1  # never below one token


# ------------------------------------------------------------------------ untrusted files


class RenamedTask(MarginTask):
    """MarginTask whose first example id is ``first`` (as an id read from a config file might be)."""

    def __init__(self, first: str) -> None:
        super().__init__()
        self.first = first

    def examples(self):
        ex = super().examples()
        ex.ids[0] = self.first
        return ex


@pytest.mark.parametrize("bad", ["../escape", "..", "a/../../b", "/abs/path", "sub/dir", ".hidden", "x" * 201,
                                 "nul\0byte", "new\nline", "C:\\win"])
def test_example_ids_cannot_escape_the_run_directory(setup, tmp_path, bad):
    _, model, clamp, _, _ = setup
    with pytest.raises(RunDirectoryError, match=r"example_id .* cannot be used as a file name"):
        recover(model, clamp, RenamedTask(bad), out=tmp_path / "box" / "run", **KW)
    assert list(tmp_path.rglob("*")) == [], "nothing may be written before the ids are checked"


def _source_files():
    return [p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts]


def test_no_unsafe_deserialization_in_the_package():
    """Tensors are read with safetensors only, configs with json / yaml.safe_load / tomllib."""
    bad = []
    for path in _source_files():
        for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            code = line.split("#", 1)[0]
            if re.search(r"\btorch\.load\(", code) and "weights_only=True" not in code:
                bad.append(f"{path.name}:{lineno}: torch.load without weights_only=True")
            if re.search(r"\b(import pickle|pickle\.loads?\(|cPickle|dill\.|joblib\.load)", code):
                bad.append(f"{path.name}:{lineno}: pickle")
            if re.search(r"\byaml\.(load|unsafe_load|full_load)\(", code):
                bad.append(f"{path.name}:{lineno}: yaml loader other than safe_load")
            if re.search(r"(?<![\w.])(eval|exec)\(", code) or "np.load(" in code and "allow_pickle=True" in code:
                bad.append(f"{path.name}:{lineno}: code execution")
    assert not bad, "\n".join(bad)


def test_yaml_tags_in_a_config_are_not_executed(tmp_path, capsys):
    """A YAML config with a python/object tag is refused by safe_load, with a one-line error."""
    from saerecover.cli import main

    marker = tmp_path / "pwned"
    cfg = tmp_path / "evil.yaml"
    cfg.write_text(f"steps: !!python/object/apply:os.system ['touch {marker}']\n")
    assert main(["run", "ioi", "--config", str(cfg), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("saerecover: error: config file") and "not valid YAML" in err and "\n" not in err
    assert not marker.exists()


def test_refusal_records_keep_the_text_out():
    """What a run stores about a response (refusal_text.opening_record) holds no words of it."""
    from saerecover.tasks.refusal.judge import opening_record

    text = "Sure, here is how to synthesize the compound step by step: first obtain zyxwv precursors"
    rec = opening_record(text)
    blob = json.dumps(rec)
    assert "zyxwv" not in blob and "synthesize" not in blob and "Sure" not in blob
    assert set(rec) == {"category", "refusal", "safety_cue", "degenerate", "opening_sha256", "n_words"}
