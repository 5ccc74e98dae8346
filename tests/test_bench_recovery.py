"""``saerecover bench recovery``: a --quick run on the toy world end to end (the table, the JSON
rows, the exact-Jacobian bar on every step), the ratios from constructed rows, bad input."""

from __future__ import annotations

import json

import pytest
from saerecover.bench.recovery.run import BenchConfig, ratios
from saerecover.cli import main

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_quick_run_on_the_toy_writes_every_mode(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["bench", "recovery", "--quick", "--single", "1", "--json", str(out)]) == 0
    table = capsys.readouterr().out
    assert "jacobian_over_sketch_step" in table and "encoder_projection_share" in table
    result = json.loads(out.read_text())
    rows = {r["mode"]: r for r in result["rows"]}
    assert list(rows) == ["none", "encoder", "sketch", "jacobian"]
    assert result["info"]["shape"] == "toy" and result["info"]["n"] == 4
    for r in rows.values():
        parts = sum(r[f"{s}_s"] for s in ("forward", "backward", "jacobian", "projection", "optimizer"))
        assert abs(parts - r["step_s"]) <= 1e-9 + 1e-6 * r["step_s"]
        assert r["forward_s"] > 0 and r["peak_bytes"] >= r["base_bytes"] > 0
        assert r["batched_over_single"] == pytest.approx(r["batched_ex_steps_per_s"] / r["single_ex_steps_per_s"])
    # none: no J, and its "projection" is C4's rescaling alone
    assert rows["none"]["jacobian_s"] == 0 and 0 < rows["none"]["projection_s"] < 0.1 * rows["none"]["step_s"]
    assert rows["sketch"]["jacobian_s"] > 0 and rows["jacobian"]["jacobian_s"] > 0
    assert rows["jacobian"]["jacobian_rows_mean"] > 0
    assert rows["jacobian"]["jacobian_step_residual_max"] <= 1e-5


def test_ratios_of_constructed_rows():
    rows = [{"mode": "encoder", "step_s": 2.0, "projection_s": 0.05, "jacobian_s": 0.0, "batched_over_single": 6.0},
            {"mode": "sketch", "step_s": 4.0, "projection_s": 0.1, "jacobian_s": 1.0},
            {"mode": "jacobian", "step_s": 10.0, "projection_s": 1.0, "jacobian_s": 2.0}]
    assert ratios(rows) == {"encoder_projection_share": 0.025, "jacobian_over_sketch_step": 2.5,
                            "batched_over_single_encoder": 6.0}


@pytest.mark.parametrize("argv,message", [
    (["--modes", "encoder,qr"], "unknown mode(s) ['qr']"),
    (["--steps", "0"], "--steps must be >= 1"),
    (["--feature-rate", "1.5"], "--feature-rate must be in (0, 1)"),
    (["--device", "tpu"], "unknown device 'tpu'"),
])
def test_bad_options_are_one_line_errors(argv, message, capsys):
    assert main(["bench", "recovery", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("saerecover: error: ") and message in err and err.count("\n") == 1


def test_plain_bench_is_still_the_projection_benchmark():
    from saerecover.cli import bench
    from saerecover.cli.app import build_parser

    assert build_parser().parse_args(["bench", "--quick"]).handler is bench.cmd_bench
    assert build_parser().parse_args(["bench", "projection", "--quick"]).handler is bench.cmd_bench
    args = build_parser().parse_args(["bench", "recovery", "--n", "3"])
    assert args.handler is bench.cmd_bench_recovery and args.n == 3 and BenchConfig().shape == args.shape
