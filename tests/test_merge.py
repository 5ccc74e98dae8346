"""Merging the run directories of a sharded run (``saerecover run --shard i/n``)."""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import pytest
import torch
from saerecover.cli.runs import add_merge_parser, cmd_merge
from saerecover.experiments.merge import MergeError, merge_runs
from saerecover.runs.directory import VOLATILE_KEYS, RunDirectory, open_run
from saerecover.runs.stats import CONTINUOUS_METRICS, summarize

CONFIG = {
    "task": {"name": "ioi", "n": 10, "seed": 0},
    "model": {"name": "toy", "backend": "hf", "dtype": "float32", "n_layers": 3, "d_model": 8},
    "clamp": [{"hook_name": "blocks.1.hook_resid_post", "features": [1, 2, 3], "mode": "set",
               "value": -5.0, "where": "active", "sae": "toy/layer1"}],
    "recovery": {"steps": 10, "lr": 0.1, "budget": 20.0, "eta": 0.0, "reclamp": False},
    "modes": ["none", "encoder"],
    "delta_site": "blocks.1.hook_resid_post",
}


def example_records(eid: str, mode: str, i: int) -> tuple[dict, dict | None]:
    """A deterministic record (and tensors, for evaluated examples) for example ``i``."""
    rng = random.Random(f"{eid}/{mode}")
    valid = i % 4 != 0
    rec = {"schema": 1, "example_id": eid, "mode": mode, "valid": valid, "base_score": 1.0,
           "defended_score": -1.0, "recovered": None, "failed": False, "error": None}
    if valid and i == 5 and mode == "none":
        rec.update(failed=True, error="non-finite loss or gradient: nan")
        return rec, None
    if not valid:
        return rec, None
    rec.update({m: rng.random() for m in CONTINUOUS_METRICS})
    rec.update(recovered=rng.random() < 0.7, zero_reactivation=rng.random() < 0.5, steps=10,
               recovered_score=rng.random())
    g = torch.Generator().manual_seed(i * 7 + len(mode))
    return rec, {"delta": torch.randn(2, 8, generator=g), "rows": torch.tensor([3, 4]),
                 "h_def": torch.randn(2, 8, generator=g)}


def write_run(out: Path, config: dict, items: list[tuple[str, str, int]], *, finish: bool = True,
              seconds: float = 1.0) -> Path:
    """A run directory as pipeline.recover writes it: per mode, invalid first, then valid."""
    with RunDirectory(out, config=config) as run:
        for mode in config["modes"]:
            ordered = sorted((x for x in items if x[1] == mode), key=lambda x: (x[2] % 4 != 0, x[2]))
            for eid, _, i in ordered:
                rec, tensors = example_records(eid, mode, i)
                if tensors is not None:
                    run.save_tensors(mode, eid, tensors)
                run.append_record(rec)
        if finish:
            n = len({eid for eid, _, _ in items})
            run.write_summary(summarize(run.records(), task="ioi", modes=config["modes"],
                                        extra={"n_examples": n, "clamp": config["clamp"],
                                               "model": config["model"], "seconds": seconds}))
    return out


def items_for(indices) -> list[tuple[str, str, int]]:
    return [(f"ioi-{i:04d}", mode, i) for mode in CONFIG["modes"] for i in indices]


N = 10


def make_shards(root: Path, count: int, *, config: dict | None = None) -> list[Path]:
    """Shard i holds examples i, i+count, ... (the pipeline's --shard i/count split)."""
    paths = []
    for index in range(count):
        cfg = {**(config or CONFIG), "shard": {"index": index, "count": count}}
        paths.append(write_run(root / f"shard{index}", cfg, items_for(range(index, N, count)),
                               seconds=float(index + 1)))
    return paths


def merge_cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    add_merge_parser(parser.add_subparsers(dest="command"))
    return cmd_merge(parser.parse_args(["merge", *argv]))


def no_temp_left(parent: Path) -> bool:
    return not [p for p in parent.iterdir() if ".merging-" in p.name]


# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("count", [2, 3])
def test_merge_equals_the_unsharded_run(tmp_path, count):
    whole = write_run(tmp_path / "whole", CONFIG, items_for(range(N)))
    shards = make_shards(tmp_path, count)
    out = merge_runs(tmp_path / "merged", list(reversed(shards)))  # any order of inputs
    merged, ref = open_run(out), open_run(whole)

    key = lambda r: (r["example_id"], r["mode"])  # noqa: E731
    assert sorted(merged.records(), key=key) == sorted(ref.records(), key=key)
    assert [r["mode"] for r in merged.records()] == [r["mode"] for r in ref.records()]  # grouped by mode
    for rec in ref.records():
        src = ref.tensor_path(rec["mode"], rec["example_id"])
        dst = merged.tensor_path(rec["mode"], rec["example_id"])
        assert dst.is_file() == src.is_file()
        if src.is_file():
            torch.testing.assert_close(merged.load_tensors(rec["mode"], rec["example_id"]),
                                       ref.load_tensors(rec["mode"], rec["example_id"]), rtol=0, atol=0)

    assert "shard" not in merged.config
    assert {k: v for k, v in merged.config.items() if k != "merged_from"} == ref.config
    assert [m["shard"] for m in merged.config["merged_from"]] == list(range(count))
    assert all(m["path"] == str(p.resolve()) for m, p in zip(merged.config["merged_from"], shards))

    s, r = merged.read_summary(), ref.read_summary()
    assert s["n_examples"] == r["n_examples"] == N  # summed over shards
    assert s["n_valid"] == r["n_valid"] and s["n_records"] == r["n_records"]
    assert s["seconds"] == pytest.approx(sum(range(1, count + 1)))
    assert s["merged_shards"] == count and s["clamp"] == r["clamp"] and s["model"] == r["model"]
    for mode in CONFIG["modes"]:
        for k, v in r["modes"][mode].items():
            if k.endswith("_ci95") and k.startswith(CONTINUOUS_METRICS):
                continue  # bootstrap intervals depend on record order
            if isinstance(v, float) or (isinstance(v, list) and v and isinstance(v[0], float)):
                assert s["modes"][mode][k] == pytest.approx(v, rel=1e-12), k
            else:
                assert s["modes"][mode][k] == v, k
    assert (out / "report.md").is_file()
    assert no_temp_left(tmp_path)


def test_mismatched_configs_are_refused(tmp_path):
    shards = make_shards(tmp_path / "a", 2)
    other = {**CONFIG, "recovery": {**CONFIG["recovery"], "lr": 0.2}}
    odd = make_shards(tmp_path / "b", 2, config=other)
    with pytest.raises(MergeError, match="differing config key.*recovery"):
        merge_runs(tmp_path / "out", [shards[0], odd[1]])
    assert not (tmp_path / "out").exists() and no_temp_left(tmp_path)
    # a different shard count is refused too
    three = make_shards(tmp_path / "c", 3)
    with pytest.raises(MergeError, match="one of 2 shards"):
        merge_runs(tmp_path / "out", [shards[0], three[1]])


def test_missing_shards_are_named(tmp_path):
    shards = make_shards(tmp_path, 4)
    with pytest.raises(MergeError, match=r"missing shard\(s\) 1/4, 3/4"):
        merge_runs(tmp_path / "out", [shards[0], shards[2]])
    assert not (tmp_path / "out").exists()


def test_duplicate_shard_and_duplicate_examples_are_refused(tmp_path):
    shards = make_shards(tmp_path / "a", 2)
    copy = make_shards(tmp_path / "b", 2)
    with pytest.raises(MergeError, match="shard 1/2 is given twice"):
        merge_runs(tmp_path / "out", [shards[0], shards[1], copy[1]])
    with pytest.raises(MergeError, match="given twice"):
        merge_runs(tmp_path / "out", [shards[0], shards[1], shards[1]])
    # two shards that both ran example 0
    s0 = write_run(tmp_path / "d0", {**CONFIG, "shard": {"index": 0, "count": 2}}, items_for([0, 2, 4]))
    s1 = write_run(tmp_path / "d1", {**CONFIG, "shard": {"index": 1, "count": 2}}, items_for([0, 1, 3]))
    with pytest.raises(MergeError, match=r"example_id='ioi-0000', mode='none'\) is in shard 0"):
        merge_runs(tmp_path / "out", [s0, s1])
    assert not (tmp_path / "out").exists() and no_temp_left(tmp_path)


def test_unfinished_locked_and_unsharded_inputs_are_refused(tmp_path):
    shards = make_shards(tmp_path, 2)
    (shards[1] / "summary.json").unlink()
    with pytest.raises(MergeError, match="not a finished run"):
        merge_runs(tmp_path / "out", shards)
    cfg = {k: v for k, v in open_run(shards[0]).config.items() if k not in VOLATILE_KEYS}
    with RunDirectory(shards[0], config=cfg):
        with pytest.raises(MergeError, match="still being written"):
            merge_runs(tmp_path / "out", shards)
    whole = write_run(tmp_path / "whole", CONFIG, items_for(range(N)))
    with pytest.raises(MergeError, match="is not a shard"):
        merge_runs(tmp_path / "out", [whole])


def test_out_must_be_new_or_empty(tmp_path):
    shards = make_shards(tmp_path, 2)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(MergeError, match="not empty"):
        merge_runs(out, shards)
    assert (out / "keep.txt").read_text() == "mine"
    (out / "keep.txt").unlink()
    assert merge_runs(out, shards) == out  # an empty directory is fine
    with pytest.raises(MergeError, match="not empty"):
        merge_runs(out, shards)  # and the merged run is not overwritten


def test_cli_merge_exit_codes(tmp_path, capsys):
    shards = make_shards(tmp_path, 2)
    assert merge_cli([str(tmp_path / "out"), *map(str, shards)]) == 0
    assert "merged 2 shard(s)" in capsys.readouterr().out
    assert merge_cli([str(tmp_path / "out2"), str(shards[0])]) == 2
    assert "missing shard(s) 1/2" in capsys.readouterr().err


def test_merged_sharded_run_analyzes_clean(tmp_path):
    """Shards of a run whose records came from saerecover.metrics: the merged run re-analyzes."""
    from saerecover.experiments.analysis import analyze_run
    from test_analysis import build_run, save_sae

    sae_dir = save_sae(tmp_path / "sae")
    whole = build_run(tmp_path / "whole", sae_dir)
    src = open_run(whole)
    records = src.records()
    ids = list(dict.fromkeys(r["example_id"] for r in records))
    shards = []
    for index in range(2):
        mine = set(ids[index::2])
        cfg = {**src.config, "shard": {"index": index, "count": 2}}
        with RunDirectory(tmp_path / f"s{index}", config=cfg) as run:
            for rec in records:
                if rec["example_id"] in mine:
                    mode, eid = rec["mode"], rec["example_id"]
                    if src.tensor_path(mode, eid).is_file():
                        run.save_tensors(mode, eid, src.load_tensors(mode, eid))
                    run.append_record(rec)
            run.write_summary(summarize(run.records(), task="synthetic", modes=cfg["modes"],
                                        extra={"n_examples": len(mine)}))
        shards.append(run.path)
    out = merge_runs(tmp_path / "merged", shards, report=False)
    result = analyze_run(out)
    assert result.ok and result.n_examples == analyze_run(whole).n_examples
    assert json.loads((out / "summary.json").read_text())["n_examples"] == len(ids)
