"""The exact Jacobian mode at scale: J's rows at delta's own site from the encoder alone (no VJP
through the model), the block-diagonal solve when Phi covers that site only, chunked VJPs for
later sites, and the torch route choice (Gram / Cholesky where the conditioning allows, else
SVD) of ``linalg.jacobian_null_project_batched``, which the CUDA path uses."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from exact_stubs import Scored
from saerecover import linalg
from saerecover.core.config import RecoveryConfig
from saerecover.core.defended import DefendedModel
from saerecover.core.projection import defended_feature_parts, flatten_example, packed_jacobians
from saerecover.core.projection.jacobian import kept_coordinates
from saerecover.core.projection.position_blocks import (
    CONSTANT_DERIVATIVE_ARCHITECTURES,
    PositionBlocks,
    active_feature_rows,
    constant_derivative_blocks,
    row_blocks,
    same_site_gradients,
)
from saerecover.core.recovery import RECTIFIED_ARCHITECTURES, recover_batch
from saerecover.experiments.refusal import DEFAULT_TOY_SITES

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def world():
    from saerecover import toy as toy_world

    return toy_world.load(device="cpu")


def _setting(world, sites):
    from saerecover.experiments.refusal import toy_setting

    return toy_setting(world, n=4, n_contrast=24, sites=sites, max_new_tokens=4)


def _state(world, setting, n=3):
    """A batch at a random delta on every prompt row of the first site, attached to the graph."""
    clamp = setting.clamp
    dm = DefendedModel(world.model, clamp)
    ex = setting.task.examples().select(list(range(n)))
    mask = ex.position_mask("prompt")
    seq = mask.shape[1]
    pos = torch.arange(seq).expand(n, seq)
    first = torch.where(mask, pos, seq).min(dim=1).values
    phi_mask = ex.attention_mask.bool() & (pos >= first.unsqueeze(1))
    sites = [clamp.site_clamps[0].site.hook_name]
    phi_sites = [sc.site.hook_name for sc in clamp.site_clamps]
    gen = torch.Generator().manual_seed(0)
    deltas = {s: (0.05 * torch.randn(n, seq, world.model.d_model, generator=gen)).mul_(mask.unsqueeze(-1))
              .requires_grad_(True) for s in sites}
    out = dm.forward(ex, deltas, track=tuple(phi_sites))
    parts = defended_feature_parts(clamp, out.sites, phi_sites, phi_mask)
    rectified = [clamp.at(s).site.architecture in RECTIFIED_ARCHITECTURES for s in phi_sites]
    return parts, deltas, mask, phi_mask, rectified, phi_sites


def test_same_site_rows_are_the_vjp_rows_and_chunks_change_nothing(world):
    """Two clamped sites: the first site's rows from the encoder alone equal the VJP rows (same
    order), the second site's rows are the VJP rows however they are chunked."""
    parts, deltas, mask, phi_mask, rectified, phi_sites = _state(world, _setting(world, DEFAULT_TOY_SITES))
    assert len(parts) == 2
    dense = packed_jacobians(parts, deltas, mask, rectified, phi_mask=phi_mask)
    local = packed_jacobians(parts, deltas, mask, rectified, phi_mask=phi_mask, row_local=[True, False])
    chunked = packed_jacobians(parts, deltas, mask, rectified, phi_mask=phi_mask, row_local=[True, False],
                               max_chunk_bytes=1)
    for a, b, c in zip(dense, local, chunked):
        assert a.shape == b.shape == c.shape and a.shape[0] > 20
        scale = float(a.abs().max())
        assert float((a - b).abs().max()) <= 1e-5 * scale
        assert float((a - c).abs().max()) <= 1e-5 * scale
    # the first site's rows of each example are a real block: non-zero only at their own row
    rows0 = int(kept_coordinates(parts[0], rectified[0], phi_mask)[0].sum())
    assert rows0 > 0 and float(local[0][:rows0].abs().sum()) > 0


def test_position_blocks_project_as_the_dense_jacobian(world):
    """One clamped site: the per-row block solve equals the dense solve with the VJP-built J to
    1e-5, and what it returns meets the mode's bar against that dense J."""
    parts, deltas, mask, phi_mask, rectified, phi_sites = _state(world, _setting(world, DEFAULT_TOY_SITES[:1]))
    (site,) = deltas
    dense = packed_jacobians(parts, deltas, mask, rectified, phi_mask=phi_mask)
    keep = kept_coordinates(parts[0], rectified[0], phi_mask)
    blocks = PositionBlocks(row_blocks(same_site_gradients(parts[0], deltas[site]), keep, mask), mask, None)
    g = {site: torch.randn(deltas[site].shape, generator=torch.Generator().manual_seed(1)) * mask.unsqueeze(-1)}
    (projected,) = blocks.project([g[site]])
    assert set(blocks.routes) == {"gram"}  # encoder rows of a trained SAE are well conditioned
    for b, jb in enumerate(dense):
        assert blocks.rows[b] == int((jb != 0).any(dim=1).sum()) > 0
        want = linalg.jacobian_null_project(jb, flatten_example(g, b, mask))
        got = flatten_example({site: projected}, b, mask)
        assert float((got - want).norm()) <= 1e-5 * float(want.norm())
        jd = jb.double()
        ratio = float((jd @ got.double()).norm() / (torch.linalg.matrix_norm(jd, ord=2) * got.double().norm()))
        assert ratio <= 1e-5
        assert abs(blocks.norms[b] - float(torch.linalg.matrix_norm(jd, ord=2))) <= 1e-6 * blocks.norms[b]


def test_the_encoder_derivative_at_one_row_per_feature_gives_every_block(world):
    """A standard SAE with an affine input map: an active feature's derivative is the same at
    every row where it fires, so one backward at one row per feature gives all the blocks."""
    setting = _setting(world, DEFAULT_TOY_SITES[:1])
    parts, deltas, mask, phi_mask, rectified, phi_sites = _state(world, setting)
    (site,) = deltas
    sc = setting.clamp.at(site)
    assert sc.site.architecture in CONSTANT_DERIVATIVE_ARCHITECTURES and sc.site.is_affine_encoder_input
    keep = kept_coordinates(parts[0], rectified[0], phi_mask)
    want = row_blocks(same_site_gradients(parts[0], deltas[site]), keep, mask)
    dm = DefendedModel(world.model, setting.clamp)
    ex = setting.task.examples().select(list(range(3)))
    h_rec = dm.forward(ex, {site: deltas[site].detach()}, track=(site,)).sites[site].h_rec
    got = constant_derivative_blocks(active_feature_rows(sc.site, sc.features, h_rec, keep), keep, mask)
    # compacted: each block's kept rows first, in feature order, cut to the longest block
    longest = int(keep.reshape(*mask.shape, -1)[mask].sum(dim=1).max())
    assert got.shape == (want.shape[0], longest, want.shape[2]) and int((want != 0).any(dim=2).sum()) > 20
    want_compact = PositionBlocks(want, mask, None).blocks
    assert float((got - want_compact).abs().max()) <= 1e-5 * float(want.abs().max())
    assert PositionBlocks(got, mask, None).rows == PositionBlocks(want, mask, None).rows


def test_the_jacobian_mode_with_one_clamped_site_meets_its_bar_on_every_step(world):
    setting = _setting(world, DEFAULT_TOY_SITES[:1])
    ex = setting.task.examples().select([0, 1])
    cfg = RecoveryConfig(steps=4, lr=0.2, budget=40.0, positions="prompt")
    outs = recover_batch(DefendedModel(world.model, setting.clamp), Scored(setting.task), ex, mode="jacobian",
                         cfg=cfg)
    for o in outs:
        assert 0 < o.metrics["jacobian_step_residual"] <= 1e-5
        assert o.metrics["jacobian_rows"] > 0
        assert all(h["first_order_drift"] <= 1e-5 for h in o.history)
        assert float(o.tensors["delta"].norm()) > 0


# --- the torch route choice --------------------------------------------------------------------

def _with_singular_values(m, n, values, seed=0):
    rng = np.random.default_rng(seed)
    u, _ = np.linalg.qr(rng.standard_normal((m, m)))
    v, _ = np.linalg.qr(rng.standard_normal((n, m)))
    return (u * np.asarray(values)) @ v.T


def _exact(j, g):
    """G with J's row space removed, from NumPy's SVD in float64."""
    u, s, vt = np.linalg.svd(j, full_matrices=False)
    v = vt[s > 1e-13 * s[0]].T
    return g - (g @ v) @ v.T


def test_a_hand_worked_projection_by_both_routes():
    J = torch.tensor([[2.0, 0.0, 0.0]], dtype=torch.float64)
    G = torch.tensor([[1.0, 2.0, 3.0]], dtype=torch.float64)
    for route in ("auto", "gram", "svd"):
        y, taken = linalg.jacobian_null_project_torch(J, G, route=route)
        assert y.tolist() == [[0.0, 2.0, 3.0]]
        assert taken == ("gram" if route == "auto" else route)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_auto_takes_the_gram_route_for_a_well_conditioned_j(dtype):
    j = _with_singular_values(6, 40, [10, 8, 5, 3, 2, 1])
    g = np.random.default_rng(1).standard_normal((3, 40))
    y, route = linalg.jacobian_null_project_torch(torch.from_numpy(j), torch.from_numpy(g).to(dtype))
    assert route == "gram" and y.dtype == dtype
    bar = 1e-12 if dtype == torch.float64 else 1e-6
    assert np.abs(y.double().numpy() - _exact(j, g)).max() <= bar * np.abs(g).max()


def test_auto_leaves_ill_conditioned_and_rank_deficient_j_to_the_svd():
    g = np.random.default_rng(2).standard_normal((2, 30))
    # cond 1e4: past the Gram limit for float64 G (1e3), within it for float32 G (1e6)
    j = _with_singular_values(4, 30, [1, 1e-1, 1e-2, 1e-4])
    y64, r64 = linalg.jacobian_null_project_torch(torch.from_numpy(j), torch.from_numpy(g))
    y32, r32 = linalg.jacobian_null_project_torch(torch.from_numpy(j), torch.from_numpy(g).float())
    assert (r64, r32) == ("svd", "gram")
    assert np.abs(y64.numpy() - _exact(j, g)).max() <= 1e-12
    # a repeated row: J J^T is singular, the rank (3) is the SVD's decision
    jr = np.vstack([j[:3], j[:1]])
    yr, rr = linalg.jacobian_null_project_torch(torch.from_numpy(jr), torch.from_numpy(g))
    assert rr == "svd"
    assert np.abs(yr.numpy() - _exact(j[:3], g)).max() <= 1e-12
    # forced routes still answer (the Gram route by the eigendecomposition, dropping the repeat)
    yg, rg = linalg.jacobian_null_project_torch(torch.from_numpy(jr), torch.from_numpy(g), route="gram")
    assert rg == "gram" and np.abs(yg.numpy() - _exact(j[:3], g)).max() <= 1e-6


def test_batched_problems_choose_their_routes_one_by_one():
    good = _with_singular_values(3, 12, [3, 2, 1], seed=3)
    bad = _with_singular_values(3, 12, [1, 1e-3, 1e-5], seed=4)
    J = torch.from_numpy(np.stack([good, bad, np.zeros((3, 12))]))
    G = torch.from_numpy(np.random.default_rng(5).standard_normal((3, 2, 12)))
    # a zero row in a block changes nothing
    J[0, 1] = 0.0
    y, routes = linalg.jacobian_null_project_batched(J, G)
    assert routes == ["gram", "svd", "zero"]
    assert np.abs(y[0].numpy() - _exact(J[0].numpy()[[0, 2]], G[0].numpy())).max() <= 1e-12
    assert np.abs(y[1].numpy() - _exact(bad, G[1].numpy())).max() <= 1e-10
    assert torch.equal(y[2], G[2])
    with pytest.raises(ValueError, match="unknown route 'qr'"):
        linalg.jacobian_null_project_batched(J, G, route="qr")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: the CUDA path of jacobian_null_project")
def test_the_cuda_path_takes_the_same_routes():
    j = _with_singular_values(6, 40, [10, 8, 5, 3, 2, 1])
    bad = _with_singular_values(4, 40, [1, 1e-1, 1e-2, 1e-4])
    g = torch.from_numpy(np.random.default_rng(1).standard_normal((3, 40)))
    for jm, want in ((j, "gram"), (bad, "svd")):
        y, route = linalg.jacobian_null_project_torch(torch.from_numpy(jm).cuda(), g.cuda())
        assert route == want
        assert np.abs(y.cpu().numpy() - _exact(jm, g.numpy())).max() <= 1e-10
        y2 = linalg.jacobian_null_project(torch.from_numpy(jm).cuda(), g.cuda())
        assert torch.equal(y2.cpu(), y.cpu())


def test_budget_steps_is_budget_step_for_every_example_at_once():
    """The batched C4 of the block route against the one-example rule, on its hand cases
    (tests/test_exact_steps.py) and random rows, with budgets per example."""
    from saerecover.core.projection.jacobian import budget_step, budget_steps

    cases = [((0.0, 0.0), (0.3, 0.4), (0.0, 0.0), 1.0), ((1.0, 0.0), (0.0, 0.5), (1.0, 0.0), 1.0),
             ((0.6, 0.0), (0.0, 1.0), (0.0, 0.0), 1.0), ((0.6, 0.8), (0.0, 0.5), (0.6, 0.0), 1.0),
             ((0.0, 0.0), (2.0, 0.0), (0.0, 0.0), 1.0), ((2.0, 0.0), (1.0, 0.0), (0.0, 0.0), 1.0),
             ((2.0, 0.0), (-0.5, 0.0), (0.0, 0.0), 1.0), ((5.0, 0.0), (0.0, 0.0), (0.0, 0.0), 1.0)]
    gen = torch.Generator().manual_seed(0)
    for _ in range(24):
        o, st, on = (torch.randn(2, generator=gen, dtype=torch.float64) for _ in range(3))
        cases.append((tuple(o.tolist()), tuple(st.tolist()), tuple((0.5 * on).tolist()), float(o.norm()) * 0.9))
    old, step, null = (torch.tensor([c[i] for c in cases], dtype=torch.float64) for i in range(3))
    budgets = torch.tensor([c[3] for c in cases], dtype=torch.float64)
    got = budget_steps(old, step, null, budgets)
    for i in range(len(cases)):
        want = budget_step(old[i], step[i], null[i], float(budgets[i]))
        assert torch.allclose(got[i], want.double(), atol=1e-14, rtol=0), i


@pytest.mark.parametrize("route", ["auto", "gram", "svd"])
def test_batched_rows_near_the_ends_of_float64_keep_every_digit(route):
    # problem 0: J = [[2, 0, 0]] removes e1; problem 1: J = [[0, 0, 0]] (zero) removes nothing;
    # problem 2: J = [[0, 4, 0], [0, 0, 0]] removes e2 (its zero row changes nothing).
    # G rows at 1e200, 1e-200, 3 and 0: scaled by a power of two and back, exact.
    J = torch.tensor([[[2.0, 0, 0], [0, 0, 0]], [[0, 0, 0], [0, 0, 0]], [[0, 4.0, 0], [0, 0, 0]]],
                     dtype=torch.float64)
    J[0, 1] = J[0, 0]  # a repeated row: rank 1 all the same
    rows = torch.tensor([[1e200, 3e200, -2e200], [1e-200, 3e-200, -2e-200], [1.0, 3.0, -2.0], [0.0, 0.0, 0.0]],
                        dtype=torch.float64)
    G = rows.expand(3, 4, 3).clone()
    null = linalg.BatchedJacobianNull(J, route=route, dtype=torch.float64)
    assert null.routes == {"auto": ["svd", "zero", "gram"], "gram": ["gram", "zero", "gram"],
                           "svd": ["svd", "zero", "svd"]}[route]
    y = null.apply(G)
    want = G.clone()
    want[0, :, 0] = 0.0
    want[2, :, 1] = 0.0
    assert y.dtype == torch.float64 and y.shape == (3, 4, 3)
    scale = torch.tensor([1e200, 1e-200, 1.0, 1.0], dtype=torch.float64).view(1, 4, 1)
    assert ((y - want).abs() / scale).max().item() <= 1e-15
    assert torch.equal(y[1], G[1]) and bool((y[:, 3] == 0).all())
    # the same factorization, another batch (two rows, float32): float64 out
    y2 = null.apply(torch.ones(3, 2, 3))
    assert y2.dtype == torch.float64
    want2 = torch.tensor([[[0.0, 1.0, 1.0]] * 2, [[1.0, 1.0, 1.0]] * 2, [[1.0, 0.0, 1.0]] * 2], dtype=torch.float64)
    assert (y2 - want2).abs().max().item() <= 1e-15
    with pytest.raises(ValueError, match=r"J \(B, m, n\) and G \(B, r, n\) must agree"):
        null.apply(torch.ones(2, 2, 3))


def test_the_torch_route_keeps_g_kind_and_names_what_is_wrong():
    # J = [[2, 0, 0], [0, 0, 0]] (a zero row, left out): removes e1, by hand
    J = np.array([[2.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    g = torch.tensor([1.0, 2.0, 3.0])
    y, route = linalg.jacobian_null_project_torch(J, g)
    assert (y.tolist(), y.dtype, route) == ([0.0, 2.0, 3.0], torch.float32, "gram")
    y, route = linalg.jacobian_null_project_torch(torch.from_numpy(J).float(), g.double().reshape(1, 3), route="svd")
    assert (y.shape, y.dtype, route) == ((1, 3), torch.float64, "svd")
    assert (y - torch.tensor([[0.0, 2.0, 3.0]], dtype=torch.float64)).abs().max() <= 1e-15
    # rcond: singular values (1, 1e-3); 1e-2 drops the second, the default keeps it
    J2 = np.diag([1.0, 1e-3, 0.0])[:2]
    y, _ = linalg.jacobian_null_project_torch(J2, torch.ones(2, 3, dtype=torch.float64), rcond=1e-2)
    assert y.tolist() == [[0.0, 1.0, 1.0]] * 2
    y, _ = linalg.jacobian_null_project_torch(J2, torch.ones(2, 3, dtype=torch.float64))
    assert (y - torch.tensor([[0.0, 0.0, 1.0]] * 2, dtype=torch.float64)).abs().max() <= 1e-12
    # nothing to project: G itself, route "zero"
    empty = torch.zeros(0, 3)
    y, route = linalg.jacobian_null_project_torch(J, empty)
    assert (y.shape, route) == ((0, 3), "zero")
    # float16: v = (1, 1, 1, -1) / 2 takes 60000 v out of 60000 (1, 1, 1, 1): the last entry
    # becomes 90000, beyond float16's largest value
    with pytest.raises(ValueError, match=r"^the projection of G overflows float16 at \[0, 3\]"):
        linalg.jacobian_null_project_torch(np.array([[1.0, 1.0, 1.0, -1.0]]), torch.full((1, 4), 6e4).half())
    y, _ = linalg.jacobian_null_project_torch(np.array([[1.0, 1.0, 1.0, -1.0]]), torch.full((1, 4), 6.0).bfloat16())
    assert (y.dtype, y.float().tolist()) == (torch.bfloat16, [[3.0, 3.0, 3.0, 9.0]])
    with pytest.raises(TypeError, match="J must be a floating-point tensor, got torch.int64"):
        linalg.jacobian_null_project_torch(torch.ones(1, 3, dtype=torch.long), g)
    with pytest.raises(ValueError, match=r"J must be 2-D \(m, n\), got shape \(1, 1, 3\)"):
        linalg.jacobian_null_project_torch(torch.ones(1, 1, 3), g)
