"""Out of memory in a batched stage halves the chunk and retries it (saerecover.models.memory):
the generic loop, and the stages that use it (attribution scores, attribution replays, the
refusal task's base generations), with a fake out-of-memory error; the results are those of
an unhalved run."""

from __future__ import annotations

import pytest
import torch
from saerecover.models.memory import first_line, is_out_of_memory, oom_label, run_in_chunks

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CPU_OOM = "DefaultCPUAllocator: can't allocate memory: you tried to allocate 9663676416 bytes."


def _failing_above(limit, error=torch.cuda.OutOfMemoryError):
    calls = []

    def run(start, stop):
        calls.append((start, stop))
        if stop - start > limit:
            raise error("CUDA out of memory. Tried to allocate 2.00 GiB" if error is not RuntimeError else CPU_OOM)
        return list(range(start, stop))

    return run, calls


@pytest.mark.parametrize("error", [torch.cuda.OutOfMemoryError, RuntimeError])
def test_chunks_halve_keep_the_smaller_size_and_the_order(error):
    run, calls = _failing_above(2, error)
    sizes = []
    out = run_in_chunks(7, 8, run, what="a test", on_halve=sizes.append)
    assert [x for chunk in out for x in chunk] == list(range(7))
    # 8 -> 7 items fail, 4 fails, 2 fits; then 2, 2, 1 at the kept size
    assert calls == [(0, 7), (0, 4), (0, 2), (2, 4), (4, 6), (6, 7)]
    assert sizes == [4, 2]


def test_other_errors_pass_and_one_item_that_does_not_fit_is_a_memory_error():
    def boom(start, stop):
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")

    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        run_in_chunks(3, 2, boom, what="a test")
    run, _ = _failing_above(0)
    with pytest.raises(MemoryError, match=r"CUDA out of memory in a test with a batch of 1 \(item 0\)"):
        run_in_chunks(3, 2, run, what="a test")
    assert is_out_of_memory(RuntimeError(CPU_OOM)) and not is_out_of_memory(RuntimeError("other"))
    with pytest.raises(ValueError, match="batch_size must be an integer >= 1"):
        run_in_chunks(3, 0, run, what="a test")
    # the caller names the item that does not fit
    with pytest.raises(MemoryError, match=r"^CUDA out of memory in a test with a batch of 1 \(example 'b'\): "
                                          r"CUDA out of memory\. Tried to allocate 2\.00 GiB$"):
        run_in_chunks(3, 2, run, what="a test", name_item=lambda i: f"example {'abc'[i + 1]!r}")
    run, _ = _failing_above(0, RuntimeError)
    with pytest.raises(MemoryError, match=r"^out of memory in a test with a batch of 1 \(item 0\): DefaultCPUAllocator"):
        run_in_chunks(3, 2, run, what="a test")


def test_error_labels_and_first_lines():
    assert oom_label(torch.cuda.OutOfMemoryError("x")) == "CUDA out of memory"
    assert oom_label(RuntimeError(CPU_OOM)) == "out of memory"
    assert first_line(RuntimeError("  first\nsecond  ")) == "first"
    assert first_line(RuntimeError("   ")) == "RuntimeError"
    assert first_line(MemoryError()) == "MemoryError"


@pytest.fixture(scope="module")
def world():
    from saerecover import toy

    return toy.load(device="cpu")


class _OOMAbove:
    """A task whose score raises CUDA's out-of-memory error for batches above ``limit``."""

    def __init__(self, task, limit):
        self.task, self.limit, self.name, self.sizes = task, limit, task.name, []

    def score(self, logits, ex):
        self.sizes.append(len(ex))
        if len(ex) > self.limit:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.00 GiB")
        return self.task.score(logits, ex)

    def loss(self, logits, ex):
        return self.task.loss(logits, ex)


def test_attribution_scores_halve_on_out_of_memory(world):
    from saerecover.core.selection import attribution_scores

    site = world.site("blocks.1.hook_resid_post")
    task = world.ioi_task(n=8)
    ex = task.examples()
    want = attribution_scores(world.model, site, task, ex, batch_size=8)
    flaky = _OOMAbove(task, 3)
    got = attribution_scores(world.model, site, flaky, ex, batch_size=8)
    assert flaky.sizes == [8, 4, 2, 2, 2, 2]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_attribution_replays_halve_on_out_of_memory(world):
    from saerecover.core.clamp import Clamp
    from saerecover.core.defended import DefendedModel
    from saerecover.experiments.attribution import ReplayItem, replay

    site = world.site("blocks.1.hook_resid_post")
    task = world.ioi_task(n=4)
    ex = task.examples()
    features = torch.arange(8)
    dm = DefendedModel(world.model, Clamp({site: features}, value=0.0))
    gen = torch.Generator().manual_seed(0)
    items = [ReplayItem(ex.ids[i], torch.randn(1, world.model.d_model, generator=gen),
                        3.0 * torch.randn(1, world.model.d_model, generator=gen), ex.answer_pos[i:i + 1], "none")
             for i in range(4)]
    want = replay(dm, task, ex, items, site=site, features=features, batch_size=16)
    flaky = _OOMAbove(task, 5)
    got = replay(dm, flaky, ex, items, site=site, features=features, batch_size=16)
    pairs = 4 * len(want[0]["replay"])  # replays: 4 items x 7 components
    assert pairs == 28 and flaky.sizes == [16, 8] + [4] * 7
    assert [r["replay"] for r in got] == [r["replay"] for r in want]


def test_the_refusal_base_generations_halve_on_out_of_memory(world, monkeypatch):
    from saerecover.experiments.refusal import toy_requests
    from saerecover.tasks.refusal import task as refusal_task

    def build():
        return refusal_task.Refusal(world.model, toy_requests(5, harmful=False, seed=0), max_new_tokens=4,
                                        batch_size=4)

    want = build().examples()
    real, sizes = refusal_task.generate, []

    def flaky(model, prompts, **kw):
        sizes.append(len(prompts))
        if len(prompts) > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.00 GiB")
        return real(model, prompts, **kw)

    monkeypatch.setattr(refusal_task, "generate", flaky)
    got = build().examples()
    assert sizes == [4, 2, 2, 1]
    assert torch.equal(got.input_ids, want.input_ids) and got.ids == want.ids
