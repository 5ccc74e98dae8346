"""The run directory: resume, repair, refusal, locking, atomic writes, safe names, tensors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import saerecover
import torch
from saerecover.runs import directory as runs_mod
from saerecover.runs.directory import RunDirectory, config_hash, open_run, validate_name
from saerecover.runs.errors import RunDirectoryError
from saerecover.runs.files import atomic_write_json, atomic_write_text

CONFIG = {
    "task": {"name": "ioi", "n": 8, "seed": 0},
    "model": {"name": "toy", "backend": "hf"},
    "recovery": {"steps": 100, "lr": 0.1, "budget": 20.0},
    "modes": ["none", "encoder"],
}


def rec(eid: str, mode: str = "none", **kw) -> dict:
    return {"example_id": eid, "mode": mode, "valid": True, "recovered": True, "failed": False,
            "error": None, "delta_norm": 1.0, **kw}


def _subprocess_env() -> dict[str, str]:
    pkg_root = str(Path(saerecover.__file__).resolve().parent.parent)
    env = dict(os.environ)
    env["PYTHONPATH"] = pkg_root + os.pathsep + env.get("PYTHONPATH", "")
    return env


# ---------------------------------------------------------------- create, resume, refuse


def test_new_run_writes_config_with_versions_and_hash(tmp_path):
    out = tmp_path / "run"
    with RunDirectory(out, config=CONFIG) as run:
        assert run.path == out and run.config == CONFIG and not run.resumed
        assert run.done() == set() and run.records() == []
    stored = json.loads((out / "config.json").read_text())
    for k, v in CONFIG.items():
        assert stored[k] == v
    assert stored["config_hash"] == config_hash(CONFIG)
    assert stored["run_schema"] == runs_mod.RUN_SCHEMA
    assert stored["saerecover_version"] == saerecover.__version__
    assert set(stored["versions"]) >= {"torch", "transformers", "sae_lens", "transformer_lens",
                                       "numpy", "python"}
    assert stored["created"]


def test_config_hash_is_canonical_and_ignores_volatile_keys():
    a = {"b": 1, "a": [1, 2], "c": {"y": 1, "x": 2}}
    b = {"c": {"x": 2, "y": 1}, "a": (1, 2), "b": 1}
    assert config_hash(a) == config_hash(b)
    assert config_hash(a) == config_hash({**a, "created": "now", "versions": {"torch": "x"}})
    assert config_hash(a) != config_hash({**a, "b": 2})
    assert config_hash({"p": Path("/x")}) == config_hash({"p": "/x"})


def test_resume_appends_and_keeps_done(tmp_path):
    out = tmp_path / "run"
    with RunDirectory(out, config=CONFIG) as run:
        run.append_record(rec("e0"))
        run.append_record(rec("e1"))
    with RunDirectory(out, config=dict(CONFIG)) as run:
        assert run.resumed
        assert run.done() == {("e0", "none"), ("e1", "none")}
        run.append_record(rec("e2", extra_key={"kept": True}))
        records = run.records()
    assert [r["example_id"] for r in records] == ["e0", "e1", "e2"]
    assert records[2]["extra_key"] == {"kept": True}
    stored = json.loads((out / "config.json").read_text())
    assert len(stored["resumed"]) == 1  # provenance of the resume, outside the hash
    assert stored["config_hash"] == config_hash(CONFIG)


def test_duplicate_record_refused(tmp_path):
    with RunDirectory(tmp_path / "run", config=CONFIG) as run:
        run.append_record(rec("e0"))
        run.append_record(rec("e0", mode="encoder"))  # another mode is fine
        with pytest.raises(RunDirectoryError, match="already has a record"):
            run.append_record(rec("e0"))
    with RunDirectory(tmp_path / "run", config=CONFIG) as run:  # also after a resume
        with pytest.raises(RunDirectoryError, match="already has a record"):
            run.append_record(rec("e0", mode="encoder"))
    assert len(open_run(tmp_path / "run").records()) == 2


def test_record_validation_and_nonfinite(tmp_path):
    with RunDirectory(tmp_path / "run", config=CONFIG) as run:
        with pytest.raises(RunDirectoryError, match="example_id"):
            run.append_record({"mode": "none"})
        with pytest.raises(RunDirectoryError, match="mode"):
            run.append_record({"example_id": "a"})
        with pytest.raises(RunDirectoryError, match="must be a str"):
            run.append_record({"example_id": 3, "mode": "none"})
        run.append_record(rec("a", activation_drift=float("nan"), delta_norm=torch.tensor(2.5),
                              steps=torch.tensor(7)))
        (r,) = run.records()
    assert r["activation_drift"] is None and r["nonfinite"] == ["activation_drift"]
    assert r["delta_norm"] == 2.5 and r["steps"] == 7
    text = (tmp_path / "run" / "records.jsonl").read_text()
    assert "NaN" not in text and text.endswith("\n") and text.count("\n") == 1


def test_config_mismatch_names_differing_keys(tmp_path):
    out = tmp_path / "run"
    RunDirectory(out, config=CONFIG).close()
    changed = {**CONFIG, "recovery": {"steps": 100, "lr": 0.2, "budget": 20.0}, "seed": 1}
    with pytest.raises(RunDirectoryError) as e:
        RunDirectory(out, config=changed)
    msg = str(e.value)
    assert "recovery" in msg and "seed" in msg and "--out" in msg and "--overwrite" in msg
    assert "modes" not in msg.split("differing key(s):")[1].splitlines()[0]
    with pytest.raises(RunDirectoryError, match="another task"):
        RunDirectory(out, config={**CONFIG, "task": {"name": "refusal"}})
    # the refused open released the lock and left the run as it was
    with RunDirectory(out, config=CONFIG) as run:
        assert run.resumed


def test_resume_false_refuses_existing_run(tmp_path):
    out = tmp_path / "run"
    RunDirectory(out, config=CONFIG).close()
    with pytest.raises(RunDirectoryError, match="resume is off"):
        RunDirectory(out, config=CONFIG, resume=False)


def test_overwrite_empties_a_run_but_not_other_directories(tmp_path):
    out = tmp_path / "run"
    with RunDirectory(out, config=CONFIG) as run:
        run.append_record(rec("e0"))
        run.save_tensors("none", "e0", {"delta": torch.ones(2)})
    with RunDirectory(out, config={**CONFIG, "seed": 5}, overwrite=True) as run:
        assert not run.resumed and run.done() == set()
        assert not (out / "tensors").exists()
    other = tmp_path / "notarun"
    other.mkdir()
    (other / "precious.txt").write_text("keep me")
    for kw in ({}, {"overwrite": True}):
        with pytest.raises(RunDirectoryError, match="not a saerecover run directory"):
            RunDirectory(other, config=CONFIG, **kw)
    assert (other / "precious.txt").read_text() == "keep me"


def test_refuses_other_schema_and_edited_config(tmp_path):
    out = tmp_path / "run"
    RunDirectory(out, config=CONFIG).close()
    stored = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**stored, "run_schema": 99}))
    with pytest.raises(RunDirectoryError, match="schema 99"):
        RunDirectory(out, config=CONFIG)
    with pytest.raises(RunDirectoryError, match="schema"):
        open_run(out)
    (out / "config.json").write_text(json.dumps({**stored, "modes": ["none"]}))
    with pytest.raises(RunDirectoryError, match="edited"):
        RunDirectory(out, config={**CONFIG, "modes": ["none"]})
    (out / "config.json").write_text(json.dumps({"hello": 1}))
    with pytest.raises(RunDirectoryError, match="not a saerecover run config"):
        RunDirectory(out, config=CONFIG)


def test_bad_config_refused(tmp_path):
    with pytest.raises(RunDirectoryError, match="reserved"):
        RunDirectory(tmp_path / "a", config={"config_hash": "x"})
    with pytest.raises(RunDirectoryError, match="NaN"):
        RunDirectory(tmp_path / "b", config={"lr": float("nan")})
    with pytest.raises(RunDirectoryError, match="no JSON form"):
        RunDirectory(tmp_path / "c", config={"obj": object()})
    (tmp_path / "file").write_text("x")
    with pytest.raises(RunDirectoryError, match="not a directory"):
        RunDirectory(tmp_path / "file", config=CONFIG)


# ---------------------------------------------------------------- records.jsonl repair


def _write_two(out: Path) -> Path:
    with RunDirectory(out, config=CONFIG) as run:
        run.append_record(rec("e0"))
        run.append_record(rec("e1"))
    return out / "records.jsonl"


def test_truncated_last_line_dropped_and_repaired(tmp_path):
    out = tmp_path / "run"
    path = _write_two(out)
    good = path.read_bytes()
    path.write_bytes(good + b'{"example_id": "e2", "mode": "no')  # crash mid-append
    assert [r["example_id"] for r in open_run(out).records()] == ["e0", "e1"]  # reader tolerates
    assert path.read_bytes().endswith(b'"no')  # ...and does not touch the file
    with pytest.warns(UserWarning, match="dropped"):
        run = RunDirectory(out, config=CONFIG)
    with run:
        assert path.read_bytes() == good  # repaired on open
        assert run.done() == {("e0", "none"), ("e1", "none")}
        run.append_record(rec("e2"))
    assert [r["example_id"] for r in open_run(out).records()] == ["e0", "e1", "e2"]


def test_corrupt_last_line_with_newline_and_nul_tail_dropped(tmp_path):
    out = tmp_path / "run"
    path = _write_two(out)
    good = path.read_bytes()
    path.write_bytes(good + b"{garbage\n" + b"\x00" * 16)
    with pytest.warns(UserWarning, match="line 3"):
        RunDirectory(out, config=CONFIG).close()
    assert path.read_bytes() == good


def test_whole_last_record_without_newline_is_kept(tmp_path):
    out = tmp_path / "run"
    path = _write_two(out)
    path.write_bytes(path.read_bytes() + json.dumps(rec("e2")).encode())
    with RunDirectory(out, config=CONFIG) as run:
        assert ("e2", "none") in run.done()
        run.append_record(rec("e3"))
    assert [r["example_id"] for r in open_run(out).records()] == ["e0", "e1", "e2", "e3"]


def test_corrupt_middle_line_is_an_error_naming_it(tmp_path):
    out = tmp_path / "run"
    path = _write_two(out)
    lines = path.read_bytes().split(b"\n")
    path.write_bytes(lines[0] + b"\n{broken\n" + lines[1] + b"\n")
    with pytest.raises(RunDirectoryError, match="line 2"):
        RunDirectory(out, config=CONFIG)
    with pytest.raises(RunDirectoryError, match="line 2"):
        open_run(out)


def test_duplicate_lines_in_file_are_an_error(tmp_path):
    out = tmp_path / "run"
    path = _write_two(out)
    first = path.read_bytes().split(b"\n")[0]
    path.write_bytes(path.read_bytes() + first + b"\n")
    with pytest.raises(RunDirectoryError, match="line 3 repeats"):
        open_run(out)


# ---------------------------------------------------------------- locking

HOLD = textwrap.dedent(
    """
    import os, sys
    from saerecover.runs.directory import RunDirectory, RunDirectoryError
    cfg = {cfg!r}
    try:
        run = RunDirectory(sys.argv[1], config=cfg)
    except RunDirectoryError as e:
        print("REFUSED", e)
        sys.exit(0)
    print("OPENED", os.getpid(), flush=True)
    if len(sys.argv) > 2 and sys.argv[2] == "crash":
        os._exit(0)  # die holding the lock, without close()
    sys.stdin.readline()
    run.close()
    """
).format(cfg=CONFIG)


def test_lock_refuses_a_second_process(tmp_path):
    out = tmp_path / "run"
    with RunDirectory(out, config=CONFIG):
        res = subprocess.run([sys.executable, "-c", HOLD, str(out)], capture_output=True,
                             text=True, env=_subprocess_env(), timeout=60)
        assert res.returncode == 0, res.stderr
        assert res.stdout.startswith("REFUSED"), res.stdout
        assert "in use by another process" in res.stdout
        assert f"pid {os.getpid()}" in res.stdout
    # released on close: the other process may now open it
    res = subprocess.run([sys.executable, "-c", HOLD, str(out), "crash"], capture_output=True,
                         text=True, env=_subprocess_env(), timeout=60)
    assert res.stdout.startswith("OPENED"), res.stdout + res.stderr
    # a process that died holding the lock does not block the next one
    with RunDirectory(out, config=CONFIG) as run:
        assert run.resumed


def test_lock_held_by_other_process_blocks_us(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=_subprocess_env())
    try:
        line = proc.stdout.readline()
        assert line.startswith("OPENED"), line + proc.stderr.read()
        child_pid = line.split()[1]
        expected = f"in use by another process \\(pid {child_pid}\\)"
        with pytest.raises(RunDirectoryError, match=expected):
            RunDirectory(out, config=CONFIG)
        open_run(out)  # reading needs no lock
    finally:
        proc.communicate("\n", timeout=60)
    RunDirectory(out, config=CONFIG).close()


def test_closed_and_readonly_refuse_writes(tmp_path):
    out = tmp_path / "run"
    run = RunDirectory(out, config=CONFIG)
    run.close()
    run.close()  # twice is fine
    with pytest.raises(RunDirectoryError, match="closed"):
        run.append_record(rec("e0"))
    ro = open_run(out)
    assert ro.readonly and ro.config == CONFIG and ro.meta["config_hash"] == config_hash(CONFIG)
    with pytest.raises(RunDirectoryError, match="read-only"):
        ro.append_record(rec("e0"))
    with pytest.raises(RunDirectoryError, match="read-only"):
        ro.write_summary({})
    with pytest.raises(RunDirectoryError, match="not a saerecover run directory"):
        open_run(tmp_path)
    with pytest.raises(RunDirectoryError, match="not a directory"):
        open_run(tmp_path / "missing")


# ---------------------------------------------------------------- atomic writes


def test_atomic_write_keeps_old_file_when_replace_fails(tmp_path, monkeypatch):
    target = tmp_path / "summary.json"
    atomic_write_json(target, {"v": 1})

    def boom(src, dst):
        raise OSError("simulated crash before rename")

    monkeypatch.setattr(runs_mod.os, "replace", boom)
    with pytest.raises(OSError, match="simulated"):
        atomic_write_json(target, {"v": 2, "big": "x" * 100_000})
    monkeypatch.undo()
    assert json.loads(target.read_text()) == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["summary.json"]  # no temp file left


def test_atomic_write_refuses_nan_and_writes_text(tmp_path):
    with pytest.raises(RunDirectoryError, match="NaN"):
        atomic_write_json(tmp_path / "s.json", {"x": float("nan")})
    assert not (tmp_path / "s.json").exists()
    atomic_write_text(tmp_path / "sub" / "t.md", "héllo\n")
    assert (tmp_path / "sub" / "t.md").read_text(encoding="utf-8") == "héllo\n"


def test_summary_roundtrip_and_failed_summary_write_keeps_old(tmp_path, monkeypatch):
    out = tmp_path / "run"
    with RunDirectory(out, config=CONFIG) as run:
        with pytest.raises(RunDirectoryError, match="not been summarized"):
            run.read_summary()
        run.write_summary({"task": "ioi", "modes": {"none": {"recovery_rate": None}}})
        def boom(src, dst):
            raise OSError("simulated crash before rename")

        monkeypatch.setattr(runs_mod.os, "replace", boom)
        with pytest.raises(OSError):
            run.write_summary({"task": "ioi", "modes": {}})
        monkeypatch.undo()
        assert run.read_summary()["modes"] == {"none": {"recovery_rate": None}}
        with pytest.raises(RunDirectoryError, match="NaN"):
            run.write_summary({"x": float("nan")})
    assert open_run(out).read_summary()["task"] == "ioi"


def test_stale_temp_files_removed_on_open(tmp_path):
    out = tmp_path / "run"
    with RunDirectory(out, config=CONFIG) as run:
        run.save_tensors("none", "e0", {"delta": torch.ones(1)})
    (out / ".summary.json.abc.tmp").write_text("partial")
    (out / "tensors" / "none" / ".e1.safetensors.abc.tmp").write_text("partial")
    RunDirectory(out, config=CONFIG).close()
    assert not list(out.rglob("*.tmp"))


# ---------------------------------------------------------------- names and tensors


@pytest.mark.parametrize("bad", ["", ".", "..", "../x", "a/b", "a\\b", "..a", "a..b", ".hidden",
                                 "x" * 201, "a b", "é", "a\x00b", "/abs"])
def test_path_escaping_names_rejected(tmp_path, bad):
    with pytest.raises(RunDirectoryError, match="cannot be used as a file name"):
        validate_name(bad, "example_id")
    with RunDirectory(tmp_path / "run", config=CONFIG) as run:
        with pytest.raises(RunDirectoryError):
            run.save_tensors("none", bad, {"delta": torch.zeros(1)})
        with pytest.raises(RunDirectoryError):
            run.save_tensors(bad, "e0", {"delta": torch.zeros(1)})
        with pytest.raises(RunDirectoryError):
            run.append_record(rec(bad))
    assert {p.name for p in tmp_path.iterdir()} == {"run"}


@pytest.mark.parametrize("good", ["ioi-0007", "ex.12", "A_b-c.d", "0"])
def test_good_names_accepted(good):
    assert validate_name(good, "mode") == good


def test_safetensors_roundtrip(tmp_path):
    out = tmp_path / "run"
    base = torch.randn(4, 6)
    tensors = {
        "delta": base[:, :3],  # a non-contiguous view sharing storage with h_def
        "h_def": base,
        "rows": torch.tensor([3, 5, 9]),
        "z_def": torch.randn(3, 16, dtype=torch.bfloat16),
        "z_rec": torch.randn(3, 16, dtype=torch.float64).requires_grad_(),
    }
    with RunDirectory(out, config=CONFIG) as run:
        meta = {"site": "blocks.1.hook_resid_post", "features": [1, 2]}
        path = run.save_tensors("encoder", "ex-1", tensors, metadata=meta)
        assert path == out / "tensors" / "encoder" / "ex-1.safetensors"
        loaded = run.load_tensors("encoder", "ex-1")
    assert set(loaded) == set(tensors)
    for k, t in tensors.items():
        assert loaded[k].dtype == t.dtype and loaded[k].shape == t.shape
        assert torch.equal(loaded[k], t.detach())
    ro = open_run(out)
    assert torch.equal(ro.load_tensors("encoder", "ex-1")["rows"], tensors["rows"])
    meta = ro.tensor_metadata("encoder", "ex-1")
    assert meta["site"] == "blocks.1.hook_resid_post" and json.loads(meta["features"]) == [1, 2]
    assert meta["example_id"] == "ex-1" and meta["mode"] == "encoder"
    with pytest.raises(RunDirectoryError, match="no tensors"):
        ro.load_tensors("encoder", "ex-2")


def test_save_tensors_overwrites_and_validates(tmp_path):
    with RunDirectory(tmp_path / "run", config=CONFIG) as run:
        run.save_tensors("none", "e0", {"delta": torch.zeros(2)})
        run.save_tensors("none", "e0", {"delta": torch.ones(2)})  # retry after a crash
        assert torch.equal(run.load_tensors("none", "e0")["delta"], torch.ones(2))
        with pytest.raises(RunDirectoryError, match="not a torch.Tensor"):
            run.save_tensors("none", "e1", {"delta": [1.0]})
        with pytest.raises(RunDirectoryError, match="non-empty"):
            run.save_tensors("none", "e1", {})
        with pytest.raises(RunDirectoryError, match="dense"):
            run.save_tensors("none", "e1", {"delta": torch.eye(2).to_sparse()})


def test_loader_never_unpickles(tmp_path):
    """A pickle file under a .safetensors name is rejected, not executed."""
    out = tmp_path / "run"
    RunDirectory(out, config=CONFIG).close()
    p = out / "tensors" / "none" / "evil.safetensors"
    p.parent.mkdir(parents=True)
    torch.save({"delta": torch.zeros(1)}, p)
    with pytest.raises(Exception) as e:
        open_run(out).load_tensors("none", "evil")
    assert not isinstance(e.value, AssertionError)
