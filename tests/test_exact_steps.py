"""Exact values of the recovery loop's steps: the C4 budget step (rescaling in none / encoder mode,
the Jacobian-mode step that stays in J's null space), the encoder-null and Jacobian projections
of a step, the randomized sketch basis (orthonormal, spanning each probe's VJP), the packed
Jacobians, the best-checkpoint rule, and the torch route of linalg used for CUDA tensors, on a
rank-deficient J with a known null space. Hand-sized inputs; a linear stand-in model where the
engine runs end to end."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from exact_stubs import LinearModel, TokenMargin, examples, hand_site
from saerecover import linalg
from saerecover.core import recovery
from saerecover.core.checkpoints import Checkpoints
from saerecover.core.clamp import Clamp
from saerecover.core.defended import DefendedModel, SiteState
from saerecover.core.metrics import EPS
from saerecover.core.projection import (
    EncoderNull,
    batched_vjp_jacobian,
    defended_feature_parts,
    defended_features,
    example_jacobians,
    flatten_example,
    packed_jacobians,
    project_out_basis,
    sketch_basis,
    unflatten_example,
)
from saerecover.core.projection import jacobian as jacobian_mode
from saerecover.core.recovery import RecoveryConfig, recover_batch

HOOK = "blocks.0.hook_resid_post"


@pytest.fixture(params=["encoder blocks", "vjp blocks", "per example"])
def jacobian_route(request, monkeypatch):
    """Each way the Jacobian mode builds J (saerecover.core.projection.jacobian): blocks from the
    encoder's constant derivative, blocks from one VJP per feature, or one dense J per example
    (taken when Phi also covers a later site); the exact values are the same."""
    if request.param == "vjp blocks":
        monkeypatch.setattr(jacobian_mode.ExactJacobian, "_constant_derivative", lambda self, state: False)
    elif request.param == "per example":
        monkeypatch.setattr(jacobian_mode.ExactJacobian, "block_diagonal", property(lambda self: False))
    return request.param


# --- C4 in Jacobian mode: shortening a step, or pulling delta back along its null-space part ----


def test_shrink_to_budget_hand_cases():
    f = jacobian_mode.shrink_to_budget
    t = torch.tensor
    # ||old + a step|| = budget: old = e0, step = e0, budget 1.5 -> |1 + a| = 1.5 -> a = 0.5
    assert f(t([1.0, 0.0]), t([1.0, 0.0]), 1.5) == pytest.approx(0.5)
    # perpendicular: old = 0.6 e0, step = e1, budget 1 -> 0.36 + a^2 = 1 -> a = 0.8
    assert f(t([0.6, 0.0]), t([0.0, 1.0]), 1.0) == pytest.approx(0.8)
    # inside the budget: the whole step; a zero step: 1
    assert f(t([0.6, 0.0]), t([0.0, 0.8]), 1.0) == 1.0
    assert f(t([5.0, 0.0]), t([0.0, 0.0]), 1.0) == 1.0
    # old already outside and the step points further out: nothing of it (a = 0)
    assert f(t([2.0, 0.0]), t([1.0, 0.0]), 1.0) == 0.0
    # old outside, the step points back in but not far enough: all of it (capped at 1)
    assert f(t([2.0, 0.0]), t([-0.5, 0.0]), 1.0) == 1.0

def test_budget_step_hand_cases():
    f = jacobian_mode.budget_step
    t = lambda *v: torch.tensor(v, dtype=torch.float64)
    # inside the budget: the step itself
    assert f(t(0.0, 0.0), t(0.3, 0.4), t(0.0, 0.0), 1.0).tolist() == [0.3, 0.4]
    # old = e0 on the budget sphere, its null-space part e0, step = 0.5 e1:
    # w = [1, 0.5], excess = 1.25 - 1 = 0.25, a = 1, b = w . e0 = 1, disc = 1 - 0.25 = 0.75
    # gamma = (b - sqrt(disc)) / a = 1 - sqrt(0.75): step - gamma e0 = [sqrt(0.75) - 1, 0.5]
    # and old + that = [sqrt(0.75), 0.5], exactly on the sphere
    st = f(t(1.0, 0.0), t(0.0, 0.5), t(1.0, 0.0), 1.0)
    assert st.tolist() == pytest.approx([math.sqrt(0.75) - 1.0, 0.5], abs=1e-15)
    assert float((t(1.0, 0.0) + st).norm()) == pytest.approx(1.0, abs=1e-15)
    # no null-space part to pull back along (a = 0): the step is shortened instead,
    # old = 0.6 e0, step = e1 -> 0.8 e1
    assert f(t(0.6, 0.0), t(0.0, 1.0), t(0.0, 0.0), 1.0).tolist() == pytest.approx([0.0, 0.8], abs=1e-15)
    # the pull-back cannot reach the sphere (disc < 0): old = [0.6, 0.8], null part [0.6, 0],
    # step 0.5 e1: w = [0.6, 1.3], excess 1.05, a = b = 0.36, disc = 0.1296 - 0.378 < 0
    # -> shortened: ||old + a step|| = 1 has a = 0 (old is on the sphere and the step points out)
    assert f(t(0.6, 0.8), t(0.0, 0.5), t(0.6, 0.0), 1.0).tolist() == [0.0, 0.0]
    # b <= 0 (w points away from old's null part): shortened too; old = 0, step 2 e0, budget 1 -> e0
    assert f(t(0.0, 0.0), t(2.0, 0.0), t(0.0, 0.0), 1.0).tolist() == [1.0, 0.0]


# --- the loop end to end on a linear model ----------------------------------------------------------
#
# d_model 3, one layer, mix = I; token 0 embeds to e0, token 1 to e1, token 2 to e2.
# The site reads h with W_enc = W_dec = I (E(h) = relu(h)); the clamp sets feature 0 to 0 (or 1).
# unembed column 0 = [3, 4, 0], column 1 = 0, so the behavior score at the answer row is
# 3 h_0 + 4 h_1 and the loss is minus that: its gradient w.r.t. delta at the answer row is the
# constant -u with u = [3, 4, 0], ||u|| = 5. One SGD step of lr 0.1 from delta = 0 gives
# delta = 0.1 u = [0.3, 0.4, 0] (norm 0.5).

U = torch.tensor([[3.0, 0.0], [4.0, 0.0], [0.0, 0.0]])


def linear_setup(value: float = 0.0):
    model = LinearModel(torch.eye(3), U)
    site = hand_site(torch.eye(3).tolist(), hook=HOOK)
    return DefendedModel(model, Clamp({site: [0]}, value=value)), TokenMargin(0, 1)


def run(mode, *, budget=2.0, steps=1, n=1, **kw):
    dm, task = linear_setup(kw.pop("value", 0.0))
    ex = examples([[0, 0]] * n)
    cfg = RecoveryConfig(steps=steps, lr=0.1, budget=budget, optimizer="sgd", **kw)
    return recover_batch(dm, task, ex, mode=mode, cfg=cfg)


def test_c4_rescale_never_enlarges_delta():
    # none mode: 0.5 < budget 2 -> delta stays [0.3, 0.4, 0] (rescaling it up to the budget would
    # give [1.2, 1.6, 0])
    (out,) = run("none", budget=2.0)
    torch.testing.assert_close(out.tensors["delta"], torch.tensor([[0.3, 0.4, 0.0]]))
    assert out.metrics["delta_norm"] == pytest.approx(0.5, rel=1e-6)
    # h_def = 0 at the answer row (feature 0 clamped to 0 from 1); h_rec = delta:
    # score 3 * 0.3 + 4 * 0.4 = 2.5; feature 0 goes 0 -> 0.3 (reactivated, drift 0.3);
    # c1 = |A^T d| / (||A|| ||d||) = 0.3 / 0.5 = 0.6
    assert out.recovered and out.recovered_score == pytest.approx(2.5, rel=1e-6)
    assert out.metrics["activation_drift"] == pytest.approx(0.3, rel=1e-6)
    assert out.metrics["reactivated_fraction"] == 1.0 and out.metrics["zero_reactivation"] is False
    assert out.metrics["c1_residual"] == pytest.approx(0.6, rel=1e-6)
    assert math.isnan(out.metrics["relative_drift"])  # ||z_def|| = 0
    assert out.steps == 1


def test_c4_rescale_shrinks_delta_onto_the_budget():
    # 0.5 > budget 0.25 -> delta scaled by 0.5: [0.15, 0.2, 0]
    (out,) = run("none", budget=0.25)
    torch.testing.assert_close(out.tensors["delta"], torch.tensor([[0.15, 0.2, 0.0]]))
    # two steps of the same gradient: [0.6, 0.8, 0] (norm 1) > 0.75 -> [0.45, 0.6, 0]
    (out,) = run("none", budget=0.75, steps=2)
    torch.testing.assert_close(out.tensors["delta"], torch.tensor([[0.45, 0.6, 0.0]]))
    assert out.steps == 2


def test_per_example_budgets_are_applied_per_example():
    dm, task = linear_setup()
    ex = examples([[0, 0], [0, 0]])
    cfg = RecoveryConfig(steps=1, lr=0.1, budget=99.0, optimizer="sgd")
    outs = recover_batch(dm, task, ex, mode="none", cfg=cfg, budget=torch.tensor([2.0, 0.25]))
    torch.testing.assert_close(outs[0].tensors["delta"], torch.tensor([[0.3, 0.4, 0.0]]))
    torch.testing.assert_close(outs[1].tensors["delta"], torch.tensor([[0.15, 0.2, 0.0]]))


def test_encoder_mode_step_is_the_projected_gradient_then_the_budget():
    # A = e0: the gradient -u = [-3, -4, 0] projected is [0, -4, 0]; one step: [0, 0.4, 0]
    (out,) = run("encoder", budget=2.0)
    torch.testing.assert_close(out.tensors["delta"], torch.tensor([[0.0, 0.4, 0.0]]))
    assert out.metrics["c1_residual"] == 0.0 and out.metrics["activation_drift"] == 0.0
    assert out.metrics["zero_reactivation"] is True and out.recovered_score == pytest.approx(1.6, rel=1e-6)
    # budget 0.2 -> [0, 0.2, 0]
    (out,) = run("encoder", budget=0.2)
    torch.testing.assert_close(out.tensors["delta"], torch.tensor([[0.0, 0.2, 0.0]]))


@pytest.mark.usefixtures("jacobian_route")
def test_jacobian_mode_step_and_budget():
    # clamp feature 0 to 1: z_0 = 1 at the answer row, the only Phi row (positions "answer"), so
    # J = e0^T there; the step is the projected gradient [0, 0.4, 0] as in encoder mode, and with
    # budget 0.2 it is shortened to [0, 0.2, 0] (old = 0: nothing to pull back along)
    (out,) = run("jacobian", budget=2.0, value=1.0)
    torch.testing.assert_close(out.tensors["delta"], torch.tensor([[0.0, 0.4, 0.0]]))
    assert out.metrics["jacobian_step_residual"] == 0.0
    assert out.metrics["phi_relative_drift"] == 0.0 and out.metrics["phi_floor_violation"] == 0.0
    (out,) = run("jacobian", budget=0.2, value=1.0)
    torch.testing.assert_close(out.tensors["delta"], torch.tensor([[0.0, 0.2, 0.0]]))
    assert [h["first_order_drift"] for h in out.history] == [0.0]


def test_early_stopped_examples_keep_their_delta():
    # stop_margin 3. Example 1 starts at token 1 (h = e1, score 4 > 3): inactive from step 0, delta 0,
    # 0 steps. Example 0 (h_def = 0, score 0) steps to 0.1 u (score 2.5 <= 3), then 0.2 u = [0.6, 0.8, 0]
    # (score 5 > 3): with 2 steps allowed it takes both; with 5 it stops after those 2.
    dm, task = linear_setup()
    ex = examples([[0, 0], [0, 1]])
    cfg = RecoveryConfig(steps=2, lr=0.1, budget=5.0, optimizer="sgd", early_stop=True, stop_margin=3.0)
    outs = recover_batch(dm, task, ex, mode="none", cfg=cfg)
    torch.testing.assert_close(outs[0].tensors["delta"], torch.tensor([[0.6, 0.8, 0.0]]))
    assert outs[1].tensors["delta"].tolist() == [[0.0, 0.0, 0.0]] and outs[1].steps == 0
    assert outs[0].steps == 2 and outs[1].history == []
    # the history: the score before each step, the delta norm after it
    assert [h["step"] for h in outs[0].history] == [0, 1]
    assert [h["score"] for h in outs[0].history] == pytest.approx([0.0, 2.5])
    assert [h["loss"] for h in outs[0].history] == pytest.approx([0.0, -2.5])
    assert [h["delta_norm"] for h in outs[0].history] == pytest.approx([0.5, 1.0])
    outs = recover_batch(dm, task, ex, mode="none", cfg=RecoveryConfig(**{**cfg.to_dict(), "steps": 5}))
    assert [o.steps for o in outs] == [2, 0]
    torch.testing.assert_close(outs[0].tensors["delta"], torch.tensor([[0.6, 0.8, 0.0]]))


def test_penalties_enter_the_loss():
    # At delta = 0 every penalty is 0 with zero gradient (relu'(0) = 0 in torch), so the first step
    # is the plain one: [0.3, 0.4, 0], loss 0.
    (out,) = run("none", lambda_act=1.0, lambda_decode=1.0)
    assert out.history[0]["loss"] == pytest.approx(0.0)
    torch.testing.assert_close(out.tensors["delta"], torch.tensor([[0.3, 0.4, 0.0]]))
    # lambda_decode = 1 over two steps: at step 1, delta_0 = 0.3 lifts feature 0 from 0 to 0.3, decode
    # drift ||0.3 W_dec[0]|| = 0.3 with gradient e0 w.r.t. delta: loss -2.5 + 0.3, gradient -u + e0 =
    # [-2, -4, 0] -> delta = [0.3, 0.4, 0] + 0.1 [2, 4, 0] = [0.5, 0.8, 0]
    (out,) = run("none", steps=2, lambda_decode=1.0)
    torch.testing.assert_close(out.tensors["delta"], torch.tensor([[0.5, 0.8, 0.0]]))
    assert out.history[1]["loss"] == pytest.approx(-2.5 + 0.3, rel=1e-6)
    # lambda_act = 1: relative Phi drift ||0.3|| / (||Phi_def|| + 1e-8) with Phi_def = 0 -> 0.3 / 1e-8
    (out,) = run("none", steps=2, lambda_act=1.0)
    assert out.history[1]["loss"] == pytest.approx(-2.5 + 0.3 / 1e-8, rel=1e-6)
    assert out.history[1]["phi_relative_drift"] == pytest.approx(0.3 / 1e-8, rel=1e-6)


def test_lambda_delta_penalty_from_delta_zero():
    # lambda_delta = 1: at delta = 0 the penalty ||delta|| is 0 with (sub)gradient 0, so step 0 is the
    # plain one, 0.1 u; at step 1 ||delta|| = 0.5 with gradient u / 5: the step is 0.1 (u - u / 5)
    # -> delta = 0.1 u + 0.08 u = 0.18 u = [0.54, 0.72, 0], loss at step 1 = -2.5 + 0.5
    (out,) = run("none", steps=2, lambda_delta=1.0)
    assert out.history[1]["loss"] == pytest.approx(-2.5 + 0.5, rel=1e-6)
    torch.testing.assert_close(out.tensors["delta"], torch.tensor([[0.54, 0.72, 0.0]]))


# --- projections of a step ------------------------------------------------------------------------


def test_encoder_null_projects_masked_rows_and_zeroes_the_others():
    site = hand_site(torch.eye(3).tolist(), hook=HOOK)
    enc = EncoderNull(Clamp({site: [0]}), [HOOK], rcond=None)
    x = torch.tensor([[[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]])
    mask = torch.tensor([[True, False]])
    assert enc({HOOK: x}, mask)[HOOK].tolist() == [[[0.0, 2.0, 3.0], [0.0, 0.0, 0.0]]]
    # a site without a clamp is only masked
    assert enc({"other": x}, mask)["other"].tolist() == [[[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]]]


def test_flatten_and_unflatten_an_example():
    # example 1's masked rows (row 1 of site a, then row 1 of site b), site order kept
    a = torch.arange(12.0).reshape(2, 2, 3)
    b = 100 + torch.arange(12.0).reshape(2, 2, 3)
    mask = torch.tensor([[True, True], [False, True]])
    vec = flatten_example({"a": a, "b": b}, 1, mask)
    assert vec.tolist() == [9.0, 10.0, 11.0, 109.0, 110.0, 111.0]
    out = {"a": torch.zeros(2, 2, 3), "b": torch.zeros(2, 2, 3)}
    unflatten_example(-vec, {"a": a, "b": b}, 1, mask, out)
    assert out["a"][1].tolist() == [[0.0, 0.0, 0.0], [-9.0, -10.0, -11.0]]
    assert out["b"][1].tolist() == [[0.0, 0.0, 0.0], [-109.0, -110.0, -111.0]]
    assert out["a"][0].abs().sum() == 0


def test_project_out_basis():
    basis = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.6, 0.8]], dtype=torch.float64)
    # [1, 1, 1] - 1 e0 - (0.6 + 0.8) [0, 0.6, 0.8] = [0, 1 - 0.84, 1 - 1.12] = [0, 0.16, -0.12]
    out = project_out_basis(torch.tensor([1.0, 1.0, 1.0]), basis)
    assert out.dtype == torch.float32
    assert out.tolist() == pytest.approx([0.0, 0.16, -0.12], abs=1e-7)
    v = torch.tensor([1.0, 2.0])
    assert project_out_basis(v, torch.zeros(0, 2, dtype=torch.float64)) is v


# --- the sketch basis -------------------------------------------------------------------------------
#
# Phi_b = M_b delta_b (one row, d = 3): VJP of a probe r is M_b^T r.
# M_0 = [[1, 0, 0], [1, 1, 0]] (rank 2, row space span(e0, e1)); M_1 = [[0, 0, 2], [0, 0, 1]] (rank 1).

M = torch.tensor([[[1.0, 0.0, 0.0], [1.0, 1.0, 0.0]], [[0.0, 0.0, 2.0], [0.0, 0.0, 1.0]]])


def sketch_setup():
    delta = torch.zeros(2, 1, 3, requires_grad=True)
    phi = torch.einsum("bmd,bd->bm", M, delta[:, 0])
    # drift = Phi - Phi_ref = [3, 4] for example 0 (unit [0.6, 0.8]), [0, 0] for example 1
    phi_ref = phi.detach() - torch.tensor([[3.0, 4.0], [0.0, 0.0]])
    return delta, phi, phi_ref, torch.ones(2, 1, dtype=torch.bool)


def test_sketch_basis_drift_probe_alone():
    # example 0: M_0^T [0.6, 0.8] = [1.4, 0.8, 0] -> normalised by sqrt(1.96 + 0.64) = sqrt(2.6)
    # example 1: zero drift -> a zero probe -> a zero VJP -> dropped: an empty basis (0, 3) float64
    delta, phi, phi_ref, mask = sketch_setup()
    none = torch.zeros(0, 2, 2)
    b0, b1 = sketch_basis(phi, phi_ref, {"s": delta}, mask, probes=none, drift_probe=True)
    assert b0.dtype == torch.float64
    torch.testing.assert_close(b0, torch.tensor([[1.4, 0.8, 0.0]], dtype=torch.float64) / math.sqrt(2.6))
    assert b1.shape == (0, 3) and b1.dtype == torch.float64
    # no probes at all: empty bases
    bases = sketch_basis(phi, phi_ref, {"s": delta}, mask, probes=none, drift_probe=False)
    assert [tuple(b.shape) for b in bases] == [(0, 3), (0, 3)]


def test_sketch_basis_is_orthonormal_and_spans_every_probe_vjp():
    delta, phi, phi_ref, mask = sketch_setup()
    # three unit random vectors in Phi space, (n, m) each
    gen = torch.Generator().manual_seed(5)
    probes = []
    for _ in range(3):
        r = torch.randn((2, 2), generator=gen)
        probes.append(r / r.norm(dim=1, keepdim=True))
    bases = sketch_basis(phi, phi_ref, {"s": delta}, mask, probes=torch.stack(probes), drift_probe=True)
    drift = torch.tensor([[0.6, 0.8], [0.0, 0.0]])
    # example 0: 4 VJPs in span(e0, e1) -> 2 orthonormal rows; example 1: all along e2 -> 1 row
    assert [tuple(b.shape) for b in bases] == [(2, 3), (1, 3)]
    for b, basis in enumerate(bases):
        torch.testing.assert_close(basis @ basis.T, torch.eye(basis.shape[0], dtype=torch.float64),
                                   atol=1e-12, rtol=0)
        for r in [drift, *probes]:
            vjp = (M[b].T @ r[b]).double()
            # the VJP lies in the span of the basis, so a projected gradient is orthogonal to it
            torch.testing.assert_close(vjp - (basis @ vjp) @ basis, torch.zeros(3, dtype=torch.float64),
                                       atol=1e-12, rtol=0)
            g = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
            assert float(project_out_basis(g, basis) @ vjp) == pytest.approx(0.0, abs=1e-12)
    assert bases[1][0].abs().tolist() == pytest.approx([0.0, 0.0, 1.0])
    # the basis is in the order of the VJPs: the first row is the normalised drift VJP
    torch.testing.assert_close(bases[0][0], torch.tensor([1.4, 0.8, 0.0], dtype=torch.float64) / math.sqrt(2.6))


# --- Jacobians --------------------------------------------------------------------------------------


def test_packed_jacobians_of_a_linear_phi():
    # Phi_b = (delta_b @ A + C_b).flatten() over (row, feature), A = [[1, 0], [0, 2], [1, 1]]:
    # d Phi_b[(r, f)] / d delta_b[r] = A[:, f]. C makes some coordinates 0 at delta = 0.
    a = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
    c = torch.tensor([[[1.0, 0.0], [2.0, 3.0]], [[0.0, 0.0], [4.0, 0.0]]])
    delta = torch.zeros(2, 2, 3, requires_grad=True)
    part = (delta @ a + c).flatten(1)
    mask = torch.tensor([[True, True], [False, True]])
    e = torch.zeros(3)

    def row(r, f, rows=2):
        blocks = [a[:, f] if i == r else e for i in range(rows)]
        return torch.cat(blocks)

    # skip_zero: example 0 keeps (0,0), (1,0), (1,1); example 1 keeps (1,0) and only row 1 is optimized
    j0, j1 = packed_jacobians([part], {"s": delta}, mask, [True])
    torch.testing.assert_close(j0, torch.stack([row(0, 0), row(1, 0), row(1, 1)]))
    torch.testing.assert_close(j1, a[:, 0].reshape(1, 3))
    # no skipping: every coordinate; example 1's row-0 coordinates have zero derivative w.r.t. row 1
    j0, j1 = packed_jacobians([part], {"s": delta}, mask, [False])
    torch.testing.assert_close(j0, torch.stack([row(0, 0), row(0, 1), row(1, 0), row(1, 1)]))
    torch.testing.assert_close(j1, torch.stack([e, e, a[:, 0], a[:, 1]]))
    # a phi_mask keeps only the coordinates of its rows: example 0 row 1, example 1 both rows
    phi_mask = torch.tensor([[False, True], [True, True]])
    j0, j1 = packed_jacobians([part], {"s": delta}, mask, [False], phi_mask=phi_mask)
    torch.testing.assert_close(j0, torch.stack([row(1, 0), row(1, 1)]))
    assert j1.shape == (4, 3)
    # nothing kept: (0, width)
    j0, j1 = packed_jacobians([part * 0], {"s": delta}, mask, [True])
    assert j0.shape == (0, 6) and j1.shape == (0, 3)


def test_batched_vjp_jacobian_rows_are_the_coordinates_asked_for():
    # Phi (n=1, m=2) = [delta . [1, 2, 3], delta . [0, 0, 5]] on one row
    delta = torch.zeros(1, 1, 3, requires_grad=True)
    w = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 5.0]])
    phi = delta[:, 0] @ w.T
    jac = batched_vjp_jacobian(phi, {"s": delta}, torch.tensor([1, 0]))
    assert jac["s"].shape == (2, 1, 1, 3)
    (jb,) = example_jacobians(jac, torch.ones(1, 1, dtype=torch.bool))
    torch.testing.assert_close(jb, w[[1, 0]])
    empty = batched_vjp_jacobian(phi, {"s": delta}, torch.zeros(0, dtype=torch.long))
    assert empty["s"].shape == (0, 1, 1, 3)


@pytest.mark.parametrize("route", ["batched", "one at a time"])
def test_batched_vjp_jacobian_routes_agree_and_unused_sites_are_zero(route, monkeypatch):
    """Phi (n=2, m=2) of two examples, J rows at both coordinates; a second site "u" that Phi
    does not use. The batched route is one autograd call (is_grads_batched) on ordinary ops; the
    fallback (an op without a batching rule raises inside it) is one call per coordinate and must
    give the same rows, zeros for "u", and keep the graph for the next use."""
    delta = torch.zeros(2, 1, 3, requires_grad=True)
    unused = torch.zeros(2, 1, 4, requires_grad=True)
    w = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 5.0]])
    phi = (delta[:, 0] + torch.tensor([[0.0, 0.0, 0.0], [1.0, 1.0, 1.0]])) ** 2 @ w.T
    calls = []
    real_grad = torch.autograd.grad

    def grad(*args, **kwargs):
        calls.append(bool(kwargs.get("is_grads_batched")))
        if route == "one at a time" and kwargs.get("is_grads_batched"):
            raise RuntimeError("no batching rule for this op")
        return real_grad(*args, **kwargs)

    monkeypatch.setattr(torch.autograd, "grad", grad)
    jac = batched_vjp_jacobian(phi, {"s": delta, "u": unused}, torch.tensor([1, 0]))
    assert calls == ([True] if route == "batched" else [True, False, False])
    # d Phi_bj / d delta_b = 2 (delta_b + c_b) * w_j: example 0 (c = 0) gives 0, example 1 (c = 1) gives 2 w_j
    expected = torch.zeros(2, 2, 1, 3)
    expected[:, 1, 0] = 2 * w[[1, 0]]
    torch.testing.assert_close(jac["s"], expected)
    assert jac["u"].shape == (2, 2, 1, 4) and not jac["u"].any()
    again = batched_vjp_jacobian(phi, {"s": delta}, torch.tensor([0]))  # the graph was retained
    torch.testing.assert_close(again["s"], expected[1:])


def test_defended_features_and_decode_drift_of_hand_states():
    # site W_enc = I (3), clamp features [2, 0]; h_rec rows [1, -1, 2] and [3, 0, -4]:
    # E_S = [[2, 1], [0, 3]] (feature-minor: f2 then f0); phi_mask keeps row 1 only -> [0, 0, 0, 3]
    site = hand_site(torch.eye(3).tolist(), [[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]], hook=HOOK)
    clamp = Clamp({site: [2, 0]})
    h = torch.tensor([[[1.0, -1.0, 2.0], [3.0, 0.0, -4.0]]])
    states = {HOOK: SiteState(h_def=h, h_rec=h)}
    phi_mask = torch.tensor([[False, True]])
    assert defended_feature_parts(clamp, states, [HOOK], phi_mask)[0].tolist() == [[0.0, 0.0, 0.0, 3.0]]
    assert defended_features(clamp, states, [HOOK], phi_mask).tolist() == [[0.0, 0.0, 0.0, 3.0]]
    assert defended_features(clamp, states, [], phi_mask).shape == (1, 0)
    # decode drift of dPhi = [1, 2, 0, 3] ((row 0: f2 = 1, f0 = 2), (row 1: f2 = 0, f0 = 3)):
    # row 0: 1 W_dec[2] + 2 W_dec[0] = [4, 0, 1]; row 1: 3 W_dec[0] = [6, 0, 0] -> sqrt(16 + 1 + 36)
    dd = recovery._decode_drift(clamp, torch.tensor([[1.0, 2.0, 0.0, 3.0]]), [HOOK], phi_mask)
    assert dd.tolist() == pytest.approx([math.sqrt(53.0)])


# --- the best checkpoint -------------------------------------------------------------------------------


def test_checkpoints_keep_the_best_score_under_the_drift_limit():
    d = torch.zeros(2, 1, 1)
    cp = Checkpoints({"s": d}, max_drift=0.5)
    t = torch.tensor
    on = t([True, True])
    d += 1.0
    cp.offer(0, t([1.0, 1.0]), t([0.1, 0.6]), on)  # example 1 over the limit: not kept
    d += 1.0
    cp.offer(1, t([0.5, 2.0]), t([0.5, 0.5]), on)  # example 0 worse: not kept; example 1 kept (drift == limit)
    d += 1.0
    cp.offer(2, t([3.0, 9.0]), t([0.0, 0.0]), t([True, False]))  # example 1 inactive: not kept
    out = torch.full((2, 1, 1), -7.0)
    assert cp.restore({"s": out}) == [2, 1]
    assert out.flatten().tolist() == [3.0, 2.0]
    # equal scores do not replace: the first is kept
    cp = Checkpoints({"s": d}, max_drift=1.0)
    cp.offer(4, t([1.0, 1.0]), t([0.0, 0.0]), on)
    cp.offer(t([5, 6]), t([1.0, 2.0]), t([0.0, 0.0]), on)
    assert cp.step.tolist() == [4, 6]


# --- the device (torch) routes of linalg, on a rank-deficient J -------------------------------------
#
# J = [[1, 0, 0], [2, 0, 0], [0, 1, 0]] has rank 2: row space span(e0, e1), null space span(e2).
# Its singular values are sqrt(5), 1 and 0, so keeping every singular vector of J^T would also
# remove e2 and project everything to 0.

J = torch.tensor([[1.0, 0.0, 0.0], [2.0, 0.0, 0.0], [0.0, 1.0, 0.0]], dtype=torch.float64)
G = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]], dtype=torch.float64)


def test_torch_row_space_basis_drops_the_null_direction():
    u = linalg._torch_row_space_basis(J, None, torch)
    assert u.shape == (3, 2)
    torch.testing.assert_close(u.T @ u, torch.eye(2, dtype=torch.float64))
    torch.testing.assert_close(u @ u.T, torch.diag(torch.tensor([1.0, 1.0, 0.0], dtype=torch.float64)))
    # the same for any positive scale of J (the scaling by a power of two is exact), tiny or huge
    for scale in (2.0 ** -1000, 1e-300, 3.0, 1e300):
        us = linalg._torch_row_space_basis(J * scale, None, torch)
        torch.testing.assert_close(us @ us.T, u @ u.T, atol=1e-15, rtol=0)
    assert linalg._torch_row_space_basis(torch.zeros(2, 3, dtype=torch.float64), None, torch).shape == (3, 0)
    assert linalg._torch_row_space_basis(torch.zeros(0, 3, dtype=torch.float64), None, torch).shape == (3, 0)


def test_jacobian_device_route_on_a_rank_deficient_j():
    # G - (its components in span(e0, e1)) = [[0, 0, 3], [0, 0, 6]]
    want = torch.tensor([[0.0, 0.0, 3.0], [0.0, 0.0, 6.0]], dtype=torch.float64)
    got = linalg._jacobian_torch_device(J, G, None)
    torch.testing.assert_close(got, want, atol=1e-15, rtol=0)
    assert got.dtype == torch.float64
    # float32 G is projected in float32 and returned as float32; a 1-D G keeps its shape
    got32 = linalg._jacobian_torch_device(J.float(), G.float(), None)
    assert got32.dtype == torch.float32
    torch.testing.assert_close(got32, want.float())
    assert linalg._jacobian_torch_device(J, G[1], None).tolist() == [0.0, 0.0, 6.0]
    # J given as a NumPy array
    torch.testing.assert_close(linalg._jacobian_torch_device(J.numpy(), G, None), want, atol=1e-15, rtol=0)
    # the CPU (Rust) route agrees
    np.testing.assert_allclose(linalg.jacobian_null_project(J.numpy(), G.numpy()), want.numpy(), atol=1e-15)
    # a zero J removes nothing
    assert torch.equal(linalg._jacobian_torch_device(torch.zeros(2, 3, dtype=torch.float64), G, None), G)


def test_jacobian_device_route_rank_tolerance():
    # J = diag(1, 1e-12) padded with a zero column: singular values 1 and 1e-12.
    # default rcond = max(2, 3) * eps = 6.7e-16 < 1e-12 -> rank 2: [1, 1, 1] -> [0, 0, 1]
    # rcond = 1e-9 > 1e-12 -> rank 1: [1, 1, 1] -> [0, 1, 1]; both routes agree
    j = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1e-12, 0.0]], dtype=torch.float64)
    g = torch.ones(1, 3, dtype=torch.float64)
    rank2 = torch.tensor([[0.0, 0.0, 1.0]], dtype=torch.float64)
    rank1 = torch.tensor([[0.0, 1.0, 1.0]], dtype=torch.float64)
    torch.testing.assert_close(linalg._jacobian_torch_device(j, g, None), rank2, atol=1e-15, rtol=0)
    torch.testing.assert_close(linalg._jacobian_torch_device(j, g, 1e-9), rank1, atol=1e-15, rtol=0)
    np.testing.assert_allclose(linalg.jacobian_null_project(j.numpy(), g.numpy()), [[0.0, 0.0, 1.0]], atol=1e-15)
    np.testing.assert_allclose(linalg.jacobian_null_project(j.numpy(), g.numpy(), rcond=1e-9), [[0.0, 1.0, 1.0]],
                               atol=1e-15)
    # exactly at the tolerance counts as zero: s = 1e-12 with rcond = 1e-12 -> rank 1
    torch.testing.assert_close(linalg._jacobian_torch_device(j, g, 1e-12), rank1, atol=1e-15, rtol=0)
    assert linalg.default_rcond(2, 3) == 3 * np.finfo(np.float64).eps
    assert linalg.default_rcond(0, 0) == np.finfo(np.float64).eps


def test_encoder_device_route_hand_cases():
    # A = e0 in R^3: [1, 2, 3] -> [0, 2, 3]; A = I: everything removed; A = 0: nothing removed
    x = torch.tensor([[1.0, 2.0, 3.0]])
    p = linalg.EncoderNullProjector(np.array([[1.0], [0.0], [0.0]]))
    assert p._apply_torch_device(x).tolist() == [[0.0, 2.0, 3.0]]
    assert p._apply_torch_device(x.to(torch.bfloat16)).dtype == torch.bfloat16
    assert p._apply_torch_device(x.double()).dtype == torch.float64
    assert linalg.EncoderNullProjector(np.eye(3))._apply_torch_device(x).tolist() == [[0.0, 0.0, 0.0]]
    assert linalg.EncoderNullProjector(np.zeros((3, 2)))._apply_torch_device(x).tolist() == [[1.0, 2.0, 3.0]]
    # the cached device basis is reused
    assert p._device_basis(x.device, torch.float32) is p._device_basis(x.device, torch.float32)


# --- more of the loop: Adam, several delta sites, reclamp, checkpoints, sketch, inputs -----------


def test_adam_first_step_is_lr_times_the_sign_of_the_gradient():
    # Adam's first step is lr * g / (|g| + eps) per coordinate: the gradient -u = [-3, -4, 0] gives
    # delta = 0.1 [1, 1, 0] (to within eps / |g| ~ 1e-9); the zero coordinate stays 0
    dm, task = linear_setup()
    cfg = RecoveryConfig(steps=1, lr=0.1, budget=5.0, optimizer="adam")
    (out,) = recover_batch(dm, task, examples([[0, 0]]), mode="none", cfg=cfg)
    torch.testing.assert_close(out.tensors["delta"], torch.tensor([[0.1, 0.1, 0.0]]))


def test_on_step_sees_the_delta_applied_next_and_the_row_mask():
    seen = []
    dm, task = linear_setup()
    cfg = RecoveryConfig(steps=2, lr=0.1, budget=5.0, optimizer="sgd", history=False)
    (out,) = recover_batch(dm, task, examples([[0, 0]]), mode="none", cfg=cfg,
                           on_step=lambda step, deltas, mask: seen.append((step, deltas[HOOK].clone(), mask.clone())))
    assert [s for s, _, _ in seen] == [0, 1]
    torch.testing.assert_close(seen[0][1], torch.tensor([[[0.0, 0.0, 0.0], [0.3, 0.4, 0.0]]]))
    torch.testing.assert_close(seen[1][1], torch.tensor([[[0.0, 0.0, 0.0], [0.6, 0.8, 0.0]]]))
    assert seen[0][2].tolist() == [[False, True]]
    assert out.history == []  # history=False


def test_positions_all_and_phi_from_the_first_optimized_row():
    # positions "all": both rows get the gradient of the score at the answer row only, so row 0's
    # delta stays 0; the row mask and the metrics cover both rows.
    dm, task = linear_setup()
    cfg = RecoveryConfig(steps=1, lr=0.1, budget=5.0, optimizer="sgd", positions="all")
    (out,) = recover_batch(dm, task, examples([[0, 0]]), mode="none", cfg=cfg)
    torch.testing.assert_close(out.tensors["delta"], torch.tensor([[0.0, 0.0, 0.0], [0.3, 0.4, 0.0]]))
    assert out.tensors["rows"].tolist() == [0, 1]
    # z_def = 0 on both rows (both are token 0 -> e0, clamped); z_rec: 0 and 0.3 -> 1 of 2 pairs reactivated
    assert out.metrics["reactivated_fraction"] == 0.5
    assert out.tensors["h_def"].tolist() == [[0.0, 0.0, 0.0], [0.0, 0.0, 0.0]]


def test_two_delta_sites_in_model_order():
    # Two layers with mix = I; the clamp at blocks.0.hook_resid_post (feature 0 to 0) and at
    # blocks.1.hook_resid_post (feature 1 to 0, a second hand site); delta at both sites, given in
    # reverse order (they are sorted into model order). At delta = 0 the residual reaching the
    # layer-1 clamp is 0, where relu' = 0, so that clamp passes the gradient unchanged: the gradient
    # at either site is -u, and one SGD step gives [0.3, 0.4, 0] at each.
    # delta_norm is over both sites: sqrt(2) * 0.5; the c1 residual is the larger of the two sites'.
    model = LinearModel(torch.eye(3), U, mix=[torch.eye(3), torch.eye(3)])
    s0 = hand_site(torch.eye(3).tolist(), hook=HOOK)
    s1 = hand_site(torch.eye(3).tolist(), hook="blocks.1.hook_resid_post")
    dm = DefendedModel(model, Clamp.combine(Clamp({s0: [0]}), Clamp({s1: [1]})))
    cfg = RecoveryConfig(steps=1, lr=0.1, budget=5.0, optimizer="sgd")
    (out,) = recover_batch(dm, TokenMargin(0, 1), examples([[0, 0]]), mode="none", cfg=cfg,
                           delta_site=["blocks.1.hook_resid_post", HOOK])
    torch.testing.assert_close(out.tensors["delta"], torch.tensor([[0.3, 0.4, 0.0]]))
    torch.testing.assert_close(out.tensors["delta@blocks.1.hook_resid_post"], torch.tensor([[0.3, 0.4, 0.0]]))
    assert out.metrics["delta_norm"] == pytest.approx(math.sqrt(2) * 0.5, rel=1e-6)
    # c1 at site 0 (A = e0): 0.3 / 0.5 = 0.6; at site 1 (A = e1): 0.4 / 0.5 = 0.8 -> 0.8
    assert out.metrics["c1_residual"] == pytest.approx(0.8, rel=1e-6)
    # the budget is over both sites together: 0.5 sqrt(2) > 0.5 -> both scaled by 1 / sqrt(2)
    cfg = RecoveryConfig(steps=1, lr=0.1, budget=0.5, optimizer="sgd")
    (out,) = recover_batch(dm, TokenMargin(0, 1), examples([[0, 0]]), mode="none", cfg=cfg,
                           delta_site=[HOOK, "blocks.1.hook_resid_post"])
    torch.testing.assert_close(out.tensors["delta"], torch.tensor([[0.3, 0.4, 0.0]]) / math.sqrt(2))
    assert out.metrics["delta_norm"] == pytest.approx(0.5, rel=1e-6)


def test_reclamp_metrics_measure_what_the_attacker_added():
    # reclamp: the clamp is applied again after delta, so the model sees feature 0 back at 0; the
    # metrics are taken on h_def + delta (what was added), so the drift is still 0.3
    dm, task = linear_setup()
    cfg = RecoveryConfig(steps=1, lr=0.1, budget=5.0, optimizer="sgd", reclamp=True)
    (out,) = recover_batch(dm, task, examples([[0, 0]]), mode="none", cfg=cfg)
    # with the clamp re-applied, d score / d delta_0 = 3 (1 - relu'(0)) = 3 at delta = 0: the same step
    torch.testing.assert_close(out.tensors["delta"], torch.tensor([[0.3, 0.4, 0.0]]))
    assert out.metrics["activation_drift"] == pytest.approx(0.3, rel=1e-6)
    # the model saw h_rec = reclamp(delta) = [0, 0.4, 0]: score 1.6, not 2.5
    assert out.recovered_score == pytest.approx(1.6, rel=1e-6)


def test_best_checkpoint_under_a_drift_limit_in_the_loop():
    # clamp feature 0 to 1 (Phi_def = 1 at the answer row). Two SGD steps of 0.1 u: Phi = relu(1 + d_0):
    # step 0 (delta 0): drift 0, score 3; step 1 (delta 0.1 u): drift 0.3, score 5.5; the final
    # delta 0.2 u: drift 0.6, score 8. With max_drift 0.4 the best is step 1's delta (0.1 u).
    dm, task = linear_setup(value=1.0)
    cfg = RecoveryConfig(steps=2, lr=0.1, budget=5.0, optimizer="sgd", max_drift=0.4)
    (out,) = recover_batch(dm, task, examples([[0, 0]]), mode="none", cfg=cfg)
    assert out.metrics["checkpoint_step"] == 1
    torch.testing.assert_close(out.tensors["delta"], torch.tensor([[0.3, 0.4, 0.0]]))
    assert out.metrics["phi_relative_drift"] == pytest.approx(0.3 / (1 + 1e-8), rel=1e-6)
    assert [h["phi_relative_drift"] for h in out.history] == pytest.approx([0.0, 0.3])
    # a limit the final delta meets: the final delta (step 2) wins
    cfg = RecoveryConfig(steps=2, lr=0.1, budget=5.0, optimizer="sgd", max_drift=1.0)
    (out,) = recover_batch(dm, task, examples([[0, 0]]), mode="none", cfg=cfg)
    assert out.metrics["checkpoint_step"] == 2
    torch.testing.assert_close(out.tensors["delta"], torch.tensor([[0.6, 0.8, 0.0]]))
    # a limit nothing but delta = 0 meets: step 0
    cfg = RecoveryConfig(steps=2, lr=0.1, budget=5.0, optimizer="sgd", max_drift=0.0)
    (out,) = recover_batch(dm, task, examples([[0, 0]]), mode="none", cfg=cfg)
    assert out.metrics["checkpoint_step"] == 0 and out.tensors["delta"].abs().sum() == 0


@pytest.mark.usefixtures("jacobian_route")
def test_jacobian_step_residual_of_a_step_along_a_dropped_direction():
    # Features 0 and 1 read e0 and 1e-3 e1 (W_enc columns), both set to 1: Phi = z at the answer
    # row, J = [[1, 0, 0], [0, 1e-3, 0]]. With rcond 1e-2 the second singular value (1e-3) counts as
    # zero: the step keeps its e1 part, [0, 0.4, 0], and moves Phi by J step = [0, 4e-4]:
    # jacobian_step_residual = ||J step|| / (||J||_2 ||step||) = 4e-4 / (1 * 0.4) = 1e-3.
    model = LinearModel(torch.eye(3), U)
    site = hand_site([[1.0, 0.0], [0.0, 1e-3], [0.0, 0.0]], [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]], hook=HOOK)
    dm = DefendedModel(model, Clamp({site: [0, 1]}, value=1.0))
    cfg = RecoveryConfig(steps=1, lr=0.1, budget=5.0, optimizer="sgd", rcond=1e-2)
    (out,) = recover_batch(dm, TokenMargin(0, 1), examples([[0, 0]]), mode="jacobian", cfg=cfg)
    torch.testing.assert_close(out.tensors["delta"], torch.tensor([[0.0, 0.4, 0.0]]))
    assert out.metrics["jacobian_step_residual"] == pytest.approx(1e-3, rel=1e-4)
    assert out.history[0]["first_order_drift"] == pytest.approx(1e-3, rel=1e-4)
    # with the default rcond both directions are projected out, and the gradient -u has no e2
    # part: nothing moves
    cfg = RecoveryConfig(steps=1, lr=0.1, budget=5.0, optimizer="sgd")
    (out,) = recover_batch(dm, TokenMargin(0, 1), examples([[0, 0]]), mode="jacobian", cfg=cfg)
    assert out.tensors["delta"].abs().max() < 1e-6 and out.metrics["jacobian_step_residual"] == 0.0


@pytest.mark.usefixtures("jacobian_route")
def test_jacobian_mode_at_the_budget_takes_no_round_off_step():
    # step 0: 0.1 P u = [0, 0.4, 0] shortened to the budget 0.2 -> [0, 0.2, 0]. Step 1: the same
    # step from a delta on the budget sphere, along delta itself: pulled back along delta's null-space
    # part it is exactly 0 (a step below 1e-3 ||delta|| is not taken), so delta stays [0, 0.2, 0].
    (out,) = run("jacobian", budget=0.2, steps=3, value=1.0)
    torch.testing.assert_close(out.tensors["delta"], torch.tensor([[0.0, 0.2, 0.0]]))
    assert [h["delta_norm"] for h in out.history] == pytest.approx([0.2, 0.2, 0.2])


def test_sketch_mode_through_the_loop():
    # clamp feature 0 to 1: Phi = relu(1 + d_0) at the answer row, J = e0^T. The drift probe is
    # zero at delta = 0 (dropped); each random probe's VJP is +-e0: the basis is {e0}, so the step
    # is the projected gradient [0, 0.4, 0], as in the exact modes.
    (out,) = run("sketch", budget=5.0, value=1.0, sketch_probes=2)
    torch.testing.assert_close(out.tensors["delta"], torch.tensor([[0.0, 0.4, 0.0]]))
    assert out.metrics["phi_relative_drift"] == 0.0
    # no probes at all: nothing is projected out, the plain step
    (out,) = run("sketch", budget=5.0, value=1.0, sketch_probes=0, sketch_drift_probe=False)
    torch.testing.assert_close(out.tensors["delta"], torch.tensor([[0.3, 0.4, 0.0]]))


def test_recover_batch_refuses_bad_inputs_before_any_work():
    dm, task = linear_setup()
    ex = examples([[0, 0], [0, 0]])
    cfg = RecoveryConfig(steps=1, lr=0.1, budget=1.0, optimizer="sgd")
    with pytest.raises(ValueError, match="unknown projection"):
        recover_batch(dm, task, ex, mode="orthogonal", cfg=cfg)
    with pytest.raises(ValueError, match="budget must hold one value per example"):
        recover_batch(dm, task, ex, mode="none", cfg=cfg, budget=torch.ones(3))
    for bad in (0.0, -1.0, math.nan, math.inf):
        with pytest.raises(ValueError, match="per-example budgets must be finite and > 0"):
            recover_batch(dm, task, ex, mode="none", cfg=cfg, budget=torch.tensor([1.0, bad]))
    with pytest.raises(ValueError, match="must be clamped"):
        recover_batch(dm, task, ex, mode="none", cfg=cfg, delta_site="blocks.0.hook_resid_pre")
    with pytest.raises(ValueError, match="unknown hook name"):
        recover_batch(dm, task, ex, mode="none", cfg=cfg, delta_site="blocks.0.hook_attn_out")
    site = hand_site(torch.eye(3).tolist(), hook=HOOK)
    empty = DefendedModel(dm.model, Clamp({site: []}))
    with pytest.raises(ValueError, match="empty feature set"):
        recover_batch(empty, task, ex, mode="none", cfg=cfg)
    with pytest.raises(ValueError, match="budget"):
        recover_batch(dm, task, ex, mode="none", cfg=RecoveryConfig(budget=0.0))
    assert dm.model.calls == 0  # nothing ran
    # a budget per example given as a list works like the tensor
    outs = recover_batch(dm, task, ex, mode="none", cfg=cfg, budget=[2.0, 0.25])
    torch.testing.assert_close(outs[1].tensors["delta"], torch.tensor([[0.15, 0.2, 0.0]]))


def test_non_finite_scores_are_refused_with_the_example_named():
    # an embedding of +inf makes the score non-finite: the loop names the example
    model = LinearModel(torch.tensor([[1.0, 0.0, 0.0], [math.inf, 0.0, 0.0]]), U)
    site = hand_site(torch.eye(3).tolist(), hook=HOOK)
    dm = DefendedModel(model, Clamp({site: [2]}))
    cfg = RecoveryConfig(steps=1, lr=0.1, budget=1.0, optimizer="sgd")
    with pytest.raises(FloatingPointError, match=r"\['ex-1'\]"):
        recover_batch(dm, TokenMargin(0, 1), examples([[0, 0], [0, 1]]), mode="none", cfg=cfg)


# --- the loop's other branches: a given start, two stages, the penalty after the projection, drift
# corrections, checkpoints after the update, the history's drift ------------------------------------


def start_at(d0: float, d1: float = 0.0, row0: float = 9.0) -> dict[str, torch.Tensor]:
    """A start delta for examples([[0, 0]]): [d0, d1, 0] at the answer row, ``row0`` everywhere at
    row 0 (masked away unless optimized), float64 (cast to float32)."""
    return {HOOK: torch.tensor([[[row0] * 3, [d0, d1, 0.0]]], dtype=torch.float64)}


def test_a_given_start_is_kept_at_the_optimized_rows_only():
    dm, task = linear_setup()
    # steps 0: evaluated as given -> [0.1, 0.2, 0] at the answer row (score 3 * 0.1 + 4 * 0.2 = 1.1)
    cfg = RecoveryConfig(steps=0, lr=0.1, budget=5.0, optimizer="sgd")
    (out,) = recover_batch(dm, task, examples([[0, 0]]), mode="none", cfg=cfg, init=start_at(0.1, 0.2))
    torch.testing.assert_close(out.tensors["delta"], torch.tensor([[0.1, 0.2, 0.0]]))
    assert out.recovered_score == pytest.approx(1.1, rel=1e-6) and out.steps == 0
    # one SGD step from there: + 0.1 u -> [0.4, 0.6, 0]; the history's first score is the start's
    cfg = RecoveryConfig(steps=1, lr=0.1, budget=5.0, optimizer="sgd", positions="all")
    (out,) = recover_batch(dm, task, examples([[0, 0]]), mode="none", cfg=cfg, init=start_at(0.1, 0.2, row0=1.0))
    # positions "all": row 0 keeps its start [1, 1, 1] (its gradient is 0)
    torch.testing.assert_close(out.tensors["delta"], torch.tensor([[1.0, 1.0, 1.0], [0.4, 0.6, 0.0]]))
    assert out.history[0]["score"] == pytest.approx(1.1, rel=1e-6)


def test_the_main_stage_adds_to_the_anchor_stage_delta():
    # anchor stage (1 step, lr 0.1): 0.1 u = [0.3, 0.4, 0] at the answer row, then fixed; the main
    # stage starts from 0 on top of it: its first score is that of 0.1 u (2.5), and its step adds
    # another 0.1 u: the applied delta is 0.2 u = [0.6, 0.8, 0] (score 5)
    dm, task = linear_setup()
    cfg = RecoveryConfig(steps=1, lr=0.1, budget=5.0, optimizer="sgd", anchor_steps=1, anchor_lr=0.1)
    (out,) = recover_batch(dm, task, examples([[0, 0]]), mode="none", cfg=cfg)
    torch.testing.assert_close(out.tensors["delta"], torch.tensor([[0.6, 0.8, 0.0]]))
    assert [(h["stage"], h["step"]) for h in out.history] == [("anchor", 0), ("main", 0)]
    assert [h["score"] for h in out.history] == pytest.approx([0.0, 2.5])
    assert out.metrics["anchor_delta_norm"] == pytest.approx(0.5, rel=1e-6)
    assert out.metrics["main_delta_norm"] == pytest.approx(0.5, rel=1e-6)
    assert out.recovered_score == pytest.approx(5.0, rel=1e-6) and out.steps == 2


def test_the_anchor_stage_has_its_own_lr_budget_and_start():
    # anchor stage (1 step, lr 0.2): 0.2 u = [0.6, 0.8, 0] (norm 1) at the answer row, then fixed;
    # the main stage (lr 0.1) adds 0.1 u (norm 0.5): 0.3 u is applied. on_step numbers the steps
    # across both stages and sees the delta applied next.
    seen = []
    dm, task = linear_setup()
    cfg = RecoveryConfig(steps=1, lr=0.1, budget=5.0, optimizer="sgd", anchor_steps=1, anchor_lr=0.2)
    (out,) = recover_batch(dm, task, examples([[0, 0]]), mode="none", cfg=cfg,
                           on_step=lambda step, deltas, mask: seen.append((step, deltas[HOOK][0, 1].clone())))
    assert [step for step, _ in seen] == [0, 1]
    torch.testing.assert_close(torch.stack([d for _, d in seen]), torch.tensor([[0.6, 0.8, 0.0], [0.9, 1.2, 0.0]]))
    assert out.metrics["anchor_delta_norm"] == pytest.approx(1.0, rel=1e-6)
    assert out.metrics["main_delta_norm"] == pytest.approx(0.5, rel=1e-6)
    # an anchor budget of 0.25 binds the anchor stage alone: 0.2 u shrinks to [0.15, 0.2, 0], and
    # the main stage's 0.1 u (within its budget of 5) is added: [0.45, 0.6, 0]
    capped = RecoveryConfig(**{**cfg.to_dict(), "anchor_budget": 0.25})
    (out,) = recover_batch(dm, task, examples([[0, 0]]), mode="none", cfg=capped)
    torch.testing.assert_close(out.tensors["delta"], torch.tensor([[0.45, 0.6, 0.0]]))
    assert out.metrics["anchor_delta_norm"] == pytest.approx(0.25, rel=1e-6)
    assert out.metrics["budget"] == 5.0  # the main stage's
    # a given start is the anchor stage's: [0.1, 0.2, 0] + 0.2 u = [0.7, 1, 0]; the main stage starts
    # from 0 on top of it and adds 0.1 u: [1, 1.4, 0]
    (out,) = recover_batch(dm, task, examples([[0, 0]]), mode="none", cfg=cfg, init=start_at(0.1, 0.2))
    torch.testing.assert_close(out.tensors["delta"], torch.tensor([[1.0, 1.4, 0.0]]))


def test_each_stage_keeps_its_own_best_checkpoint():
    # clamp f0 to 2 (Phi_def = 2), max_drift 0.2. Anchor stage, 2 steps of 0.1 u: candidates 0
    # (drift 0), 0.1 u (0.15), 0.2 u (0.3): it keeps 0.1 u (step 1). The main stage starts on top
    # of it: candidates 0 (drift 0.15), 0.1 u (0.3), 0.2 u (0.45): it keeps 0 (step 0).
    dm, task = linear_setup(value=2.0)
    cfg = RecoveryConfig(steps=2, lr=0.1, budget=5.0, optimizer="sgd", anchor_steps=2, anchor_lr=0.1, max_drift=0.2)
    (out,) = recover_batch(dm, task, examples([[0, 0]]), mode="none", cfg=cfg)
    assert out.metrics["anchor_checkpoint_step"] == 1 and out.metrics["checkpoint_step"] == 0
    assert out.metrics["anchor_delta_norm"] == pytest.approx(0.5, rel=1e-6) and out.metrics["main_delta_norm"] == 0.0
    torch.testing.assert_close(out.tensors["delta"], torch.tensor([[0.3, 0.4, 0.0]]))


def test_one_stage_reports_no_stage_and_c4_relative_to_the_residual():
    # clamp f0 to 0.5: h_def = 0.5 e0 at the answer row (residual scale 0.5), Phi_def = 0.5; one step
    # of 0.1 u
    dm, task = linear_setup(value=0.5)
    cfg = RecoveryConfig(steps=1, lr=0.1, budget=5.0, optimizer="sgd")
    (out,) = recover_batch(dm, task, examples([[0, 0]]), mode="none", cfg=cfg)
    assert "stage" not in out.history[0]
    assert not {"anchor_delta_norm", "main_delta_norm", "anchor_checkpoint_step"} & set(out.metrics)
    assert out.metrics["budget"] == 5.0 and out.metrics["relative_budget"] == 10.0
    # the delta's norm against ||Phi_def||, as the reference reports it
    norm = float(torch.sqrt(out.tensors["delta"].float().pow(2).sum()))
    assert norm == pytest.approx(0.5, rel=1e-6)
    assert out.metrics["relative_delta_norm_phi"] == pytest.approx(norm / (0.5 + EPS), rel=1e-12)


def test_delta_sites_go_in_model_order_and_a_later_one_may_be_unclamped():
    # resid_pre comes before resid_post in the model but not in the alphabet; only resid_pre is
    # clamped, and the first delta site must be. The gradient at either site is -u (the clamp is
    # before both deltas): one SGD step gives [0.3, 0.4, 0] at each.
    pre = "blocks.0.hook_resid_pre"
    dm = DefendedModel(LinearModel(torch.eye(3), U), Clamp({hand_site(torch.eye(3).tolist(), hook=pre): [0]}))
    cfg = RecoveryConfig(steps=1, lr=0.1, budget=5.0, optimizer="sgd")
    (out,) = recover_batch(dm, TokenMargin(0, 1), examples([[0, 0]]), mode="none", cfg=cfg, delta_site=[HOOK, pre])
    torch.testing.assert_close(out.tensors["delta"], torch.tensor([[0.3, 0.4, 0.0]]))
    torch.testing.assert_close(out.tensors[f"delta@{HOOK}"], torch.tensor([[0.3, 0.4, 0.0]]))
    assert out.metrics["delta_norm"] == pytest.approx(math.sqrt(2) * 0.5, rel=1e-6)


def test_examples_without_rows_for_the_positions_are_named():
    # the answer at the last row leaves no response rows: the first five such examples are named
    dm, task = linear_setup()
    ex = examples([[0, 0]] * 7, answer_pos=[0] + [1] * 6)
    cfg = RecoveryConfig(steps=1, lr=0.1, budget=1.0, optimizer="sgd", positions="response")
    with pytest.raises(ValueError, match=r"examples \['ex-1', 'ex-2', 'ex-3', 'ex-4', 'ex-5'\] have no rows "
                                         r"for positions='response'"):
        recover_batch(dm, task, ex, mode="none", cfg=cfg)


def test_response_rows_bound_the_optimized_rows_and_phi():
    # three rows, the answer at row 0: the response rows are 1 and 2, response_rows=1 keeps row 1
    dm, task = linear_setup(value=2.0)
    ex = examples([[0, 0, 0]], answer_pos=[0])
    cfg = RecoveryConfig(steps=1, lr=0.1, budget=5.0, optimizer="sgd", positions="response", response_rows=1)
    (out,) = recover_batch(dm, task, ex, mode="none", cfg=cfg)
    assert out.tensors["rows"].tolist() == [1]
    # delta at the answer row (0.1 u, norm 0.5); Phi over the response rows (row 1: ||Phi_def|| = 2)
    # or from the delta's first row on (rows 0 to 2: 2 sqrt(3))
    for phi_positions, phi_norm in (("response", 2.0), ("from_delta", 2.0 * math.sqrt(3))):
        cfg = RecoveryConfig(steps=1, lr=0.1, budget=5.0, optimizer="sgd", response_rows=1,
                             phi_positions=phi_positions)
        (out,) = recover_batch(dm, task, ex, mode="none", cfg=cfg)
        assert out.metrics["relative_delta_norm_phi"] == pytest.approx(0.5 / phi_norm, rel=1e-6), phi_positions


def test_penalty_gradient_after_the_projection_in_sketch_mode():
    # clamp f0 to 1 (Phi_def = 1), start at [0.5, 0, 0]: Phi = 1.5, penalty = |1.5 - 1| / (1 + 1e-8)
    # = 0.5 with gradient e0 (lambda_act 1). The sketch basis is the drift probe's VJP, e0.
    # penalty after the projection: P(-u) + e0 = [1, -4, 0] -> delta = [0.5, 0, 0] - 0.1 [1, -4, 0]
    # = [0.4, 0.4, 0]; with it inside the loss: P(-u + e0) = [0, -4, 0] -> [0.5, 0.4, 0].
    # Either way the history's loss is -score + penalty = -4.5 + 0.5.
    dm, task = linear_setup(value=1.0)
    outs = {}
    for after in (True, False):
        cfg = RecoveryConfig(steps=1, lr=0.1, budget=5.0, optimizer="sgd", lambda_act=1.0, sketch_probes=0,
                             penalty_after_projection=after)
        (outs[after],) = recover_batch(dm, task, examples([[0, 0]]), mode="sketch", cfg=cfg, init=start_at(0.5))
        assert outs[after].history[0]["loss"] == pytest.approx(-4.0, rel=1e-6)
        assert outs[after].history[0]["phi_relative_drift"] == pytest.approx(0.5, rel=1e-6)
    torch.testing.assert_close(outs[True].tensors["delta"], torch.tensor([[0.4, 0.4, 0.0]]))
    torch.testing.assert_close(outs[False].tensors["delta"], torch.tensor([[0.5, 0.4, 0.0]]))
    # no penalty (lambda_act 0): nothing is added after the projection, the step is P(-u) alone
    cfg = RecoveryConfig(steps=1, lr=0.1, budget=5.0, optimizer="sgd", lambda_act=0.0, sketch_probes=0,
                         penalty_after_projection=True)
    (out,) = recover_batch(dm, task, examples([[0, 0]]), mode="sketch", cfg=cfg, init=start_at(0.5))
    torch.testing.assert_close(out.tensors["delta"], torch.tensor([[0.5, 0.4, 0.0]]))


@pytest.mark.usefixtures("jacobian_route")
def test_drift_corrections_follow_the_row_space_step_only():
    # clamp f0 to 1, start at [0.5, 0, 0]. Jacobian mode: the step is [0, 0.4, 0] (J = e0^T) ->
    # [0.5, 0.4, 0]; then 2 corrections of lr 0.05 on the penalty |relu(1 + d0) - 1| / (1 + 1e-8)
    # (gradient e0): d0 0.5 -> 0.45 -> 0.40.
    dm, task = linear_setup(value=1.0)
    cfg = RecoveryConfig(steps=1, lr=0.1, budget=5.0, optimizer="sgd", drift_correction_steps=2,
                         drift_correction_lr=0.05)
    (out,) = recover_batch(dm, task, examples([[0, 0]]), mode="jacobian", cfg=cfg, init=start_at(0.5))
    torch.testing.assert_close(out.tensors["delta"], torch.tensor([[0.4, 0.4, 0.0]]))
    # none mode has no row space: no corrections, delta = start + 0.1 u = [0.8, 0.4, 0]
    (out,) = recover_batch(dm, task, examples([[0, 0]]), mode="none", cfg=cfg, init=start_at(0.5))
    torch.testing.assert_close(out.tensors["delta"], torch.tensor([[0.8, 0.4, 0.0]]))


def test_checkpoints_after_the_update_measure_each_updated_delta():
    # clamp f0 to 2: h_def = 2 e0, Phi_def = 2, score 6 at delta 0. Three SGD steps of 0.1 u; the
    # candidates are the deltas after each update: 0.1 u (drift 0.3 / 2 = 0.15, score 8.5, step 1),
    # 0.2 u (0.3, 11, step 2), 0.3 u (0.45, 13.5, step 3). Under max_drift 0.2: step 1's delta.
    # Two identical examples (a drift norm over the batch would be 0.15 sqrt(2) > 0.2).
    dm, task = linear_setup(value=2.0)
    cfg = RecoveryConfig(steps=3, lr=0.1, budget=5.0, optimizer="sgd", max_drift=0.2, checkpoint_after_update=True)
    outs = recover_batch(dm, task, examples([[0, 0], [0, 0]]), mode="none", cfg=cfg)
    for out in outs:
        assert out.metrics["checkpoint_step"] == 1 and out.metrics["checkpoint_feasible"] is True
        torch.testing.assert_close(out.tensors["delta"], torch.tensor([[0.3, 0.4, 0.0]]))
        assert out.recovered_score == pytest.approx(8.5, rel=1e-6)
    # before the update (the default), the candidates are the deltas each step starts from:
    # 0 (step 0), 0.1 u (1), 0.2 u (2) and the last, 0.3 u (3): the same choice here
    cfg = RecoveryConfig(**{**cfg.to_dict(), "checkpoint_after_update": False})
    assert [o.metrics["checkpoint_step"] for o in recover_batch(dm, task, examples([[0, 0]]), mode="none",
                                                                 cfg=cfg)] == [1]


def test_history_drift_of_a_mode_without_phi():
    # none mode and no penalty: Phi is not needed by the loop, but the history still records the
    # relative drift of Phi at the delta each step starts from. Clamp f0 to 2 (||Phi_def|| = 2):
    # steps from 0 and 0.1 u -> drift 0 and 0.3 / 2, per example.
    dm, task = linear_setup(value=2.0)
    cfg = RecoveryConfig(steps=2, lr=0.1, budget=5.0, optimizer="sgd")
    for out in recover_batch(dm, task, examples([[0, 0], [0, 0]]), mode="none", cfg=cfg):
        assert [h["phi_relative_drift"] for h in out.history] == pytest.approx([0.0, 0.15], rel=1e-6)
        assert [h["score"] for h in out.history] == pytest.approx([6.0, 8.5], rel=1e-6)
        assert [h["loss"] for h in out.history] == pytest.approx([-6.0, -8.5], rel=1e-6)
        assert [h["delta_norm"] for h in out.history] == pytest.approx([0.5, 1.0], rel=1e-6)
        assert out.metrics["phi_relative_drift"] == pytest.approx(0.6 / 2, rel=1e-6)


def test_early_stop_needs_a_score_above_the_margin():
    # stop_margin 2.5: after one step the score is exactly 2.5 (0.1 u), not above it, so the example
    # takes the second step too (score 5 > 2.5), then stops
    dm, task = linear_setup()
    cfg = RecoveryConfig(steps=4, lr=0.1, budget=5.0, optimizer="sgd", early_stop=True, stop_margin=2.5)
    (out,) = recover_batch(dm, task, examples([[0, 0]]), mode="none", cfg=cfg)
    assert out.steps == 2
    torch.testing.assert_close(out.tensors["delta"], torch.tensor([[0.6, 0.8, 0.0]]))


@pytest.mark.usefixtures("jacobian_route")
def test_jacobian_mode_per_example_budgets_and_a_second_step():
    # three examples, budgets 2, 0.2 and 0.3: the projected step [0, 0.4, 0] whole, shortened to
    # 0.2 and to 0.3; then a second step for the first, from delta = [0, 0.4, 0] in J's null space:
    # another [0, 0.4, 0] (the step, not old + step, is projected)
    dm, task = linear_setup(value=1.0)
    cfg = RecoveryConfig(steps=1, lr=0.1, budget=5.0, optimizer="sgd")
    outs = recover_batch(dm, task, examples([[0, 0]] * 3), mode="jacobian", cfg=cfg,
                         budget=torch.tensor([2.0, 0.2, 0.3]))
    for out, want in zip(outs, (0.4, 0.2, 0.3)):
        torch.testing.assert_close(out.tensors["delta"], torch.tensor([[0.0, want, 0.0]]))
        assert out.metrics["jacobian_step_residual"] == 0.0
    (out,) = run("jacobian", budget=2.0, steps=2, value=1.0)
    torch.testing.assert_close(out.tensors["delta"], torch.tensor([[0.0, 0.8, 0.0]]))
    assert [h["delta_norm"] for h in out.history] == pytest.approx([0.4, 0.8])


@pytest.mark.usefixtures("jacobian_route")
def test_jacobian_step_ratio_of_a_step_not_taken_is_zero():
    # at the budget the later steps are not taken (see above): their first-order drift is 0
    (out,) = run("jacobian", budget=0.2, steps=3, value=1.0)
    assert [h["first_order_drift"] for h in out.history] == [0.0, 0.0, 0.0]


@pytest.mark.usefixtures("jacobian_route")
def test_jacobian_step_residual_relative_to_a_small_jacobian():
    # as test_jacobian_step_residual_of_a_step_along_a_dropped_direction with W_enc columns
    # 0.5 e0 and 1e-3 e1 (features set to 1): ||J||_2 = 0.5, and the kept e1 part of the step moves
    # Phi by 4e-4: 4e-4 / (0.5 * 0.4) = 2e-3 (1e-3 / 0.5 < rcond 1e-2: dropped)
    model = LinearModel(torch.eye(3), U)
    site = hand_site([[0.5, 0.0], [0.0, 1e-3], [0.0, 0.0]], [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]], hook=HOOK)
    dm = DefendedModel(model, Clamp({site: [0, 1]}, value=1.0))
    cfg = RecoveryConfig(steps=1, lr=0.1, budget=5.0, optimizer="sgd", rcond=1e-2)
    (out,) = recover_batch(dm, TokenMargin(0, 1), examples([[0, 0]]), mode="jacobian", cfg=cfg)
    torch.testing.assert_close(out.tensors["delta"], torch.tensor([[0.0, 0.4, 0.0]]))
    assert out.metrics["jacobian_step_residual"] == pytest.approx(2e-3, rel=1e-4)


def test_budget_step_pulls_back_when_the_discriminant_is_zero():
    # old = e0 (its null-space part e0: a = 1), step = 0.5 e1, budget 0.5: w = [1, 0.5],
    # excess = 1.25 - 0.25 = 1, b = 1, disc = b^2 - a excess = 0 -> gamma = 1: the step minus e0,
    # [-1, 0.5], puts old + step at [0, 0.5], on the sphere (shortening could not: a = 0 there)
    t = lambda *v: torch.tensor(v, dtype=torch.float64)
    st = jacobian_mode.budget_step(t(1.0, 0.0), t(0.0, 0.5), t(1.0, 0.0), 0.5)
    assert st.tolist() == [-1.0, 0.5]


def test_checkpoints_fall_back_to_the_best_score_minus_weighted_drift():
    # max_drift 0.5, fallback weight 2: an example with no candidate under the limit keeps the one
    # with the largest score - 2 drift; one with a feasible candidate never falls back.
    # step 0: scores [1, 5, 3], drifts [0.1, 0.9, 0.6]: ex0 feasible (score 1); ex1, ex2 fall back
    #         (5 - 1.8 = 3.2, 3 - 1.2 = 1.8)
    # step 1: scores [0.5, 4.5, 2], drifts [0.2, 0.6, 0.4]: ex0 0.5 < 1 keeps step 0; ex1 falls back
    #         to 4.5 - 1.2 = 3.3 > 3.2; ex2 becomes feasible (2)
    # step 2: scores 9, drifts [0.6, 0.8, 0.9], ex1 and ex2 inactive: ex0 over the limit and already
    #         feasible: nothing changes
    d = torch.zeros(3, 1)
    best = Checkpoints({"s": d}, 0.5, 2.0)
    for step, score, drift, active in (
        (0, [1.0, 5.0, 3.0], [0.1, 0.9, 0.6], [True, True, True]),
        (1, [0.5, 4.5, 2.0], [0.2, 0.6, 0.4], [True, True, True]),
        (2, [9.0, 9.0, 9.0], [0.6, 0.8, 0.9], [True, False, False]),
    ):
        d.fill_(step + 1.0)
        best.offer(step, torch.tensor(score), torch.tensor(drift), torch.tensor(active))
    assert best.score.tolist() == [1.0, -math.inf, 2.0]
    assert best.fallback.tolist() == pytest.approx([-math.inf, 3.3, 1.8])
    assert best.feasible.tolist() == [True, False, True]
    steps = best.restore({"s": d})
    assert steps == [0, 1, 1] and all(type(s) is int for s in steps)
    assert d.flatten().tolist() == [1.0, 2.0, 2.0]
    # without a fallback weight, an example with no feasible candidate keeps nothing (zeros, step 0)
    d = torch.zeros(2, 1)
    best = Checkpoints({"s": d}, 0.5)
    d.fill_(4.0)
    best.offer(3, torch.tensor([1.0, 1.0]), torch.tensor([0.1, 0.9]), torch.tensor([True, True]))
    assert best.restore({"s": d}) == [3, 0] and d.flatten().tolist() == [4.0, 0.0]
    assert best.fallback_weight is None and Checkpoints({"s": d}, 0.5, 1).fallback_weight == 1.0


def test_checkpoint_candidates_are_the_first_every_kth_and_the_last_step():
    # steps 0..9, every 4: the first (0), (step + 1) % 4 == 0 (3, 7), the last (9)
    assert [s for s in range(10) if recovery._is_candidate(s, 10, 4)] == [0, 3, 7, 9]
    assert [s for s in range(3) if recovery._is_candidate(s, 3, 10)] == [0, 2]
    assert [s for s in range(1) if recovery._is_candidate(s, 1, 10)] == [0]


class JudgingMargin(TokenMargin):
    """The token margin as the loss, with the final behavior decided by a judge that records
    what it was given and answers by hand."""

    def __init__(self, verdicts):
        super().__init__(0, 1)
        self.verdicts, self.calls = verdicts, []

    def judge(self, defended, ex, *, with_clamp, deltas=None, reclamp=False):
        self.calls.append({"defended": defended, "ids": list(ex.ids), "with_clamp": with_clamp,
                           "deltas": deltas, "reclamp": reclamp})
        return torch.tensor(self.verdicts[: len(ex)])


@pytest.mark.parametrize("reclamp", [False, True])
def test_the_final_behavior_of_a_judging_task_is_its_judge(reclamp):
    # one SGD step: delta = 0.1 u for both examples, a margin of 2.5 (1.6 with reclamp) that
    # would count as recovered; the judge says -1 and 0, and 0 is not > 0: neither is recovered
    dm, _ = linear_setup()
    task = JudgingMargin([-1.0, 0.0])
    ex = examples([[0, 0], [0, 0]])
    cfg = RecoveryConfig(steps=1, lr=0.1, budget=2.0, optimizer="sgd", reclamp=reclamp)
    outs = recover_batch(dm, task, ex, mode="none", cfg=cfg)
    assert [(o.recovered, o.recovered_score) for o in outs] == [(False, -1.0), (False, 0.0)]
    (call,) = task.calls
    assert call["defended"] is dm and call["ids"] == ex.ids
    assert call["with_clamp"] is True and call["reclamp"] is reclamp
    (delta,) = call["deltas"].values()
    assert list(call["deltas"]) == [HOOK] and not delta.requires_grad
    torch.testing.assert_close(delta[:, 1], torch.tensor([[0.3, 0.4, 0.0]] * 2))
    # a judge's +1 is recovered; a non-finite verdict is an error naming the example
    task = JudgingMargin([1.0, math.nan])
    outs = recover_batch(dm, task, examples([[0, 0]]), mode="none", cfg=cfg)
    assert (outs[0].recovered, outs[0].recovered_score) == (True, 1.0)
    with pytest.raises(FloatingPointError, match=r"non-finite final score for examples \['ex-1'\]"):
        recover_batch(dm, task, ex, mode="none", cfg=cfg)


def test_phi_relative_drift_and_floor_violation_of_hand_states():
    # clamp feature 0 to 1: Phi_def = 1. One SGD step of lr 0.1 along -u (margin b - a):
    # delta = [-0.3, -0.4, 0], Phi = relu(1 - 0.3) = 0.7: drift 0.3, all of it below the floor
    dm, _ = linear_setup(value=1.0)
    cfg = RecoveryConfig(steps=1, lr=0.1, budget=2.0, optimizer="sgd")
    (out,) = recover_batch(dm, TokenMargin(1, 0), examples([[0, 0]]), mode="none", cfg=cfg)
    assert out.metrics["phi_relative_drift"] == pytest.approx(0.3 / (1 + 1e-8), rel=1e-6)
    assert out.metrics["phi_floor_violation"] == pytest.approx(0.3 / (1 + 1e-8), rel=1e-6)
    # along +u (margin a - b): Phi = 1.3, drift 0.3, nothing below the floor
    (out,) = recover_batch(dm, TokenMargin(0, 1), examples([[0, 0]]), mode="none", cfg=cfg)
    assert out.metrics["phi_relative_drift"] == pytest.approx(0.3 / (1 + 1e-8), rel=1e-6)
    assert out.metrics["phi_floor_violation"] == 0.0
    # clamped to 0, Phi_def = 0: relative to nothing, both undefined
    dm, _ = linear_setup(value=0.0)
    (out,) = recover_batch(dm, TokenMargin(0, 1), examples([[0, 0]]), mode="none", cfg=cfg)
    assert math.isnan(out.metrics["phi_relative_drift"]) and math.isnan(out.metrics["phi_floor_violation"])
