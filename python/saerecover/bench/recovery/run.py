"""One benchmark run: build the shape, then per mode time a batched recovery and the same
recovery one example at a time, and summarize."""

from __future__ import annotations

import json
import os
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from saerecover.bench.recovery.shapes import SHAPES, LogitDifference, build_examples, build_model, choose_clamp, random_site
from saerecover.bench.recovery.timing import STAGES, PeakMemory, StageClock

MODES = ("none", "encoder", "sketch", "jacobian")


@dataclass
class BenchConfig:
    """What to run (see ``saerecover bench recovery --help``)."""

    shape: str = "gpt2-small"
    device: str = "cpu"
    dtype: str = "float32"
    modes: tuple[str, ...] = MODES
    n: int | None = None
    steps: int = 2
    warmup: int = 1
    single: int | None = None
    features: int = 32
    feature_rate: float = 0.1
    positions: str = "prompt"
    threads: int | None = None
    seed: int = 0

    def validate(self) -> None:
        if self.shape not in SHAPES:
            raise ValueError(f"unknown shape {self.shape!r}; valid: {', '.join(SHAPES)}")
        bad = [m for m in self.modes if m not in MODES]
        if bad or not self.modes:
            raise ValueError(f"unknown mode(s) {bad or self.modes}; valid: {', '.join(MODES)}")
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"unknown device {self.device!r}; valid: cpu, cuda")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("--device cuda: no CUDA device is available")
        for name in ("steps", "features"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be >= 1, got {getattr(self, name)}")
        if self.n is not None and self.n < 1:
            raise ValueError(f"--n must be >= 1, got {self.n}")
        if self.warmup < 0 or (self.single is not None and self.single < 0):
            raise ValueError("--warmup and --single must be >= 0")
        if not 0 < self.feature_rate < 1:
            raise ValueError(f"--feature-rate must be in (0, 1), got {self.feature_rate}")


def _load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def run(cfg: BenchConfig) -> dict[str, Any]:
    """Build the shape and time every mode; returns {"info", "rows", "ratios"}."""
    from saerecover.core.config import RecoveryConfig
    from saerecover.core.defended import DefendedModel
    from saerecover.core.recovery import recover_batch

    cfg.validate()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    shape = SHAPES[cfg.shape]
    device = torch.device(cfg.device)
    n = cfg.n or shape.n
    single = min(n, 4) if cfg.single is None else min(cfg.single, n)
    t0 = time.perf_counter()
    with PeakMemory(device) as build_mem:
        model = build_model(shape, cfg.device, cfg.dtype)
        vocab = int(model.model.get_input_embeddings().num_embeddings) if hasattr(model, "model") else 100
        ex = build_examples(shape, n, vocab, seed=cfg.seed).to(device)
        with torch.no_grad():
            _, cap = model.forward(ex.input_ids, ex.attention_mask, capture=(shape.hook,))
        rows = cap[shape.hook][ex.attention_mask.bool()].float()
        if shape.family == "toy":
            from saerecover import toy

            site = toy.load(device=cfg.device).site(shape.hook)
        else:
            site = random_site(shape, rows, seed=cfg.seed)
        clamp, rates = choose_clamp(site, rows, cfg.features, cfg.feature_rate)
    build_s = time.perf_counter() - t0
    dm = DefendedModel(model, clamp)
    task = LogitDifference(ex)
    rcfg = RecoveryConfig(steps=cfg.warmup + cfg.steps, lr=0.05, budget=1.0, budget_rel=0.5, positions=cfg.positions,
                          history=False, seed=cfg.seed)
    mask = ex.position_mask(cfg.positions)
    info = {"shape": shape.name, "source": shape.source, "hook": shape.hook, "d_model": int(model.d_model),
            "n_layers": int(model.n_layers), "sae_width": site.d_sae, "sae_architecture": site.architecture,
            "clamped_features": cfg.features, "feature_rates_mean": sum(rates) / len(rates),
            "l0_mean": float((site.encode(rows[:512]) > 0).sum(dim=1).float().mean()),
            "n": n, "seq": int(ex.input_ids.shape[1]), "delta_rows_mean": float(mask.sum(1).float().mean()),
            "positions": cfg.positions, "device": cfg.device, "dtype": cfg.dtype, "steps_timed": cfg.steps,
            "warmup_steps": cfg.warmup, "single_examples": single, "torch_threads": torch.get_num_threads(),
            "cpu": platform.processor() or platform.machine(), "cpus": os.cpu_count(), "build_s": build_s,
            "build_peak_bytes": build_mem.peak, "load_start": _load()}
    out_rows = []
    for mode in cfg.modes:
        load_before = _load()
        clock = StageClock(device, skip=cfg.warmup)
        with PeakMemory(device) as mem, clock:
            clock.start()
            outcomes = recover_batch(dm, task, ex, mode=mode, cfg=rcfg, on_step=clock.on_step)
        batched = clock.mean()
        row: dict[str, Any] = {"shape": shape.name, "mode": mode, "n": n, "step_s": batched["total"]}
        row.update({f"{s}_s": batched[s] for s in STAGES})
        row["peak_bytes"] = mem.peak
        row["base_bytes"] = mem.base
        row["batched_ex_steps_per_s"] = n / batched["total"]
        if mode == "jacobian":
            row["jacobian_rows_mean"] = sum(o.metrics["jacobian_rows"] for o in outcomes) / len(outcomes)
            row["jacobian_step_residual_max"] = max(o.metrics["jacobian_step_residual"] for o in outcomes)
        if single:
            one = StageClock(device, skip=cfg.warmup)
            with one:
                for i in range(single):
                    one.start()
                    recover_batch(dm, task, ex.select([i]), mode=mode, cfg=rcfg, on_step=one.on_step)
            row["single_step_s"] = one.mean()["total"]
            row["single_ex_steps_per_s"] = 1.0 / row["single_step_s"]
            row["batched_over_single"] = row["batched_ex_steps_per_s"] / row["single_ex_steps_per_s"]
        row["load"] = [load_before, _load()]
        out_rows.append(row)
    return {"info": info, "rows": out_rows, "ratios": ratios(out_rows)}


def ratios(rows: list[dict[str, Any]]) -> dict[str, float]:
    """The done-when ratios from one run's rows: the encoder projection's share of its step,
    jacobian step / sketch step, and batched / one-at-a-time throughput per mode."""
    by = {r["mode"]: r for r in rows}
    out: dict[str, float] = {}
    if "encoder" in by:
        e = by["encoder"]
        out["encoder_projection_share"] = (e["projection_s"] + e["jacobian_s"]) / e["step_s"]
    if "jacobian" in by and "sketch" in by:
        out["jacobian_over_sketch_step"] = by["jacobian"]["step_s"] / by["sketch"]["step_s"]
    for r in rows:
        if "batched_over_single" in r:
            out[f"batched_over_single_{r['mode']}"] = r["batched_over_single"]
    return out


def format_table(result: dict[str, Any]) -> str:
    """The rows as a plain-text table, with the run's facts above and the ratios below."""
    info = result["info"]
    mib = 2.0**20
    lines = [f"{info['shape']}: {info['n_layers']} layers, d {info['d_model']}, {info['sae_architecture']} SAE "
             f"{info['sae_width']} wide at {info['hook']} (L0 {info['l0_mean']:.0f}), {info['clamped_features']} "
             f"features clamped (firing rate {info['feature_rates_mean']:.2f}); {info['n']} prompts x "
             f"{info['seq']} tokens, delta on {info['delta_rows_mean']:.1f} rows; {info['device']} {info['dtype']}, "
             f"{info['torch_threads']} threads; mean of {info['steps_timed']} steps after {info['warmup_steps']} "
             f"warm-up; load {info['load_start']}",
             f"{'mode':9}{'step ms':>9}{'fwd':>8}{'bwd':>8}{'J':>8}{'proj':>8}{'optim':>7}{'J rows':>8}"
             f"{'peak MiB':>10}{'batch ex/s':>11}{'1-by-1':>8}{'ratio':>7}"]
    for r in result["rows"]:
        jr = f"{r['jacobian_rows_mean']:.0f}" if "jacobian_rows_mean" in r else "-"
        single = f"{r['single_ex_steps_per_s']:8.2f}{r['batched_over_single']:6.1f}x" if "single_step_s" in r else ""
        lines.append(f"{r['mode']:9}{1e3 * r['step_s']:9.0f}{1e3 * r['forward_s']:8.0f}{1e3 * r['backward_s']:8.0f}"
                     f"{1e3 * r['jacobian_s']:8.0f}{1e3 * r['projection_s']:8.0f}{1e3 * r['optimizer_s']:7.1f}"
                     f"{jr:>8}{r['peak_bytes'] / mib:10.0f}{r['batched_ex_steps_per_s']:11.2f}{single}")
    for k, v in result["ratios"].items():
        lines.append(f"{k}: {100 * v:.2f}%" if k.endswith("share") else f"{k}: {v:.2f}x")
    for r in result["rows"]:
        if "jacobian_step_residual_max" in r:
            lines.append(f"jacobian: largest ||J step|| / (||J|| ||step||) over every step {r['jacobian_step_residual_max']:.2e}")
    return "\n".join(lines)


def write_json(result: dict[str, Any], path: str, cfg: BenchConfig) -> None:
    Path(path).write_text(json.dumps({**result, "config": asdict(cfg)}, indent=2) + "\n")
