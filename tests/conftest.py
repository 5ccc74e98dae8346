"""Shared fixtures: tiny random-weight GPT-2 / Llama / Gemma-2 models saved to local
directories (no downloads), built once per session. The builders live in
``saerecover.testing`` so that any test can make its own variants."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

if importlib.util.find_spec("saerecover") is None:  # running from a source tree, not installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))

from saerecover import testing  # noqa: E402


def pytest_configure(config):
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except ImportError:
        pass


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch intra-op thread for the module (``pytestmark =
    pytest.mark.usefixtures("one_torch_thread")``): the toy model's matrices are tiny, and one
    thread is faster than several, much faster on a busy machine."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory) -> dict[str, Path]:
    """``{"gpt2": dir, "llama": dir, "gemma2": dir}``: saved tiny models with tokenizers."""
    root = tmp_path_factory.mktemp("tiny_models")
    return {family: testing.tiny_model(family, root) for family in testing.FAMILIES}


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tiny_dirs) -> Path:
    return tiny_dirs["gpt2"]


@pytest.fixture(scope="session")
def tiny_llama_dir(tiny_dirs) -> Path:
    return tiny_dirs["llama"]


@pytest.fixture(scope="session")
def tiny_gemma2_dir(tiny_dirs) -> Path:
    return tiny_dirs["gemma2"]


@pytest.fixture(scope="session")
def tiny_adapters(tiny_dirs):
    """A cached loader: ``tiny_adapters(family, backend)`` -> a float32 CPU ModelAdapter.
    Adapters hold no state between forward passes, so tests may share them."""
    from saerecover.models import load_model

    cache: dict[tuple[str, str], object] = {}

    def get(family: str, backend: str):
        key = (family, backend)
        if key not in cache:
            cache[key] = load_model(tiny_dirs[family], backend=backend, device="cpu")
        return cache[key]

    return get
