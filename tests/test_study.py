"""Studies: a run or a sweep cut into units that an executor runs (in this process, or on a local
Ray instance started here with 2 CPUs), resumed after a lost worker or a killed driver, and
merged into the run directory a one-process run writes.

The equality checks use the none and encoder modes, whose results do not depend on which
examples share a batch (up to float round-off)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from saerecover import toy
from saerecover.cli import main
from saerecover.core.clamp import Clamp
from saerecover.core.selection import select_by_attribution
from saerecover.experiments.executor import LocalExecutor
from saerecover.experiments.pipeline import recover
from saerecover.experiments import study as study_module
from saerecover.experiments.study import STATUS_FILE, StudyError, study_dir
from saerecover.experiments.sweeps import budget_sweep
from saerecover.runs import VOLATILE_KEYS, open_run, run_in_use

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ROOT = Path(__file__).resolve().parents[1]
HOOK = "blocks.1.hook_resid_post"
N = 24
#: The recovery of every study here: both deterministic modes, small and quick.
KW = {"projection": ["none", "encoder"], "steps": 10, "batch_size": 2, "progress": False}


@pytest.fixture(scope="module")
def setting():
    """(model, clamp, task): toy IOI, 24 prompts, the top-16 features by attribution at layer 1."""
    world = toy.load()
    site = world.site(HOOK)
    task = world.ioi_task(n=N, seed=0)
    features = select_by_attribution(world.model, site, task, task.examples(), top_k=16)
    return world.model, Clamp({site: features}, value=-5.0, where="active"), task


@pytest.fixture(scope="module")
def reference(setting, tmp_path_factory):
    """The one-process run every study is compared with."""
    return recover(*setting, out=tmp_path_factory.mktemp("one") / "run", **KW)


def assert_close(got, want, where) -> None:
    """Equal, floats (also inside lists and dicts) up to float32 round-off."""
    if isinstance(want, float):
        assert got == pytest.approx(want, rel=1e-4, abs=1e-6), where
    elif isinstance(want, (list, tuple)):
        assert isinstance(got, (list, tuple)) and len(got) == len(want), where
        for g, w in zip(got, want):
            assert_close(g, w, where)
    elif isinstance(want, dict):
        assert isinstance(got, dict) and set(got) == set(want), where
        for k in want:
            assert_close(got[k], want[k], (where, k))
    else:
        assert got == want, where


def assert_same_records(got: list[dict], want: list[dict]) -> None:
    """Every (example, mode) exactly once, with the same fields; booleans, strings and ids equal,
    numbers equal up to float round-off."""
    keyed = {(r["example_id"], r["mode"]): r for r in got}
    assert len(keyed) == len(got), "a record is duplicated"
    expected = {(r["example_id"], r["mode"]): r for r in want}
    assert sorted(keyed) == sorted(expected)
    for key, w in expected.items():
        g = keyed[key]
        assert set(g) == set(w), key
        for field, value in w.items():
            assert_close(g[field], value, (key, field))


def assert_same_run_directory(got: Path, want: Path) -> None:
    """The same files (the lock apart), config (apart from the merge's provenance) and summary keys."""
    names = [sorted(p.name for p in d.iterdir() if p.name != ".lock") for d in (got, want)]
    assert names[0] == names[1]
    cg, cw = (json.loads((p / "config.json").read_text()) for p in (got, want))
    drop = VOLATILE_KEYS | {"merged_from"}
    assert {k: v for k, v in cg.items() if k not in drop} == {k: v for k, v in cw.items() if k not in drop}
    sg, sw = (json.loads((p / "summary.json").read_text()) for p in (got, want))
    assert set(sg) - {"merged_shards"} == set(sw)
    for mode in KW["projection"]:
        assert sg["modes"][mode]["recovered"] == sw["modes"][mode]["recovered"]
        assert sorted(p.name for p in (got / "tensors" / mode).iterdir()) == \
            sorted(p.name for p in (want / "tensors" / mode).iterdir())


def status(out: Path) -> dict:
    return json.loads((study_dir(out) / STATUS_FILE).read_text())


# ----------------------------------------------------------------------------------------------
# in this process (LocalExecutor): the study protocol without Ray


@pytest.fixture(scope="module")
def local_study(setting, tmp_path_factory):
    """A run cut into 3 units, run here and merged."""
    out = tmp_path_factory.mktemp("local") / "run"
    return recover(*setting, out=out, executor=LocalExecutor(units=3), **KW)


def test_a_local_study_writes_what_a_one_process_run_writes(local_study, reference):
    assert_same_records(local_study.records, reference.records)
    assert_same_run_directory(local_study.path, reference.path)
    assert local_study.flips.valid.tolist() == reference.flips.valid.tolist()
    st = status(local_study.path)
    assert st["state"] == "done" and st["units_by_state"]["done"] == 3
    # 24 examples x 2 modes, shard i/3 holds examples i, i+3, ...: 8 x 2 records each
    assert [u["records"] for u in st["units"].values()] == [16, 16, 16]
    assert st["records"] == {"done": 48, "total": 48}


class _Unneeded(LocalExecutor):
    """An executor that must not be started."""

    def session(self, **_):
        raise AssertionError("a finished study started its executor")


def test_a_finished_study_rerun_does_nothing(setting, local_study):
    before = (study_dir(local_study.path) / STATUS_FILE).read_bytes()
    again = recover(*setting, out=local_study.path, executor=_Unneeded(), **KW)
    assert again.records == local_study.records
    assert (study_dir(local_study.path) / STATUS_FILE).read_bytes() == before  # the finished study's status kept


def test_a_rerun_after_the_driver_died_resumes_only_what_was_left(setting, local_study, reference, tmp_path):
    """The state a killed driver leaves: units 0 and 2 finished, unit 1 cut after 3 records, no
    merged run. The rerun leaves the finished units alone, resumes unit 1 from its records and
    merges: every record once."""
    out = tmp_path / "run"
    shutil.copytree(study_dir(local_study.path), study_dir(out))
    units = study_dir(out) / "run"
    cut = units / "shard-1-of-3"
    kept = b"".join((cut / "records.jsonl").read_bytes().splitlines(keepends=True)[:3])
    (cut / "records.jsonl").write_bytes(kept)
    (cut / "summary.json").unlink()
    before = {p.name: (p / "records.jsonl").read_bytes() for p in units.iterdir()}

    result = recover(*setting, out=out, executor=LocalExecutor(units=5), **KW)  # the count on disk wins

    assert_same_records(result.records, reference.records)
    for name in ("shard-0-of-3", "shard-2-of-3"):
        assert (units / name / "records.jsonl").read_bytes() == before[name]
        assert "resumed" not in json.loads((units / name / "config.json").read_text())
    assert (cut / "records.jsonl").read_bytes().startswith(kept)
    assert len(json.loads((cut / "config.json").read_text())["resumed"]) == 1
    st = status(out)
    assert [u["earlier"] for u in st["units"].values()] == [True, False, True]


def test_a_study_refuses_another_config_and_overwrite_starts_over(setting, local_study, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(local_study.path, out)
    with pytest.raises(StudyError, match="another config.*--overwrite"):
        recover(*setting, out=out, executor=LocalExecutor(units=2), **{**KW, "steps": 11})
    result = recover(*setting, out=out, executor=LocalExecutor(units=2), overwrite=True, **{**KW, "steps": 11})
    assert json.loads((out / "config.json").read_text())["recovery"]["steps"] == 11
    assert len(result.records) == 2 * N


class _ElsewhereSession:
    """A session whose units 'finish' on a node whose disk the driver does not see."""

    units = 1

    def describe(self):
        return {"kind": "elsewhere"}

    def run(self, world, work, units, events):
        for unit in units:
            events.dispatched(unit, worker="far")
            events.finished(unit, {"host": "far-node"})


class _Elsewhere(LocalExecutor):
    @contextlib.contextmanager
    def session(self, **_):
        yield _ElsewhereSession()


def test_a_unit_written_where_the_driver_cannot_see_it_is_one_clear_error(setting, tmp_path, monkeypatch):
    monkeypatch.setattr(study_module, "VISIBLE_WAIT_S", 0.0)
    with pytest.raises(StudyError, match=r"unit run finished on host far-node but its run directory .* is not "
                                         r"visible to the driver: --out must be on a file system that every node"):
        recover(*setting, out=tmp_path / "run", executor=_Elsewhere(), **KW)
    assert status(tmp_path / "run")["state"] == "failed"


def test_a_shared_delta_run_is_one_unit(setting, tmp_path):
    """One delta optimised on every example cannot be sharded: the study runs it as one unit
    that writes OUT itself, with the records of the one-process run."""
    kw = {**KW, "shared_delta": True}
    one = recover(*setting, out=tmp_path / "one", **kw)
    got = recover(*setting, out=tmp_path / "run", executor=LocalExecutor(units=3), **kw)
    assert_same_records(got.records, one.records)
    assert list(status(tmp_path / "run")["units"]) == ["run"]
    assert "merged_from" not in json.loads((tmp_path / "run" / "config.json").read_text())


def test_an_executor_needs_out_and_no_shard(setting):
    with pytest.raises(ValueError, match="needs out=DIR"):
        recover(*setting, executor=LocalExecutor(), **KW)
    with pytest.raises(ValueError, match="no shard"):
        recover(*setting, out="unused", shard=(0, 2), executor=LocalExecutor(), **KW)


# ----------------------------------------------------------------------------------------------
# the command line's flags


def _run_ioi(out: Path, *extra: str) -> list[str]:
    return ["run", "ioi", "--toy", "--hook", HOOK, "--n", str(N), "--out", str(out), *extra]


@pytest.mark.parametrize("extra,message", [
    (["--workers", "2"], "--workers needs --ray"),
    (["--units", "2", "--gpus-per-worker", "0"], "--units, --gpus-per-worker need --ray"),
    (["--ray", "--shard", "0/2"], "--shard and --ray exclude each other"),
    (["--ray", "nowhere"], "--ray: Ray address 'nowhere'"),
    (["--ray", "--workers", "0"], "--ray: workers must be an integer >= 1"),
])
def test_bad_executor_flags_are_one_line_errors(tmp_path, capsys, extra, message):
    pytest.importorskip("ray")
    assert main(_run_ioi(tmp_path / "o", *extra)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err


@pytest.mark.parametrize("command", [
    ["run", "ioi", "--toy"],
    ["sweep", "budget", "--toy", "--budgets", "1,2,4"],
    ["run", "tpp", "--toy"],
    ["run", "unlearning", "--toy"],
    ["run", "refusal"],
])
def test_without_ray_the_ray_flag_is_one_line_naming_the_extra(tmp_path, command):
    """In a fresh interpreter where ``import ray`` fails (as when it is not installed): one line,
    exit status 2, before anything loads or is written."""
    code = ("import sys; sys.modules['ray'] = None; from saerecover.cli import main; "
            "sys.exit(main(sys.argv[1:]))")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "python"), os.environ.get("PYTHONPATH", "")])}
    out = tmp_path / "o"
    proc = subprocess.run([sys.executable, "-c", code, *command, "--out", str(out), "--ray"], env=env,
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr == ("saerecover: error: --ray: running on Ray needs the optional dependency "
                           "ray: pip install 'saerecover[ray]'\n")
    assert proc.stdout == ""
    assert not out.exists()


# ----------------------------------------------------------------------------------------------
# on a local Ray instance: 2 CPUs, 200 MB object store, no dashboard; one for the module


@pytest.fixture(scope="module")
def ray_address():
    """Start the module's Ray instance; its workers find this source tree on PYTHONPATH."""
    ray = pytest.importorskip("ray")
    import saerecover

    before = os.environ.get("PYTHONPATH")
    source = str(Path(saerecover.__file__).resolve().parents[1])
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (source, before) if p)
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=200 * 2**20, log_to_driver=False)
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()
        if before is None:
            del os.environ["PYTHONPATH"]
        else:
            os.environ["PYTHONPATH"] = before


@pytest.fixture(scope="module")
def ray_executor(ray_address):
    """Two workers kept between the module's studies (each imports torch once)."""
    from saerecover.experiments.ray_executor import RayExecutor

    ex = RayExecutor(workers=2, units=4)
    yield ex
    ex.close()


def test_a_ray_run_of_4_units_gives_the_one_process_records(setting, reference, ray_executor, tmp_path):
    result = recover(*setting, out=tmp_path / "run", executor=ray_executor, **KW)
    assert_same_records(result.records, reference.records)
    assert_same_run_directory(result.path, reference.path)
    st = status(result.path)
    assert st["executor"]["kind"] == "ray" and st["executor"]["workers"] == 2
    assert [u["state"] for u in st["units"].values()] == ["done"] * 4
    pids = {u["pid"] for u in st["units"].values()}
    assert len(pids) == 2 and os.getpid() not in pids  # the units ran in the two workers
    # the model, SAE and task came into each worker once, with its first unit, not once per unit
    loads = [u["pid"] for u in st["units"].values() if u["world_load_seconds"] is not None]
    assert sorted(loads) == sorted(pids)


def test_a_ray_budget_sweep_gives_the_one_process_sweep(setting, ray_executor, tmp_path):
    model, clamp, task = setting
    budgets = [1.0, 4.0, 16.0]
    one = budget_sweep(model, clamp, task, budgets, out=tmp_path / "one", **KW)
    got = budget_sweep(model, clamp, task, budgets, out=tmp_path / "ray", executor=ray_executor, **KW)
    for b in budgets:
        assert_same_records(got.runs[b].records, one.runs[b].records)
    assert [r["recovered"] for r in got.summary["budget_sweep"]] == [r["recovered"] for r in one.summary["budget_sweep"]]
    assert got.summary["robustness"] == one.summary["robustness"]
    # 4 units over 3 budgets: each budget cut into 2 shards and merged
    assert len(status(tmp_path / "ray")["units"]) == 6


def test_a_lost_worker_is_replaced_and_its_unit_resumes(setting, reference, ray_executor, tmp_path):
    """Kill (SIGKILL) the worker process that holds a unit once it has written a record: Ray
    restarts the worker, the unit goes back to the queue and resumes from its records."""
    out = tmp_path / "run"
    units = study_dir(out) / "run"
    killed: dict = {}

    def kill_a_worker() -> None:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and not killed:
            for unit in sorted(units.glob("shard-*")) if units.is_dir() else []:
                pid = run_in_use(unit)
                lines = (unit / "records.jsonl").read_bytes().splitlines() if (unit / "records.jsonl").exists() else []
                if pid is not None and 1 <= len(lines) <= 6 and int(pid) != os.getpid():
                    os.kill(int(pid), signal.SIGKILL)
                    killed.update(unit=unit.name, pid=int(pid), records=len(lines))
                    return
            time.sleep(0.02)

    killer = threading.Thread(target=kill_a_worker, daemon=True)
    killer.start()
    slow = {**KW, "batch_size": 1}  # a record at a time: the kill lands mid-unit
    result = recover(*setting, out=out, executor=ray_executor, **slow)
    killer.join(timeout=1)

    assert killed, "no worker was killed"
    assert_same_records(result.records, reference.records)
    unit = status(out)["units"][f"run/{killed['unit']}"]
    assert unit["attempts"] == 2 and len(unit["lost"]) == 1
    assert unit["pid"] != killed["pid"]
    config = json.loads((units / killed["unit"] / "config.json").read_text())
    assert len(config["resumed"]) == 1  # the second attempt resumed the first one's records


@pytest.mark.slow
def test_a_killed_driver_rerun_loses_and_repeats_nothing(setting, ray_address, ray_executor, tmp_path):
    """``saerecover run ioi --ray ADDRESS`` killed (SIGKILL) once a unit has finished, then run
    again with the same --out: it finishes, units finished before the kill are not redone, and
    every record is there once, as a one-process run writes it."""
    ray_executor.close()  # the module's workers hold both CPUs; the driver's own workers need them
    _, clamp, _ = setting
    features = ",".join(str(int(i)) for i in clamp.site_clamps[0].features)
    flags = ["--features", features, "--steps", "10", "--batch-size", "1", "--quiet"]
    assert main(_run_ioi(tmp_path / "one", *flags)) == 0
    out = tmp_path / "ray"
    argv = [sys.executable, "-m", "saerecover.cli", *_run_ioi(out, *flags, "--ray", ray_address, "--workers", "2",
                                                              "--units", "4")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "python"), os.environ.get("PYTHONPATH", "")])}

    driver = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 900
        while time.monotonic() < deadline and driver.poll() is None:
            path = study_dir(out) / STATUS_FILE
            st = json.loads(path.read_text()) if path.exists() else {}
            if 1 <= st.get("units_by_state", {}).get("done", 0) < 4:
                break
            time.sleep(0.05)
        assert driver.poll() is None, "the driver ended before it could be killed"
        assert 1 <= st.get("units_by_state", {}).get("done", 0) < 4, f"no unit finished in time: {st}"
        driver.send_signal(signal.SIGKILL)
        driver.wait(timeout=60)
    finally:
        if driver.poll() is None:
            driver.kill()
    finished = {name: (Path(u["path"]) / "records.jsonl").read_bytes()
                for name, u in st["units"].items() if u["state"] == "done"}
    assert not (out / "config.json").exists()

    rerun = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=900, check=False)
    assert rerun.returncode == 0, rerun.stderr[-2000:]

    assert_same_records(open_run(out).records(), open_run(tmp_path / "one").records())
    after = status(out)["units"]
    for name, records in finished.items():
        assert after[name]["earlier"] is True
        assert (Path(after[name]["path"]) / "records.jsonl").read_bytes() == records
