"""What a run writes stays inside its directory: no file or directory of a run is written through
a symbolic link (or, written in place, a hard link), new files get the permissions of an ordinary
file, a full disk names the file, and a refused resume or merge lists every differing key with
both values."""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from saerecover.experiments.merge import MergeError, merge_runs
from saerecover.report.run import write_report
from saerecover.runs import files as files_mod
from saerecover.runs.directory import RunDirectory, open_run
from saerecover.runs.errors import RunDirectoryError
from saerecover.runs.files import atomic_write_json
from saerecover.runs.stats import summarize

CONFIG = {
    "task": {"name": "ioi", "n": 2, "seed": 0},
    "model": {"name": "toy", "backend": "hf"},
    "recovery": {"steps": 20, "lr": 0.1, "budget": 20.0},
    "modes": ["none"],
}


def rec(eid: str, mode: str = "none") -> dict:
    return {"example_id": eid, "mode": mode, "valid": True, "recovered": True, "failed": False, "error": None,
            "delta_norm": 1.0, "relative_delta_norm": 0.5, "relative_drift": 0.1, "activation_drift": 0.2}


def finished_run(out: Path, config: dict = CONFIG, *, report: bool = False) -> Path:
    """A run with one record (example e0, or e<i> for shard i), its tensors, a summary and, with
    ``report``, a report and plots."""
    eid = f"e{config.get('shard', {}).get('index', 0)}"
    with RunDirectory(out, config=config) as run:
        run.save_tensors("none", eid, {"delta": torch.ones(2, 3)})
        run.append_record(rec(eid))
        run.write_summary(summarize(run.records(), task="ioi", modes=["none"]))
    if report:
        write_report(out)
    return out


def snapshot(path: Path) -> dict[str, bytes]:
    """Every file under ``path`` (or ``path`` itself) with its bytes."""
    if path.is_file():
        return {path.name: path.read_bytes()}
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------------------ symbolic links


def test_symlinked_records_file_is_refused_and_its_target_kept(tmp_path):
    """A records.jsonl that links to another file: opening the run used to "repair" the target
    (its text is no JSON line, so it was truncated to 0 bytes) and then append records to it."""
    run = tmp_path / "run"
    RunDirectory(run, config={"task": {}}).close()
    outside = tmp_path / "outside.txt"
    outside.write_text("precious\n")
    (run / "records.jsonl").unlink()
    (run / "records.jsonl").symlink_to("../outside.txt")
    with pytest.raises(RunDirectoryError) as info:
        RunDirectory(run, config={"task": {}})
    msg = str(info.value)
    assert "\n" not in msg
    assert msg.startswith(f"records.jsonl in {run} is a symbolic link (to ../outside.txt)"), msg
    assert "choose a new --out" in msg
    assert outside.read_text() == "precious\n"
    with pytest.raises(RunDirectoryError, match="records.jsonl .* is a symbolic link"):
        open_run(run)
    assert outside.read_text() == "precious\n"


LINKED = ["records.jsonl", ".lock", "tensors", "tensors/none", "tensors/none/e0.safetensors", "summary.json",
          "config.json", "report.md", "plots"]


@pytest.mark.parametrize("name", LINKED)
def test_no_member_of_a_run_is_written_through_a_link(tmp_path, name):
    """Each file and folder of a finished run replaced by a link to a copy outside it: resuming,
    overwriting, reading and reporting the run are all refused before anything is written, and the
    copy outside is left byte for byte as it was."""
    run = finished_run(tmp_path / "run", report=True)
    member = run / name
    outside = tmp_path / "outside" / Path(name).name
    outside.parent.mkdir()
    if member.is_dir():
        shutil.copytree(member, outside)
        shutil.rmtree(member)
    else:
        shutil.copy2(member, outside)
        member.unlink()
    member.symlink_to(outside)
    before = snapshot(outside)
    config = json.loads(outside.read_text()) if name == "config.json" else CONFIG
    config = {k: v for k, v in config.items() if k in CONFIG}
    pattern = rf"{name} in {run} is a symbolic link \(to {outside}\); a run directory holds only regular files"
    for attempt in (lambda: RunDirectory(run, config=config), lambda: RunDirectory(run, config=config, overwrite=True),
                    lambda: open_run(run), lambda: write_report(run)):
        with pytest.raises(RunDirectoryError, match=pattern):
            attempt()
    assert snapshot(outside) == before
    assert member.is_symlink()


def test_a_link_made_after_the_check_is_still_not_followed(tmp_path):
    """The files a run writes in place are opened with O_NOFOLLOW, and atomic writes check each
    folder below the run: a link that appears while the run is open is refused too."""
    run_path = tmp_path / "run"
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep.txt").write_text("keep\n")
    with RunDirectory(run_path, config=CONFIG) as run:
        (run_path / "tensors").symlink_to(outside)
        with pytest.raises(RunDirectoryError, match=r"tensors in .* is a symbolic link"):
            run.save_tensors("none", "e0", {"delta": torch.ones(1)})
        (run_path / "summary.json").symlink_to(outside / "keep.txt")
        with pytest.raises(RunDirectoryError, match=r"summary.json in .* is a symbolic link"):
            run.write_summary({"task": "ioi"})
    assert snapshot(outside) == {"keep.txt": b"keep\n"}
    # records.jsonl is opened without following links even where no scan ran before
    (tmp_path / "r2").mkdir()
    (tmp_path / "r2" / "records.jsonl").symlink_to(outside / "keep.txt")
    with pytest.raises(RunDirectoryError, match="is a symbolic link"):
        files_mod.open_regular(tmp_path / "r2" / "records.jsonl", os.O_WRONLY | os.O_APPEND, tmp_path / "r2")
    assert (outside / "keep.txt").read_text() == "keep\n"


def test_hard_linked_records_file_is_refused(tmp_path):
    """records.jsonl is appended (and repaired) in place: as a hard link of another file, that
    file would change too."""
    run = finished_run(tmp_path / "run")
    backup = tmp_path / "backup.jsonl"
    os.link(run / "records.jsonl", backup)
    before = backup.read_bytes()
    with pytest.raises(RunDirectoryError, match=r"records.jsonl is a file with 2 hard links; a run writes it in place"):
        RunDirectory(run, config=CONFIG)
    assert backup.read_bytes() == before
    assert open_run(run).records()[0]["example_id"] == "e0"  # reading is fine


def test_merge_refuses_shards_holding_links(tmp_path):
    shards = []
    for i in range(2):
        cfg = {**CONFIG, "shard": {"index": i, "count": 2}}
        shards.append(finished_run(tmp_path / f"s{i}", cfg, report=i == 1))
    outside = tmp_path / "elsewhere.md"
    outside.write_text("mine\n")
    (shards[1] / "report.md").unlink()
    (shards[1] / "report.md").symlink_to(outside)
    with pytest.raises(RunDirectoryError, match="report.md in .* is a symbolic link"):
        merge_runs(tmp_path / "merged", shards, report=True)
    assert outside.read_text() == "mine\n" and not (tmp_path / "merged").exists()


# -------------------------------------------------------------------------------- permissions


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_every_new_file_has_ordinary_permissions(tmp_path, umask):
    """Atomic writes (config, tensors, summary, report, plots) used to be 0600 (mkstemp) while
    records.jsonl was 0644; now every new file is 0o666 and every new folder 0o777, less the umask,
    as ``open`` and ``mkdir`` make them; merged runs too (their folder came from mkdtemp, 0700)."""
    old = os.umask(umask)
    try:
        shards = [finished_run(tmp_path / f"s{i}", {**CONFIG, "shard": {"index": i, "count": 2}}) for i in range(2)]
        merged = merge_runs(tmp_path / "merged", shards)
        atomic_write_json(tmp_path / "loose.json", {"a": 1})
    finally:
        os.umask(old)
    want_file, want_dir = 0o666 & ~umask, 0o777 & ~umask
    for root in (*shards, merged):
        paths = [root, *root.rglob("*")]
        names = {str(p.relative_to(root)) for p in paths}
        assert {"config.json", "records.jsonl", "summary.json", "tensors/none"} <= names
        for p in paths:
            want = want_dir if p.is_dir() else want_file
            assert p.stat().st_mode & 0o777 == want, f"{p}: {oct(p.stat().st_mode & 0o777)} != {oct(want)}"
    names = {str(p.relative_to(merged)) for p in merged.rglob("*")}
    assert "report.md" in names and any(n.startswith("plots/") for n in names)
    assert (tmp_path / "loose.json").stat().st_mode & 0o777 == want_file


# --------------------------------------------------------------------------------- full disk


def _enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_a_full_disk_names_the_file(tmp_path, monkeypatch):
    """ENOSPC from a write used to surface as "[Errno 28] No space left on device" with no file."""
    run_path = tmp_path / "run"
    with RunDirectory(run_path, config=CONFIG) as run:
        monkeypatch.setattr(files_mod.os, "write", _enospc)
        with pytest.raises(OSError, match=rf"No space left on device: cannot write {run_path / 'records.jsonl'}$") as info:
            run.append_record(rec("e0"))
        assert info.value.errno == errno.ENOSPC
        with pytest.raises(OSError, match=rf"No space left on device: cannot write {run_path / 'summary.json'}$"):
            run.write_summary({"task": "ioi"})
        target = run_path / "tensors" / "none" / "e1.safetensors"
        with pytest.raises(OSError, match=rf"cannot write {target}$"):
            run.save_tensors("none", "e1", {"delta": torch.ones(1)})
        monkeypatch.undo()
        assert not list(run_path.rglob("*.tmp")) and not target.exists()  # no temp file left behind
        monkeypatch.setattr(files_mod.os, "fsync", _enospc)  # some file systems report it at fsync
        with pytest.raises(OSError, match=rf"cannot sync {run_path / 'records.jsonl'}$"):
            run.append_record(rec("e2"))


def test_a_full_disk_in_a_run_is_one_cli_line_naming_the_file(tmp_path, monkeypatch, capsys):
    from saerecover.cli.app import main

    run = finished_run(tmp_path / "run")
    (run / "summary.json").unlink()  # report writes report.md only (no plots of an unfinished run)
    monkeypatch.setattr(files_mod.os, "write", _enospc)
    assert main(["report", str(run)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("saerecover: error: [Errno 28] No space left on device: cannot write ")
    assert str(run) in err


# -------------------------------------------------------------------------- refused resume / merge


def test_a_refused_resume_lists_nested_differences_with_both_values(tmp_path):
    """The differing key used to be the whole "recovery" object cut to 80 characters of sorted
    JSON, so that a change of steps (20 -> 22) at its end never showed."""
    config = {**CONFIG, "recovery": {"budget": 20.0, "lr": 0.1, "optimizer": "adam", "positions": "answer",
                                     "reclamp": False, "rcond": None, "steps": 20}}
    run = tmp_path / "run"
    RunDirectory(run, config=config).close()
    changed = json.loads(json.dumps(config))
    changed["recovery"]["steps"] = 22
    changed["modes"] = ["none", "encoder"]
    with pytest.raises(RunDirectoryError) as info:
        RunDirectory(run, config=changed)
    lines = str(info.value).splitlines()
    assert lines[0] == f"{run} holds a run with another config; differing key(s): modes, recovery.steps"
    assert lines[1] == '  modes: run has ["none"], new config has ["none", "encoder"]'
    assert lines[2] == "  recovery.steps: run has 20, new config has 22"
    assert lines[3].startswith("choose a new --out")
    changed = json.loads(json.dumps(config))
    changed["task"]["seed"] = 1
    del changed["recovery"]["rcond"]
    with pytest.raises(RunDirectoryError, match=r"holds a run of another task; differing key\(s\): recovery.rcond, "
                                                r"task.seed\n  recovery.rcond: run has null, new config has \(absent\)"):
        RunDirectory(run, config=changed)


def test_a_refused_merge_lists_nested_differences(tmp_path):
    a = finished_run(tmp_path / "s0", {**CONFIG, "shard": {"index": 0, "count": 2}})
    other = json.loads(json.dumps(CONFIG))
    other["recovery"]["steps"] = 22
    b = finished_run(tmp_path / "s1", {**other, "shard": {"index": 1, "count": 2}})
    with pytest.raises(MergeError, match=rf"differing config key\(s\): recovery.steps\n  recovery.steps: {a} has 20, "
                                         rf"{b} has 22$"):
        merge_runs(tmp_path / "m", [a, b], report=False)


def test_merge_into_a_folder_inside_an_input_is_refused(tmp_path):
    shards = [finished_run(tmp_path / f"s{i}", {**CONFIG, "shard": {"index": i, "count": 2}}) for i in range(2)]
    before = [snapshot(s) for s in shards]
    for out in (shards[0] / "merged", shards[1] / "tensors" / "x"):
        with pytest.raises(MergeError, match=rf"OUT {out} is inside the input {shards[0] if out.is_relative_to(shards[0]) else shards[1]}; "
                                             "merging would write into a shard"):
            merge_runs(out, shards, report=False)
    assert [snapshot(s) for s in shards] == before
    assert not (shards[0] / "merged").exists()
