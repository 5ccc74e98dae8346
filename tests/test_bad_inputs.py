"""The bad-input matrix (issue 7): every public entry point and CLI command, fed the mistakes a
user actually makes, must fail with a clear error that names the problem and what would be
valid, before any long work (a forward pass, a model load) starts.

Each case is (id, where, the error type, a regex the message must match, the call). Python cases
also check that the tiny model ran no forward pass; CLI cases check exit status 2, a single
``saerecover: error: ...`` line on stderr and no traceback. docs/bad_inputs.md is the table of
this matrix (``python tests/test_bad_inputs.py --table`` prints it; a test keeps the two in step).

Everything is local: tiny models from saerecover.testing, SAEs from sae_lens.SAE.from_dict.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest: tiny models, one thread

HOOK = "blocks.0.hook_resid_post"
D_MODEL, D_SAE = 32, 64
DOC = Path(__file__).resolve().parents[1] / "docs" / "bad_inputs.md"


# ------------------------------------------------------------------------------------- the env


def make_sae(d_in: int = D_MODEL, d_sae: int = D_SAE, hook: str = HOOK, seed: int = 0):
    from sae_lens import SAE

    torch.manual_seed(seed)
    sae = SAE.from_dict({"architecture": "standard", "d_in": d_in, "d_sae": d_sae, "dtype": "float32",
                         "device": "cpu", "apply_b_dec_to_input": True, "normalize_activations": "none",
                         "metadata": {"hook_name": hook}})
    with torch.no_grad():
        sae.b_enc.add_(0.05)
    return sae


class MarginTask:
    """logit(a) - logit(b) at the last token, on fixed random prompts; ``ids`` may be overridden."""

    name = "margin"

    def __init__(self, n: int = 6, seed: int = 0, ids: list[str] | None = None, name: str = "margin") -> None:
        self.n, self.seed, self.ids, self.name = n, seed, ids, name

    def examples(self):
        from saerecover.core.examples import Examples, pad_right

        g = torch.Generator().manual_seed(self.seed)
        seqs = [torch.randint(4, 60, (int(torch.randint(4, 9, (1,), generator=g)),), generator=g).tolist()
                for _ in range(self.n)]
        ids, mask = pad_right(seqs, 0) if seqs else (torch.zeros(0, 1, dtype=torch.long),) * 2
        return Examples(ids, mask, mask.sum(1) - 1 if seqs else torch.zeros(0, dtype=torch.long),
                        self.ids or [f"ex-{i:03d}" for i in range(self.n)])

    def score(self, logits, ex):
        from saerecover.core.examples import answer_logits

        last = answer_logits(logits, ex).float()
        return last[:, 5] - last[:, 6]

    def loss(self, logits, ex):
        return -self.score(logits, ex)

    def describe(self):
        return {"name": self.name, "n": self.n, "seed": self.seed}


@dataclass
class Env:
    root: Path
    model_dir: Path
    sae_dir: Path
    narrow_sae_dir: Path
    no_cfg_dir: Path
    a_file: Path
    model: Any
    site: Any
    narrow_site: Any
    task: MarginTask
    clamp: Any
    run_dir: Path
    shard_dirs: list[Path]

    def examples(self, **changes):
        from dataclasses import replace

        return replace(self.task.examples(), **changes)


def build_env(root: Path) -> Env:
    from saerecover.core.clamp import Clamp
    from saerecover.core.sites import Site, load_site
    from saerecover.experiments.pipeline import recover
    from saerecover.models import load_model
    from saerecover.testing import tiny_gpt2

    root.mkdir(parents=True, exist_ok=True)
    model_dir = tiny_gpt2(root, n_layers=2, d_model=D_MODEL)
    sae_dir, narrow_dir = root / "sae", root / "sae-narrow"
    make_sae().save_model(sae_dir)
    make_sae(d_in=16).save_model(narrow_dir)
    no_cfg = root / "no-cfg"
    no_cfg.mkdir()
    (no_cfg / "weights.safetensors").write_bytes(b"")
    a_file = root / "a-file.txt"
    a_file.write_text("not a directory\n")
    model = load_model(str(model_dir))
    site = load_site(sae_dir, model=model)
    narrow = Site(HOOK, make_sae(d_in=16))
    task = MarginTask()
    clamp = Clamp({site: list(range(0, 64, 2))}, value=-3.0, where="all")
    kw = dict(projection="encoder", steps=1, budget=2.0, progress=False, report=False)
    run_dir = recover(model, clamp, task, out=root / "run", **kw).path
    shards = [recover(model, clamp, task, out=root / f"shard{i}", shard=(i, 2), **kw).path for i in range(2)]
    return Env(root, model_dir, sae_dir, narrow_dir, no_cfg, a_file, model, site, narrow, task, clamp,
               run_dir, shards)


# ------------------------------------------------------------------------------------ the cases


@dataclass
class Case:
    id: str
    where: str
    exc: type | tuple[type, ...] | None  # None: a CLI case (exit status 2)
    match: str
    call: Callable[[Env, Path], Any]
    early: bool = True  # no forward pass may run before the error
    input: str = ""


CASES: list[Case] = []


def case(id: str, where: str, exc, match: str, input: str, *, early: bool = True):
    def register(fn):
        CASES.append(Case(id, where, exc, match, fn, early, input))
        return fn
    return register


def cases(where: str, exc, rows: list[tuple[str, str, str, Callable]], *, early: bool = True) -> None:
    """Register several cases of one entry point: rows of (id, input, match, call)."""
    for id_, inp, match, fn in rows:
        CASES.append(Case(id_, where, exc, match, fn, early, inp))


def _rde():
    from saerecover.runs.errors import RunDirectoryError

    return RunDirectoryError


# -- linalg
def _P(A=None):
    from saerecover.linalg import EncoderNullProjector

    return EncoderNullProjector(np.eye(8, 3) if A is None else A)


def _jnp(J, G, **kw):
    from saerecover.linalg import jacobian_null_project

    return jacobian_null_project(J, G, **kw)


NAN_A = np.eye(8, 3)
NAN_A[2, 1] = np.nan
INF_A = np.eye(8, 3)
INF_A[0, 0] = np.inf

cases("linalg.EncoderNullProjector", ValueError, [
    ("A-1d", "A of shape (8,)", r"A must be 2-D \(d, k\), got shape \(8,\)", lambda e, t: _P(np.ones(8))),
    ("A-3d", "A of shape (2, 8, 3)", r"A must be 2-D", lambda e, t: _P(np.ones((2, 8, 3)))),
    ("A-nan", "NaN in A", r"A contains a non-finite value \(NaN\) at \[2, 1\]", lambda e, t: _P(NAN_A)),
    ("A-inf", "+inf in A", r"A contains a non-finite value \(inf\)", lambda e, t: _P(INF_A)),
    ("A-torch-nan", "NaN in a torch A", r"non-finite", lambda e, t: _P(torch.from_numpy(NAN_A))),
    ("A-rcond-neg", "rcond=-1", r"rcond must be a finite number >= 0", lambda e, t: _P().__class__(np.eye(4), rcond=-1.0)),
    ("A-rcond-nan", "rcond=NaN", r"rcond must be a finite number >= 0", lambda e, t: _P().__class__(np.eye(4), rcond=math.nan)),
    ("X-wrong-d", "X (5, 7) for d=8", r"X has shape \(5, 7\): 7 columns, but the projector was built for d=8",
     lambda e, t: _P().apply(np.ones((5, 7)))),
    ("X-0d", "X a 0-D array", r"X must have at least 1 dimension", lambda e, t: _P().apply(np.array(1.0))),
    ("X-nan", "NaN in X", r"X contains a non-finite value \(NaN\)", lambda e, t: _P().apply(np.full((2, 8), np.nan))),
    ("X-inf-torch", "-inf in a torch X", r"X contains a non-finite value \(-inf\)",
     lambda e, t: _P().apply(torch.full((2, 8), -math.inf))),
    ("X-nan-f16", "NaN in a float16 X", r"non-finite", lambda e, t: _P().apply(np.full((1, 8), np.nan, np.float16))),
    ("X-wrong-d-3d", "X (2, 3, 9) for d=8", r"9 columns", lambda e, t: _P().apply(np.ones((2, 3, 9), np.float32))),
])
cases("linalg.EncoderNullProjector", TypeError, [
    ("A-int", "A of dtype int64", r"A must have a floating-point dtype .*got int64", lambda e, t: _P(np.eye(8, 3, dtype=np.int64))),
    ("A-complex", "A of dtype complex128", r"floating-point dtype", lambda e, t: _P(np.eye(8, 3) + 0j)),
    ("A-list", "A a nested list", r"A must be a numpy.ndarray or a torch.Tensor, got list", lambda e, t: _P([[1.0, 0.0]])),
    ("A-torch-int", "A an int torch tensor", r"A must be a floating-point tensor, got torch.int64",
     lambda e, t: _P(torch.ones(8, 3, dtype=torch.long))),
    ("A-rcond-str", "rcond='1e-3'", r"rcond must be a float or None, got str", lambda e, t: _P().__class__(np.eye(4), rcond="1e-3")),
    ("X-int", "X of dtype int32", r"X must have a floating-point dtype", lambda e, t: _P().apply(np.ones((2, 8), np.int32))),
    ("X-bool", "X of dtype bool", r"floating-point", lambda e, t: _P().apply(np.ones((2, 8), bool))),
    ("X-torch-int", "X an int torch tensor", r"X must be a floating-point tensor", lambda e, t: _P().apply(torch.ones(2, 8, dtype=torch.int32))),
    ("X-object", "X of dtype object", r"floating-point", lambda e, t: _P().apply(np.empty((2, 8), dtype=object))),
])
cases("linalg.jacobian_null_project", ValueError, [
    ("J-1d", "J of shape (5,)", r"J must be 2-D \(m, n\)", lambda e, t: _jnp(np.ones(5), np.ones(5))),
    ("G-3d", "G of shape (2, 2, 5)", r"G must be 1-D \(n,\) or 2-D \(b, n\)", lambda e, t: _jnp(np.ones((3, 5)), np.ones((2, 2, 5)))),
    ("G-wrong-n", "G (4, 6) for J (3, 5)", r"G has shape \(4, 6\): 6 columns, but J has shape \(3, 5\)",
     lambda e, t: _jnp(np.ones((3, 5)), np.ones((4, 6)))),
    ("J-nan", "NaN in J", r"J contains a non-finite value \(NaN\)", lambda e, t: _jnp(np.full((3, 5), np.nan), np.ones((2, 5)))),
    ("G-inf", "+inf in G", r"G contains a non-finite value \(inf\)", lambda e, t: _jnp(np.ones((3, 5)), np.full((2, 5), np.inf))),
    ("G-nan-torch", "NaN in a torch G", r"G contains a non-finite value", lambda e, t: _jnp(torch.ones(3, 5), torch.full((5,), math.nan))),
    ("J-rcond-neg", "rcond=-0.5", r"rcond must be a finite number >= 0", lambda e, t: _jnp(np.ones((3, 5)), np.ones(5), rcond=-0.5)),
])
cases("linalg.jacobian_null_project", TypeError, [
    ("J-int", "J of dtype int64", r"J must have a floating-point dtype", lambda e, t: _jnp(np.ones((3, 5), np.int64), np.ones(5))),
    ("G-int", "G of dtype int64", r"G must have a floating-point dtype", lambda e, t: _jnp(np.ones((3, 5)), np.ones(5, np.int64))),
    ("G-list", "G a list", r"G must be a numpy.ndarray or a torch.Tensor, got list", lambda e, t: _jnp(np.ones((3, 5)), [1.0] * 5)),
])


# -- load_model
def _load_model(src, **kw):
    from saerecover.models import load_model

    return load_model(str(src) if isinstance(src, Path) else src, **kw)


def _no_cuda_device() -> str:
    return "cuda:999" if torch.cuda.is_available() else "cuda:0"


cases("load_model", FileNotFoundError, [
    ("model-missing-abs", "a missing absolute directory", r"model directory /nonexistent/tiny-model does not exist",
     lambda e, t: _load_model("/nonexistent/tiny-model")),
    ("model-missing-rel", "a missing ./relative directory", r"model directory ./no-such-model-dir does not exist",
     lambda e, t: _load_model("./no-such-model-dir")),
    ("model-missing-path", "a missing pathlib.Path", r"does not exist", lambda e, t: _load_model(t / "missing")),
    ("model-no-config", "a directory without config.json", r"is not a model directory: it has no config.json",
     lambda e, t: _load_model(e.no_cfg_dir)),
    ("model-no-config-tlens", "the same, backend='tlens'", r"has no config.json", lambda e, t: _load_model(e.no_cfg_dir, backend="tlens")),
    ("model-file", "a file instead of a directory", r"is a file, not a model directory", lambda e, t: _load_model(e.a_file)),
])
cases("load_model", ValueError, [
    ("model-backend", "backend='jax'", r"unknown backend 'jax'; choose one of \['hf', 'tlens'\]", lambda e, t: _load_model(e.model_dir, backend="jax")),
    ("model-dtype", "dtype='int8'", r"unknown dtype 'int8'; use a torch.dtype or one of", lambda e, t: _load_model(e.model_dir, dtype="int8")),
    ("model-device", "device='gpu'", r"unknown device 'gpu'; use e.g. 'cpu', 'cuda'", lambda e, t: _load_model(e.model_dir, device="gpu")),
    ("model-device-absent", "a CUDA device this machine lacks", r"(CUDA is not available|does not exist)",
     lambda e, t: _load_model(e.model_dir, device=_no_cuda_device())),
    ("model-empty-name", "model=''", r"model name is empty", lambda e, t: _load_model("")),
])
cases("load_model", TypeError, [
    ("model-none", "model=None", r"model must be a hub name or a local directory", lambda e, t: _load_model(None)),
])


# -- load_site
def _load_site(spec, **kw):
    from saerecover.core.sites import load_site

    return load_site(spec, **kw)


cases("load_site", FileNotFoundError, [
    ("sae-missing", "a missing SAE directory", r"SAE /nonexistent/sae does not exist; expected an SAE directory",
     lambda e, t: _load_site("/nonexistent/sae")),
    ("sae-no-cfg", "an SAE directory without cfg.json", r"is not an SAE directory: it has no cfg.json", lambda e, t: _load_site(e.no_cfg_dir)),
    ("sae-file", "a file instead of an SAE directory", r"is a file, not an SAE directory", lambda e, t: _load_site(e.a_file)),
])
cases("load_site", ValueError, [
    ("sae-no-release", "'justaname' (no RELEASE/ID)", r"neither a local directory nor 'RELEASE/ID'", lambda e, t: _load_site("justaname")),
    ("sae-width", "an SAE with d_in=16 for d_model=32",
     r"SAE width does not match the model: the SAE at 'blocks.0.hook_resid_post' reads d_in=16 but the model has d_model=32",
     lambda e, t: _load_site(e.narrow_sae_dir, model=e.model)),
    ("sae-hook-layer", "hook_name='blocks.9.hook_resid_post' on a 2-layer model", r"unknown hook name 'blocks.9.hook_resid_post' for this model; valid sites",
     lambda e, t: _load_site(e.sae_dir, hook_name="blocks.9.hook_resid_post", model=e.model)),
    ("sae-hook-kind", "hook_name='blocks.0.hook_mlp_out'", r"unknown hook name 'blocks.0.hook_mlp_out'",
     lambda e, t: _load_site(e.sae_dir, hook_name="blocks.0.hook_mlp_out", model=e.model)),
])
cases("load_site", TypeError, [
    ("sae-int", "spec=5", r"SAE must be a local directory, 'RELEASE/ID' or an sae_lens SAE, got int", lambda e, t: _load_site(5)),
])


# -- Site.check_features and Clamp
def _clamp(e, feats, **kw):
    from saerecover.core.clamp import Clamp

    return Clamp({e.site: feats}, **kw)


cases("Site.check_features", ValueError, [
    ("feat-range", "index 64 for d_sae=64", r"feature index 64 is out of range .* valid indices 0..63", lambda e, t: e.site.check_features([1, 64])),
    ("feat-negative", "index -1", r"feature index -1 is out of range", lambda e, t: e.site.check_features([-1, 3])),
    ("feat-dup", "indices [3, 3, 5]", r"duplicate feature indices .*: \[3\]", lambda e, t: e.site.check_features([3, 3, 5])),
    ("feat-2d", "a (2, 2) index tensor", r"must be 1-D, got shape \(2, 2\)", lambda e, t: e.site.check_features(torch.ones(2, 2, dtype=torch.long))),
])
cases("Site.check_features", TypeError, [
    ("feat-float", "float indices [1.0, 2.0]", r"must be integers, got torch.float32", lambda e, t: e.site.check_features([1.0, 2.0])),
    ("feat-str", "indices ['a', 'b']", r"must be a list or 1-D tensor of integers", lambda e, t: e.site.check_features(["a", "b"])),
    ("feat-bool", "a bool mask instead of indices", r"must be integers, got torch.bool", lambda e, t: e.site.check_features(torch.ones(4, dtype=torch.bool))),
])
cases("Clamp", ValueError, [
    ("clamp-mode", "mode='clip'", r"unknown clamp mode 'clip'; valid: set, multiply, zero", lambda e, t: _clamp(e, [1], mode="clip")),
    ("clamp-where", "where='some'", r"unknown clamp where 'some'; valid: all, active", lambda e, t: _clamp(e, [1], where="some")),
    ("clamp-nan", "value=NaN", r"clamp value must be finite, got nan", lambda e, t: _clamp(e, [1], value=math.nan)),
    ("clamp-inf", "value=-inf", r"clamp value must be finite", lambda e, t: _clamp(e, [1], value=-math.inf)),
    ("clamp-range", "feature 100 for d_sae=64", r"feature index 100 is out of range", lambda e, t: _clamp(e, [1, 100])),
    ("clamp-dup", "features [2, 2]", r"duplicate feature indices", lambda e, t: _clamp(e, [2, 2])),
    ("clamp-twice", "one site clamped twice (combine)", r"is clamped twice",
     lambda e, t: e.clamp.combine(_clamp(e, [1]), _clamp(e, [2]))),
])
cases("Clamp", TypeError, [
    ("clamp-value-str", "value='strong'", r"clamp value must be a number, got 'strong'", lambda e, t: _clamp(e, [1], value="strong")),
    ("clamp-key", "a hook name string as key", r"clamp keys must be Site objects", lambda e, t: e.clamp.__class__({HOOK: [1]})),
    ("clamp-not-dict", "a list instead of a dict", r"clamp features must be a dict \{site: feature indices\}, got list",
     lambda e, t: e.clamp.__class__([e.site])),
    ("clamp-int-feats", "features=5 (not a list)", r"must be a list or 1-D tensor of integers, got int", lambda e, t: _clamp(e, 5)),
    ("clamp-float-feats", "features [1.5, 2.7] (were truncated before)", r"must be integers, got torch.float32", lambda e, t: _clamp(e, [1.5, 2.7])),
])


# -- DefendedModel
def _defended(e, site, feats=(1, 2)):
    from saerecover.core.clamp import Clamp
    from saerecover.core.defended import DefendedModel

    return DefendedModel(e.model, Clamp({site: list(feats)}))


def _site_at(hook, d_in=D_MODEL):
    from saerecover.core.sites import Site

    return Site(hook, make_sae(d_in=d_in, hook=hook))


cases("DefendedModel", ValueError, [
    ("defended-width", "an SAE with d_in=16 on a d_model=32 model", r"SAE width does not match the model", lambda e, t: _defended(e, e.narrow_site)),
    ("defended-layer", "site 'blocks.7.hook_resid_pre' on a 2-layer model", r"names layer 7, but the model has 2 layers \(valid: 0..1\)",
     lambda e, t: _defended(e, _site_at("blocks.7.hook_resid_pre"))),
    ("defended-hook", "site 'blocks.0.hook_attn_out'", r"expected 'blocks.L.hook_resid_pre' or 'blocks.L.hook_resid_post'",
     lambda e, t: _defended(e, _site_at("blocks.0.hook_attn_out"))),
])


# -- RecoveryConfig
def _cfg(**kw):
    from saerecover.core.config import RecoveryConfig

    return RecoveryConfig(**kw).validate()


cases("RecoveryConfig.validate", ValueError, [
    ("cfg-steps-neg", "steps=-1", r"steps must be >= 0, got -1", lambda e, t: _cfg(steps=-1)),
    ("cfg-lr-zero", "lr=0", r"lr must be a finite number > 0, got 0", lambda e, t: _cfg(lr=0)),
    ("cfg-lr-neg", "lr=-0.1", r"lr must be a finite number > 0", lambda e, t: _cfg(lr=-0.1)),
    ("cfg-lr-nan", "lr=NaN", r"lr must be a finite number > 0, got nan", lambda e, t: _cfg(lr=math.nan)),
    ("cfg-lr-inf", "lr=inf", r"lr must be a finite number > 0, got inf", lambda e, t: _cfg(lr=math.inf)),
    ("cfg-budget-zero", "budget=0", r"budget must be > 0 \(C4: \|\|delta\|\| <= budget\), got 0", lambda e, t: _cfg(budget=0)),
    ("cfg-budget-neg", "budget=-5", r"budget must be > 0", lambda e, t: _cfg(budget=-5.0)),
    ("cfg-budget-nan", "budget=NaN", r"budget must be > 0", lambda e, t: _cfg(budget=math.nan)),
    ("cfg-optimizer", "optimizer='adamw'", r"unknown optimizer 'adamw'; valid: adam, sgd", lambda e, t: _cfg(optimizer="adamw")),
    ("cfg-positions", "positions='last'", r"unknown positions 'last'; valid: answer, all, prompt, response", lambda e, t: _cfg(positions="last")),
    ("cfg-lambda-neg", "lambda_act=-1", r"lambda_act must be a finite number >= 0", lambda e, t: _cfg(lambda_act=-1.0)),
    ("cfg-lambda-nan", "lambda_delta=NaN", r"lambda_delta must be a finite number >= 0, got nan", lambda e, t: _cfg(lambda_delta=math.nan)),
    ("cfg-eta-neg", "eta=-0.1", r"eta must be a finite number >= 0", lambda e, t: _cfg(eta=-0.1)),
    ("cfg-margin-nan", "stop_margin=NaN", r"stop_margin must be finite", lambda e, t: _cfg(stop_margin=math.nan)),
    ("cfg-rcond-neg", "rcond=-1e-6", r"rcond must be a finite number >= 0", lambda e, t: _cfg(rcond=-1e-6)),
    ("cfg-probes-neg", "sketch_probes=-2", r"sketch_probes must be >= 0", lambda e, t: _cfg(sketch_probes=-2)),
])
cases("RecoveryConfig.validate", TypeError, [
    ("cfg-steps-float", "steps=2.5", r"steps must be an integer, got 2.5", lambda e, t: _cfg(steps=2.5)),
    ("cfg-steps-bool", "steps=True", r"steps must be an integer, got True", lambda e, t: _cfg(steps=True)),
    ("cfg-lr-str", "lr='0.1'", r"lr must be a number, got '0.1'", lambda e, t: _cfg(lr="0.1")),
    ("cfg-reclamp-str", "reclamp='yes'", r"reclamp must be True or False, got 'yes'", lambda e, t: _cfg(reclamp="yes")),
    ("cfg-seed-float", "seed=0.5", r"seed must be an integer", lambda e, t: _cfg(seed=0.5)),
])


# -- recover_batch
def _rb(e, ex=None, mode="encoder", clamp=None, **kw):
    from saerecover.core.config import RecoveryConfig
    from saerecover.core.defended import DefendedModel
    from saerecover.core.recovery import recover_batch

    cfg = kw.pop("cfg", RecoveryConfig(steps=1))
    return recover_batch(DefendedModel(e.model, clamp or e.clamp), e.task, ex if ex is not None else e.task.examples(),
                         mode=mode, cfg=cfg, **kw)


def _raw_cfg(**kw):
    from saerecover.core.config import RecoveryConfig

    return RecoveryConfig(**kw)


def _empty_clamp(e):
    from saerecover.core.clamp import Clamp

    return Clamp({e.site: []})


def _pos(e, k, value):
    ex = e.task.examples()
    pos = ex.answer_pos.clone()
    pos[k] = value
    return e.examples(answer_pos=pos)


def _pos_on_padding(e):
    ex = e.task.examples()
    short = int(ex.attention_mask.sum(1).argmin())
    pos = ex.answer_pos.clone()
    pos[short] = ex.input_ids.shape[1] - 1
    return e.examples(answer_pos=pos)


cases("recover_batch", ValueError, [
    ("rb-mode", "mode='orthogonal'", r"unknown projection 'orthogonal'; valid: none, encoder, jacobian, sketch",
     lambda e, t: _rb(e, mode="orthogonal")),
    ("rb-delta-layer", "delta_site on layer 5 of a 2-layer model", r"names layer 5, but the model has 2 layers",
     lambda e, t: _rb(e, delta_site="blocks.5.hook_resid_post")),
    ("rb-delta-unclamped", "delta_site that exists but is not clamped", r"the first delta site 'blocks.1.hook_resid_post' must be clamped",
     lambda e, t: _rb(e, delta_site="blocks.1.hook_resid_post")),
    ("rb-pos-beyond", "answer position 99 in a sequence of 8", r"answer position 99 of example 'ex-002' is outside its sequence \(valid: 0..\d+\)",
     lambda e, t: _rb(e, _pos(e, 2, 99))),
    ("rb-pos-negative", "answer position -1", r"answer position -1 of example 'ex-000' is outside its sequence",
     lambda e, t: _rb(e, _pos(e, 0, -1))),
    ("rb-pos-padding", "answer position on a padding token", r"is a padding token \(attention_mask is 0 there\)",
     lambda e, t: _rb(e, _pos_on_padding(e))),
    ("rb-dup-ids", "two examples with the same id", r"example ids must be unique; repeated: \['x'\]",
     lambda e, t: _rb(e, e.examples(ids=["x"] * 6))),
    ("rb-mask-shape", "attention_mask of another shape", r"examples.attention_mask has shape",
     lambda e, t: _rb(e, e.examples(attention_mask=torch.ones(6, 3, dtype=torch.long)))),
    ("rb-budget-shape", "per-example budgets of shape (2,) for 6 examples", r"budget must hold one value per example, shape \(6,\), got shape \(2,\)",
     lambda e, t: _rb(e, budget=torch.ones(2))),
    ("rb-budget-neg", "a per-example budget of -1", r"per-example budgets must be finite and > 0 \(C4\)",
     lambda e, t: _rb(e, budget=-torch.ones(6))),
    ("rb-empty-features", "a clamp with an empty feature set", r"has an empty feature set: nothing is defended there",
     lambda e, t: _rb(e, clamp=_empty_clamp(e))),
    ("rb-steps-neg", "cfg.steps=-3", r"steps must be >= 0", lambda e, t: _rb(e, cfg=_raw_cfg(steps=-3))),
])
cases("recover_batch", TypeError, [
    ("rb-ids-float", "float input_ids", r"examples.input_ids must hold integers, got torch.float32",
     lambda e, t: _rb(e, e.examples(input_ids=e.task.examples().input_ids.float()))),
])


# -- pipeline.recover
def _recover(e, t, clamp=None, task=None, **kw):
    from saerecover.experiments.pipeline import recover

    kw.setdefault("projection", "encoder")
    kw.setdefault("steps", 1)
    return recover(e.model, clamp if clamp is not None else e.clamp, task or e.task, progress=False, report=False, **kw)


def _foreign_run(e, t, **changes):
    """A copy of the finished run with config.json changed (another task, another schema)."""
    import shutil

    out = t / "foreign"
    shutil.copytree(e.run_dir, out)
    from saerecover.runs.directory import config_hash

    cfg = json.loads((out / "config.json").read_text())
    cfg.update(changes)
    cfg["config_hash"] = config_hash(cfg)  # a consistent run, written by someone else
    (out / "config.json").write_text(json.dumps(cfg))
    return out


def _nonrun_dir(t):
    d = t / "notes"
    d.mkdir()
    (d / "notes.txt").write_text("mine\n")
    return d


def _narrow_clamp(e, t):
    from saerecover.core.clamp import Clamp

    return Clamp({_site_at(HOOK, 16): [1]})


cases("pipeline.recover", ValueError, [
    ("rec-mode", "projection='orth'", r"unknown projection mode\(s\) \['orth'\]; valid: none, encoder, jacobian, sketch",
     lambda e, t: _recover(e, t, projection="orth")),
    ("rec-no-modes", "projection=[]", r"unknown projection mode\(s\) \[\]", lambda e, t: _recover(e, t, projection=[])),
    ("rec-dup-modes", "projection=['none', 'none']", r"projection modes repeat", lambda e, t: _recover(e, t, projection=["none", "none"])),
    ("rec-batch-zero", "batch_size=0", r"batch_size must be an integer >= 1, got 0", lambda e, t: _recover(e, t, batch_size=0)),
    ("rec-batch-float", "batch_size=2.5", r"batch_size must be an integer >= 1", lambda e, t: _recover(e, t, batch_size=2.5)),
    ("rec-budget-zero", "budget=0", r"budget must be > 0", lambda e, t: _recover(e, t, budget=0.0)),
    ("rec-budget-neg", "budget=-1", r"budget must be > 0", lambda e, t: _recover(e, t, budget=-1.0)),
    ("rec-steps-neg", "steps=-1", r"steps must be >= 0", lambda e, t: _recover(e, t, steps=-1)),
    ("rec-lr-zero", "lr=0", r"lr must be a finite number > 0", lambda e, t: _recover(e, t, lr=0.0)),
    ("rec-no-sites", "an empty Clamp()", r"the clamp has no sites: nothing is defended", lambda e, t: _recover(e, t, clamp=_empty_clamp(e).__class__())),
    ("rec-empty-features", "a clamp with an empty feature set", r"has an empty feature set", lambda e, t: _recover(e, t, clamp=_empty_clamp(e))),
    ("rec-width", "a clamp whose SAE has d_in=16", r"SAE width does not match the model", lambda e, t: _recover(e, t, clamp=_narrow_clamp(e, t))),
    ("rec-delta-site", "delta_site not clamped", r"delta site 'blocks.1.hook_resid_post' is not clamped",
     lambda e, t: _recover(e, t, delta_site="blocks.1.hook_resid_post")),
    ("rec-shard", "shard=(2, 2)", r"shard must be i/n with 0 <= i < n, got 2/2", lambda e, t: _recover(e, t, shard=(2, 2))),
    ("rec-tokens", "max_batch_tokens=0", r"max_batch_tokens must be a finite number > 0", lambda e, t: _recover(e, t, max_batch_tokens=0)),
    ("rec-memory", "memory_limit_mb=-5", r"memory_limit_mb must be a finite number > 0", lambda e, t: _recover(e, t, memory_limit_mb=-5)),
    ("rec-no-examples", "a task with no examples", r"task 'margin' has no examples", lambda e, t: _recover(e, t, task=MarginTask(n=0))),
    ("rec-dup-ids", "a task with repeated example ids", r"example ids must be unique",
     lambda e, t: _recover(e, t, task=MarginTask(ids=["a", "b", "a", "c", "d", "e"]))),
])
cases("pipeline.recover", TypeError, [
    ("rec-unknown-option", "steps misspelled 'stpes'", r"unknown recovery option 'stpes'; valid: steps, lr, budget",
     lambda e, t: _recover(e, t, stpes=10)),
    ("rec-clamp-type", "a dict instead of a Clamp", r"clamp must be a saerecover Clamp, got dict", lambda e, t: _recover(e, t, clamp={"a": 1})),
])
cases("pipeline.recover", (_rde(),), [
    ("rec-out-file", "out= an existing file", r"exists and is not a directory", lambda e, t: _recover(e, t, out=e.a_file)),
    ("rec-out-nonrun", "out= a non-empty directory that is not a run", r"is not empty \(notes.txt\) but holds no config.json: it is not a saerecover run directory",
     lambda e, t: _recover(e, t, out=_nonrun_dir(t))),
    ("rec-out-other-task", "out= a run directory of another task", r"holds a run of another task; differing key\(s\): .*task",
     lambda e, t: _recover(e, t, out=_foreign_run(e, t, task={"name": "ioi", "n": 64}))),
    ("rec-out-other-version", "out= a run directory of another schema version", r"uses run-directory schema 99; this saerecover .* reads schema 1",
     lambda e, t: _recover(e, t, out=_foreign_run(e, t, run_schema=99))),
    ("rec-id-escape", "example id '../../etc/passwd'", r"example_id '../../etc/passwd' cannot be used as a file name",
     lambda e, t: _recover(e, t, task=MarginTask(ids=["../../etc/passwd", "b", "c", "d", "e", "f"]), out=t / "o")),
    ("rec-id-slash", "example id 'a/b'", r"example_id 'a/b' cannot be used as a file name",
     lambda e, t: _recover(e, t, task=MarginTask(ids=["a/b", "b", "c", "d", "e", "f"]), out=t / "o")),
    ("rec-id-abs", "example id '/tmp/x'", r"cannot be used as a file name",
     lambda e, t: _recover(e, t, task=MarginTask(ids=["/tmp/x", "b", "c", "d", "e", "f"]))),
])


# -- select_by_attribution
def _sel(e, site=None, top_k=4, ex=None, **kw):
    from saerecover.core.selection import select_by_attribution

    return select_by_attribution(e.model, site or e.site, e.task, ex if ex is not None else e.task.examples(), top_k=top_k, **kw)


cases("select_by_attribution", ValueError, [
    ("sel-topk-zero", "top_k=0", r"top_k must be an integer >= 1, got 0", lambda e, t: _sel(e, top_k=0)),
    ("sel-topk-neg", "top_k=-3", r"top_k must be an integer >= 1, got -3", lambda e, t: _sel(e, top_k=-3)),
    ("sel-topk-float", "top_k=2.5", r"top_k must be an integer >= 1, got 2.5", lambda e, t: _sel(e, top_k=2.5)),
    ("sel-width", "an SAE with d_in=16", r"SAE width does not match the model", lambda e, t: _sel(e, site=e.narrow_site)),
    ("sel-hook", "a site on layer 4 of a 2-layer model", r"names layer 4", lambda e, t: _sel(e, site=_site_at("blocks.4.hook_resid_pre"))),
    ("sel-positions", "positions='last'", r"unknown positions 'last'", lambda e, t: _sel(e, positions="last")),
    ("sel-empty", "no examples", r"no examples: feature attribution needs at least one", lambda e, t: _sel(e, ex=MarginTask(n=0).examples())),
    ("sel-pos-beyond", "answer position outside the sequence", r"outside its sequence", lambda e, t: _sel(e, ex=_pos(e, 1, 50))),
])
cases("select_by_attribution", TypeError, [
    ("sel-site-type", "a hook name instead of a Site", r"site must be a saerecover Site", lambda e, t: _sel(e, site=HOOK)),
])


# -- IOI
def _ioi(e, **kw):
    from saerecover.tasks.ioi import IOI

    kw.setdefault("tokenizer", e.model.tokenizer)
    return IOI(**kw)


cases("tasks.IOI", ValueError, [
    ("ioi-n-zero", "n=0", r"n must be an integer >= 1, got 0", lambda e, t: _ioi(e, n=0)),
    ("ioi-n-neg", "n=-5", r"n must be an integer >= 1, got -5", lambda e, t: _ioi(e, n=-5)),
    ("ioi-n-float", "n=2.5", r"n must be an integer >= 1, got 2.5", lambda e, t: _ioi(e, n=2.5)),
    ("ioi-pattern", "patterns=['CABA']", r"unknown IOI patterns \['CABA'\]; valid: BABA, ABBA", lambda e, t: _ioi(e, patterns=["CABA"])),
    ("ioi-pattern-str", "patterns='BABA,XYZ'", r"unknown IOI patterns \['XYZ'\]", lambda e, t: _ioi(e, patterns="BABA,XYZ")),
    ("ioi-no-patterns", "patterns=[]", r"unknown IOI patterns \[\]", lambda e, t: _ioi(e, patterns=[])),
    ("ioi-names", "names that are not single tokens", r"fewer than two names are single tokens",
     lambda e, t: _ioi(e, names=["mary", "Zebediah"])),
])
cases("tasks.IOI", TypeError, [
    ("ioi-tokenizer", "tokenizer=None", r"tokenizer must be a transformers tokenizer, got NoneType", lambda e, t: _ioi(e, tokenizer=None)),
])


# -- RunDirectory / open_run
def _open(path):
    from saerecover.runs.directory import open_run

    return open_run(path)


def _rundir(path, config):
    from saerecover.runs.directory import RunDirectory

    return RunDirectory(path, config=config)


def _garbage_config(t):
    d = t / "garbage"
    d.mkdir()
    (d / "config.json").write_text("{not json")
    return d


def _config_without_hash(t):
    d = t / "nohash"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"task": {"name": "x"}}))
    return d


def _with_open_run(e, t, fn):
    import shutil

    out = t / "copy"
    shutil.copytree(e.run_dir, out)
    run = _rundir(out, config=_open(e.run_dir).config)
    try:
        return fn(run)
    finally:
        run.close()


cases("RunDirectory / open_run", (_rde(),), [
    ("run-missing", "a missing run directory", r"/nonexistent/run is not a directory", lambda e, t: _open("/nonexistent/run")),
    ("run-file", "a file", r"is not a directory", lambda e, t: _open(e.a_file)),
    ("run-no-config", "a directory without config.json", r"is not a saerecover run directory \(no config.json\)", lambda e, t: _open(e.no_cfg_dir)),
    ("run-other-version", "a run of another schema version", r"uses run-directory schema 99", lambda e, t: _open(_foreign_run(e, t, run_schema=99))),
    ("run-garbage", "config.json that is not JSON", r"cannot read .*config.json", lambda e, t: _open(_garbage_config(t))),
    ("run-no-hash", "config.json without config_hash", r"is not a saerecover run config \(no config_hash\)",
     lambda e, t: _open(_config_without_hash(t))),
    ("run-reserved-key", "a config using the reserved key 'created'", r"config uses reserved key\(s\) \['created'\]",
     lambda e, t: _rundir(t / "r", {"created": "now"})),
    ("run-config-type", "config=[1, 2]", r"config must be a dict, got list", lambda e, t: _rundir(t / "r", [1, 2])),
    ("run-config-nan", "a config holding NaN", r"config.lr is nan; JSON has no NaN/infinity", lambda e, t: _rundir(t / "r", {"lr": math.nan})),
    ("run-config-object", "a config holding an object", r"config.f has type function, which has no JSON form", lambda e, t: _rundir(t / "r", {"f": _open})),
    ("run-other-task", "resume with another task's config", r"holds a run of another task",
     lambda e, t: _rundir(_foreign_run(e, t), {**_open(e.run_dir).config, "task": {"name": "other"}})),
    ("run-tensor-escape", "tensor_path(mode, '../../x')", r"example_id '../../x' cannot be used as a file name",
     lambda e, t: _open(e.run_dir).tensor_path("encoder", "../../x")),
    ("run-mode-escape", "tensor_path('..', id)", r"mode '..' cannot be used as a file name", lambda e, t: _open(e.run_dir).tensor_path("..", "ex-000")),
    ("run-record-abs", "append_record with example_id '/etc/passwd'", r"example_id '/etc/passwd' cannot be used as a file name",
     lambda e, t: _with_open_run(e, t, lambda r: r.append_record({"example_id": "/etc/passwd", "mode": "none"}))),
    ("run-save-escape", "save_tensors with mode 'a/../../b'", r"mode 'a/../../b' cannot be used as a file name",
     lambda e, t: _with_open_run(e, t, lambda r: r.save_tensors("a/../../b", "x", {"t": torch.zeros(1)}))),
    ("run-readonly", "append_record on a run opened read-only", r"was opened read-only", lambda e, t: _open(e.run_dir).append_record({})),
    ("run-no-summary", "read_summary of an unfinished run", r"summary.json does not exist yet",
     lambda e, t: (lambda d: ((d / "summary.json").unlink(), _open(d).read_summary()))(_foreign_run(e, t))),
])


# -- analyze_run / merge_runs
def _analyze(path, **kw):
    from saerecover.experiments.analysis import analyze_run

    return analyze_run(path, **kw)


def _merge(out, dirs):
    from saerecover.experiments.merge import merge_runs

    return merge_runs(out, dirs, report=False)


cases("analyze_run", (_rde(),), [
    ("an-missing", "a missing run directory", r"is not a directory", lambda e, t: _analyze("/nonexistent/run")),
    ("an-not-run", "a directory that is not a run", r"not a saerecover run directory", lambda e, t: _analyze(e.no_cfg_dir)),
    ("an-other-version", "a run of another schema version", r"schema 99", lambda e, t: _analyze(_foreign_run(e, t, run_schema=99))),
    ("an-sae-missing", "sae= a missing directory", r"the SAE directory /nonexistent/sae of 'blocks.0.hook_resid_post' does not exist here",
     lambda e, t: _analyze(e.run_dir, sae="/nonexistent/sae")),
])
cases("analyze_run", FileNotFoundError, [
    ("an-sae-no-cfg", "sae= a directory without cfg.json", r"has no cfg.json", lambda e, t: _analyze(e.run_dir, sae=str(e.no_cfg_dir))),
])
cases("analyze_run", ValueError, [
    ("an-atol", "atol=-1", r"tolerances must be >= 0, got atol=-1", lambda e, t: _analyze(e.run_dir, atol=-1)),
    ("an-topk", "top_k=-2", r"top_k must be an integer >= 0, got -2", lambda e, t: _analyze(e.run_dir, top_k=-2)),
])
cases("merge_runs", (_rde(),), [
    ("merge-none", "no shard directories", r"nothing to merge", lambda e, t: _merge(t / "m", [])),
    ("merge-twice", "the same shard twice", r"the same run directory is given twice", lambda e, t: _merge(t / "m", [e.shard_dirs[0]] * 2)),
    ("merge-into-input", "OUT is one of the inputs", r"is one of the inputs", lambda e, t: _merge(e.shard_dirs[0], e.shard_dirs)),
    ("merge-not-run", "an input that is not a run", r"not a saerecover run directory", lambda e, t: _merge(t / "m", [e.no_cfg_dir])),
    ("merge-not-shard", "an input that is not a shard", r"(not a shard|no shard)", lambda e, t: _merge(t / "m", [e.run_dir, e.shard_dirs[1]])),
    ("merge-missing-shard", "1 of 2 shards", r"(missing|need all|of 2 shards|given 1)", lambda e, t: _merge(t / "m", [e.shard_dirs[0]])),
    ("merge-out-nonempty", "OUT a non-empty directory", r"exists and is not empty", lambda e, t: _merge(_nonrun_dir(t), e.shard_dirs)),
])


# -- generate
def _gen(e, ids=None, **kw):
    from saerecover.models.generation import generate

    return generate(e.model, ids if ids is not None else [[5, 6, 7]], **kw)


def _identity_edit():
    from saerecover.models.generation import static_edit

    return static_edit(lambda h: h)


cases("generate", ValueError, [
    ("gen-max-new", "max_new_tokens=-1", r"max_new_tokens must be >= 0, got -1", lambda e, t: _gen(e, max_new_tokens=-1)),
    ("gen-hook", "an edit at 'blocks.3.hook_resid_pre' on a 2-layer model", r"names layer 3",
     lambda e, t: _gen(e, edits={"blocks.3.hook_resid_pre": _identity_edit()})),
    ("gen-empty-prompt", "an empty prompt", r"every prompt needs at least one real token", lambda e, t: _gen(e, [[5, 6], []])),
    ("gen-too-long", "prompt + max_new_tokens beyond the model's 64 positions", r"exceeds the model's 64 positions",
     lambda e, t: _gen(e, [[5] * 60], max_new_tokens=10)),
    ("gen-temperature", "temperature=0 with sampling", r"temperature must be > 0 when sampling", lambda e, t: _gen(e, do_sample=True, temperature=0.0)),
    ("gen-mask-shape", "attention_mask of another shape", r"attention_mask has shape \(1, 2\); input_ids has \(1, 3\)",
     lambda e, t: _gen(e, torch.tensor([[5, 6, 7]]), attention_mask=torch.ones(1, 2))),
])
def _additive(delta, mask=None):
    from saerecover.models.generation import additive_edit

    return additive_edit(delta, mask)


cases("generation.additive_edit", ValueError, [
    ("add-1d", "delta of shape (32,)", r"delta must be \(batch, T, d_model\) or \(T, d_model\); got shape \(32,\)",
     lambda e, t: _additive(torch.zeros(32))),
    ("add-nan", "NaN in delta", r"additive_edit: delta of shape \(1, 3, 32\) contains NaN or infinity",
     lambda e, t: _additive(torch.full((3, 32), math.nan))),
    ("add-mask", "positions_mask (5,) for a delta of 3 positions", r"positions_mask has shape \(1, 5\); delta has shape \(1, 3, 32\)",
     lambda e, t: _additive(torch.zeros(3, 32), torch.ones(5, dtype=torch.bool))),
])
cases("generate", ValueError, [
    ("gen-delta-width", "an additive delta with d_model 16 on a d_model 32 model", r"additive_edit: delta has d_model 16, the residual has 32",
     lambda e, t: _gen(e, edits={HOOK: _additive(torch.zeros(3, 16))})),
    ("gen-delta-batch", "an additive delta for 2 examples, 3 prompts", r"additive_edit: delta has batch 2, the residual has batch 3",
     lambda e, t: _gen(e, [[5, 6], [7, 8], [9, 10]], edits={HOOK: _additive(torch.zeros(2, 3, 32))})),
], early=False)
cases("generate", TypeError, [
    ("gen-edit-type", "an edit that is not callable", r"the edit for 'blocks.0.hook_resid_post' is int, not a callable",
     lambda e, t: _gen(e, edits={HOOK: 3})),
])


# -- the CLI
def _yaml(t, text, name="cfg.yaml"):
    p = t / name
    p.write_text(text)
    return str(p)


def _run_args(e, t, *extra, out=True):
    args = ["run", "ioi", "--model", str(e.model_dir), "--sae", str(e.sae_dir), "--features", "1,2", "--quiet"]
    if out:
        args += ["--out", str(t / "out")]
    return [*args, *extra]


CLI_ROWS: list[tuple[str, str, str, Callable[[Env, Path], list[str]], bool]] = [
    # (id, input, message regex, argv, early: the model is never loaded)
    ("cli-no-command", "saerecover (no command)", r"the following arguments are required: command", lambda e, t: [], True),
    ("cli-unknown-command", "saerecover frobnicate", r"invalid choice: 'frobnicate'", lambda e, t: ["frobnicate"], True),
    ("cli-unknown-task", "run sentiment", r"invalid choice: 'sentiment' \(choose from 'ioi'", lambda e, t: ["run", "sentiment", "--out", str(t)], True),
    ("cli-no-out", "run ioi without --out", r"--out DIR is required", lambda e, t: _run_args(e, t, out=False), True),
    ("cli-steps-neg", "run ioi --steps -1", r"steps must be >= 0, got -1", lambda e, t: _run_args(e, t, "--steps", "-1"), True),
    ("cli-steps-text", "run ioi --steps ten", r"run ioi: argument --steps: invalid int value: 'ten'", lambda e, t: _run_args(e, t, "--steps", "ten"), True),
    ("cli-lr-zero", "run ioi --lr 0", r"lr must be a finite number > 0, got 0", lambda e, t: _run_args(e, t, "--lr", "0"), True),
    ("cli-lr-nan", "run ioi --lr nan", r"option lr must be a finite number, got nan", lambda e, t: _run_args(e, t, "--lr", "nan"), True),
    ("cli-budget-zero", "run ioi --budget 0", r"budget must be > 0", lambda e, t: _run_args(e, t, "--budget", "0"), True),
    ("cli-budget-neg", "run ioi --budget -3", r"budget must be > 0", lambda e, t: _run_args(e, t, "--budget", "-3"), True),
    ("cli-n-zero", "run ioi --n 0", r"option n must be >= 1, got 0", lambda e, t: _run_args(e, t, "--n", "0"), True),
    ("cli-topk-zero", "run ioi --top-k 0", r"option top_k must be >= 1, got 0", lambda e, t: _run_args(e, t, "--top-k", "0"), True),
    ("cli-batch-zero", "run ioi --batch-size 0", r"option batch_size must be >= 1", lambda e, t: _run_args(e, t, "--batch-size", "0"), True),
    ("cli-modes", "run ioi --modes none,bogus", r"option modes: 'none,bogus' is not a comma-separated list of distinct modes from none, encoder",
     lambda e, t: _run_args(e, t, "--modes", "none,bogus"), True),
    ("cli-modes-empty", "run ioi --modes ''", r"option modes", lambda e, t: _run_args(e, t, "--modes", ""), True),
    ("cli-modes-dup", "run ioi --modes none,none", r"distinct modes", lambda e, t: _run_args(e, t, "--modes", "none,none"), True),
    ("cli-patterns", "run ioi --patterns XYZ", r"option patterns: 'XYZ'; valid: BABA, ABBA", lambda e, t: _run_args(e, t, "--patterns", "XYZ"), True),
    ("cli-features-text", "run ioi --features a,b", r"--features must be comma-separated integers, got 'a,b'", lambda e, t: _run_args(e, t, "--features", "a,b"), True),
    ("cli-features-empty", "run ioi --features ,", r"option features is empty", lambda e, t: _run_args(e, t, "--features", ","), True),
    ("cli-shard-range", "run ioi --shard 3/2", r"--shard 3/2: need 0 <= i < n", lambda e, t: _run_args(e, t, "--shard", "3/2"), True),
    ("cli-shard-text", "run ioi --shard half", r"--shard must look like i/n", lambda e, t: _run_args(e, t, "--shard", "half"), True),
    ("cli-dtype", "run ioi --dtype int8", r"argument --dtype: invalid choice: 'int8'", lambda e, t: _run_args(e, t, "--dtype", "int8"), True),
    ("cli-hook-form", "run ioi --hook blocks.0.mlp", r"option hook: unknown hook name 'blocks.0.mlp'", lambda e, t: _run_args(e, t, "--hook", "blocks.0.mlp"), True),
    ("cli-device", "run ioi --device gpu", r"unknown device 'gpu'", lambda e, t: _run_args(e, t, "--device", "gpu"), True),
    ("cli-config-missing", "run ioi --config missing.yaml", r"config file .*missing.yaml does not exist",
     lambda e, t: _run_args(e, t, "--config", str(t / "missing.yaml")), True),
    ("cli-config-suffix", "a config file named cfg.txt", r"must end in .yaml, .yml, .toml or .json",
     lambda e, t: _run_args(e, t, "--config", _yaml(t, "steps: 1\n", "cfg.txt")), True),
    ("cli-yaml-unknown", "YAML with a misspelled key 'stpes'", r"unknown config key\(s\): stpes \(did you mean steps\?\); valid keys:",
     lambda e, t: _run_args(e, t, "--config", _yaml(t, "stpes: 10\n")), True),
    ("cli-toml-unknown", "TOML with a misspelled key 'learning_rate'", r"unknown config key\(s\): learning_rate",
     lambda e, t: _run_args(e, t, "--config", _yaml(t, "learning_rate = 0.1\n", "cfg.toml")), True),
    ("cli-toml-dash", "TOML with 'top-k' spelled 'topk'", r"topk \(did you mean top_k\?\)",
     lambda e, t: _run_args(e, t, "--config", _yaml(t, "topk = 3\n", "cfg.toml")), True),
    ("cli-yaml-syntax", "YAML that does not parse", r"config file .*cfg.yaml is not valid YAML",
     lambda e, t: _run_args(e, t, "--config", _yaml(t, "steps: [1, 2\nlr: :\n")), True),
    ("cli-toml-syntax", "TOML that does not parse", r"is not valid TOML", lambda e, t: _run_args(e, t, "--config", _yaml(t, "steps = = 3\n", "cfg.toml")), True),
    ("cli-json-syntax", "JSON that does not parse", r"is not valid JSON", lambda e, t: _run_args(e, t, "--config", _yaml(t, "{steps: 1}", "cfg.json")), True),
    ("cli-yaml-list", "YAML holding a list", r"must hold a mapping of option names to values",
     lambda e, t: _run_args(e, t, "--config", _yaml(t, "- steps\n- lr\n")), True),
    ("cli-yaml-type", "YAML 'steps: ten'", r"option steps must be an integer, got 'ten'", lambda e, t: _run_args(e, t, "--config", _yaml(t, "steps: ten\n")), True),
    ("cli-yaml-empty-value", "YAML 'steps:' with no value", r"option steps has no value", lambda e, t: _run_args(e, t, "--config", _yaml(t, "steps:\n")), True),
    ("cli-yaml-choice", "YAML 'optimizer: adamw'", r"option optimizer: unknown value 'adamw'; valid: adam, sgd",
     lambda e, t: _run_args(e, t, "--config", _yaml(t, "optimizer: adamw\n")), True),
    ("cli-yaml-bool", "YAML 'reclamp: 3'", r"option reclamp must be true or false, got 3", lambda e, t: _run_args(e, t, "--config", _yaml(t, "reclamp: 3\n")), True),
    ("cli-toml-budget", "TOML 'budget = -1'", r"budget must be > 0", lambda e, t: _run_args(e, t, "--config", _yaml(t, "budget = -1.0\n", "cfg.toml")), True),
    ("cli-toml-nested", "TOML with a table for 'lr'", r"option lr must be a finite number", lambda e, t: _run_args(e, t, "--config", _yaml(t, "[lr]\nvalue = 1\n", "cfg.toml")), True),
    ("cli-model-missing", "run ioi --model /nonexistent/model", r"model directory /nonexistent/model does not exist",
     lambda e, t: [*_run_args(e, t), "--model", "/nonexistent/model"], True),
    ("cli-model-no-config", "run ioi --model DIR-without-config.json", r"is not a model directory: it has no config.json",
     lambda e, t: [*_run_args(e, t), "--model", str(e.no_cfg_dir)], True),
    ("cli-sae-missing", "run ioi --sae /nonexistent/sae", r"SAE /nonexistent/sae does not exist", lambda e, t: [*_run_args(e, t), "--sae", "/nonexistent/sae"], True),
    ("cli-sae-no-cfg", "run ioi --sae DIR-without-cfg.json", r"has no cfg.json", lambda e, t: [*_run_args(e, t), "--sae", str(e.no_cfg_dir)], True),
    ("cli-out-file", "run ioi --out FILE", r"--out .* is a file", lambda e, t: [*_run_args(e, t), "--out", str(e.a_file)], True),
    ("cli-out-nonrun", "run ioi --out a non-empty non-run directory", r"is a non-empty directory that is not a saerecover run directory",
     lambda e, t: [*_run_args(e, t), "--out", str(_nonrun_dir(t))], True),
    ("cli-hook-layer", "run ioi --hook blocks.9.hook_resid_post", r"unknown hook name 'blocks.9.hook_resid_post' for this model",
     lambda e, t: _run_args(e, t, "--hook", "blocks.9.hook_resid_post"), False),
    ("cli-sae-width", "run ioi --sae SAE-with-d_in-16", r"SAE width does not match the model", lambda e, t: [*_run_args(e, t), "--sae", str(e.narrow_sae_dir)], False),
    ("cli-features-range", "run ioi --features 1,999", r"feature index 999 is out of range .* valid indices 0..63",
     lambda e, t: _run_args(e, t, "--features", "1,999"), False),
    ("cli-features-dup", "run ioi --features 4,4", r"duplicate feature indices", lambda e, t: _run_args(e, t, "--features", "4,4"), False),
    ("cli-out-other-task", "run ioi --out RUN-of-another-task", r"holds a run of task 'margin', not 'ioi'",
     lambda e, t: [*_run_args(e, t), "--out", str(e.run_dir)], True),
    ("cli-report-missing", "report /nonexistent/run", r"/nonexistent/run is not a directory", lambda e, t: ["report", "/nonexistent/run"], True),
    ("cli-report-not-run", "report DIR-not-a-run", r"not a saerecover run directory", lambda e, t: ["report", str(e.no_cfg_dir)], True),
    ("cli-report-version", "report RUN-of-schema-99", r"uses run-directory schema 99", lambda e, t: ["report", str(_foreign_run(e, t, run_schema=99))], True),
    ("cli-report-unfinished", "report RUN-without-summary", r"summary.json does not exist yet",
     lambda e, t: ["report", str((lambda d: ((d / "summary.json").unlink(), d)[1])(_foreign_run(e, t)))], True),
    ("cli-analyze-missing", "analyze /nonexistent/run", r"is not a directory", lambda e, t: ["analyze", "/nonexistent/run"], True),
    ("cli-analyze-atol", "analyze RUN --atol -1", r"tolerances must be >= 0", lambda e, t: ["analyze", str(e.run_dir), "--atol", "-1", "--no-save"], True),
    ("cli-analyze-atol-text", "analyze RUN --atol tiny", r"analyze: argument --atol: invalid float value: 'tiny'",
     lambda e, t: ["analyze", str(e.run_dir), "--atol", "tiny"], True),
    ("cli-analyze-sae", "analyze RUN --sae /nonexistent/sae", r"does not exist here", lambda e, t: ["analyze", str(e.run_dir), "--sae", "/nonexistent/sae"], True),
    ("cli-merge-twice", "merge OUT SHARD SHARD", r"the same run directory is given twice", lambda e, t: ["merge", str(t / "m"), str(e.shard_dirs[0]), str(e.shard_dirs[0])], True),
    ("cli-merge-not-run", "merge OUT DIR-not-a-run", r"not a saerecover run directory", lambda e, t: ["merge", str(t / "m"), str(e.no_cfg_dir)], True),
    ("cli-merge-no-inputs", "merge OUT (no shards)", r"merge: the following arguments are required: RUN_DIR", lambda e, t: ["merge", str(t / "m")], True),
    ("cli-bench-dtype", "bench --dtype float16", r"bench: argument --dtype: invalid choice: 'float16'", lambda e, t: ["bench", "--dtype", "float16"], True),
    ("cli-bench-shape", "bench --d abc", r"bench: argument --d: expected comma-separated integers, got 'abc'", lambda e, t: ["bench", "--d", "abc"], True),
    ("cli-bench-only", "bench --only svd", r"argument --only: invalid choice: 'svd'", lambda e, t: ["bench", "--only", "svd"], True),
    ("cli-bench-unknown", "bench --fast", r"unrecognized arguments: --fast", lambda e, t: ["bench", "--fast"], True),
    ("cli-demo-out", "demo --out FILE", r"--out .* is a file", lambda e, t: ["demo", "--out", str(e.a_file)], True),
    ("cli-demo-nonrun", "demo --out a non-empty non-run directory", r"not a saerecover run directory", lambda e, t: ["demo", "--out", str(_nonrun_dir(t))], True),
]
_CLI_WHERE = {"task": "saerecover run", "report": "saerecover report", "analyze": "saerecover analyze", "merge": "saerecover merge",
              "bench": "saerecover bench", "demo": "saerecover demo", "no": "saerecover", "unknown": "saerecover"}
for _id, _inp, _match, _argv, _early in CLI_ROWS:
    CASES.append(Case(_id, _CLI_WHERE.get(_id.split("-")[-1] if _id == "cli-unknown-task" else _id.split("-")[1],
                                          "saerecover run ioi"), None, _match, _argv, _early, _inp))


# ------------------------------------------------------------------------------------- the tests


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return build_env(tmp_path_factory.mktemp("bad_inputs"))


@pytest.fixture
def counted(env, monkeypatch):
    """Count forward passes of the tiny model and model loads."""
    calls = {"forward": 0, "load": 0}
    real_forward = type(env.model).forward

    def forward(*args, **kwargs):
        calls["forward"] += 1
        return real_forward(env.model, *args, **kwargs)

    monkeypatch.setattr(env.model, "forward", forward)
    import saerecover.models as models

    real_load = models.load_model

    def load(*args, **kwargs):
        calls["load"] += 1
        return real_load(*args, **kwargs)

    monkeypatch.setattr(models, "load_model", load)
    return calls


PY_CASES = [c for c in CASES if c.exc is not None]
CLI_CASES = [c for c in CASES if c.exc is None]


def test_case_ids_are_unique():
    ids = [c.id for c in CASES]
    assert len(ids) == len(set(ids)), sorted({i for i in ids if ids.count(i) > 1})


@pytest.mark.parametrize("c", PY_CASES, ids=[c.id for c in PY_CASES])
def test_python_bad_input(c, env, counted, tmp_path):
    with pytest.raises(c.exc) as info:
        c.call(env, tmp_path)
    msg = str(info.value)
    assert re.search(c.match, msg), f"{c.id}: message {msg!r} does not match {c.match!r}"
    assert "Traceback" not in msg
    if c.early:
        assert counted["forward"] == 0, f"{c.id}: a forward pass ran before the error"


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    from saerecover.cli import main

    try:
        code = main(argv)
    except SystemExit as exit_:
        code = exit_.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize("c", CLI_CASES, ids=[c.id for c in CLI_CASES])
def test_cli_bad_input(c, env, counted, tmp_path, capsys):
    code, out, err = run_cli(c.call(env, tmp_path), capsys)
    lines = err.strip().splitlines()
    assert code == 2, f"{c.id}: exit status {code}; stderr {err!r}"
    assert len(lines) == 1 and lines[0].startswith("saerecover: error: "), f"{c.id}: stderr {err!r}"
    assert re.search(c.match, lines[0]), f"{c.id}: {lines[0]!r} does not match {c.match!r}"
    if c.early:
        assert counted["load"] == 0 and counted["forward"] == 0, f"{c.id}: work started before the error"


def test_cli_entry_point_prints_no_traceback(env, tmp_path):
    """The real console entry point (a fresh interpreter): one line, status 2, no traceback."""
    src = Path(__file__).resolve().parents[1] / "python"
    envvars = {**os.environ, "PYTHONPATH": os.pathsep.join([str(src), os.environ.get("PYTHONPATH", "")])}
    cfg = tmp_path / "cfg.toml"
    cfg.write_text("stpes = 3\n")
    for argv in (["run", "ioi", "--config", str(cfg), "--out", str(tmp_path / "o")],
                 ["run", "ioi", "--model", "/nonexistent/m", "--out", str(tmp_path / "o")]):
        proc = subprocess.run([sys.executable, "-m", "saerecover.cli", *argv], capture_output=True, text=True,
                              env=envvars, timeout=120)
        assert proc.returncode == 2, proc.stderr
        assert "Traceback" not in proc.stderr
        assert proc.stderr.strip().count("\n") == 0 and proc.stderr.startswith("saerecover: error: ")


def test_doc_table_lists_every_case():
    """docs/bad_inputs.md is this matrix: same cases, and the count it states."""
    text = DOC.read_text(encoding="utf-8")
    missing = [c.id for c in CASES if f"`{c.id}`" not in text]
    assert not missing, f"docs/bad_inputs.md lacks {missing}; regenerate: python tests/test_bad_inputs.py --table"
    assert f"{len(CASES)} bad inputs" in text


# --------------------------------------------------------------------------- the table (docs)


def _error_name(c: Case) -> str:
    if c.exc is None:
        return "exit 2"
    excs = c.exc if isinstance(c.exc, tuple) else (c.exc,)
    return " / ".join(e.__name__ for e in excs)


def render_table(root: Path) -> str:
    """Run every case and write the markdown table with the actual message excerpts."""
    import contextlib
    import io

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    e = build_env(root / "env")
    rows = []
    for k, c in enumerate(CASES):
        t = root / f"case{k}"
        t.mkdir()
        if c.exc is None:
            from saerecover.cli import main

            err = io.StringIO()
            with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
                try:
                    main(c.call(e, t))
                except SystemExit:
                    pass
            lines = [ln for ln in err.getvalue().splitlines() if ln.startswith("saerecover: error: ")]
            msg = lines[-1].removeprefix("saerecover: error: ") if lines else "(no error line!)"
        else:
            try:
                c.call(e, t)
                msg = "(no error!)"
            except BaseException as ex:  # noqa: BLE001 - we print what happened
                msg = str(ex).splitlines()[0]
        msg = msg.replace(str(root), "…").replace("|", "\\|")
        if len(msg) > 110:
            msg = msg[:107] + "..."
        rows.append(f"| `{c.id}` | {c.input} | {c.where} | {_error_name(c)} | {msg} |")
    n_py = sum(c.exc is not None for c in CASES)
    head = [
        "# Bad inputs: the matrix",
        "",
        "Every public entry point and CLI command of saerecover, fed the mistakes users make. Each must",
        "fail with an error that names the problem and what would be valid, before any long work (a model",
        "load, a forward pass) starts; the CLI exits with status 2 and one `saerecover: error: ...` line.",
        "The matrix is tests/test_bad_inputs.py (this table: `python tests/test_bad_inputs.py --table`).",
        "",
        f"{len(CASES)} bad inputs: {n_py} through the Python API, {len(CASES) - n_py} through the CLI. "
        "Every one gives its error.",
        "",
        "| id | input | where | error | message (excerpt) |",
        "|---|---|---|---|---|",
    ]
    return "\n".join(head + rows) + "\n"


if __name__ == "__main__":  # python tests/test_bad_inputs.py --table > docs/bad_inputs.md
    import tempfile

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))
    if "--table" in sys.argv:
        with tempfile.TemporaryDirectory() as d:
            table = render_table(Path(d))
        sys.stdout.write(table)
