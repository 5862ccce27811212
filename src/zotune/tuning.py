"""Tuning modes: which parameters MeZO trains (the paper's full, LoRA, prefix; and head-only).

``model.tuning`` selects one; :func:`apply_tuning` applies it right after the model is loaded, and
everything that rebuilds a run (``--resume``, ``zotune eval --trajectory``, ``zotune replay``) calls it
the same way, so a trajectory's parameter names are found again:

- ``full``: the parameters that ``model.trainable``'s glob patterns select (all by default).
- ``lora``: LoRA (Hu et al. 2021) through the PEFT library, rank ``lora_r``, scale ``lora_alpha / r``,
  on the attention query and value projections (the paper: r=8, alpha=16). The module names come from
  the architecture (Llama/OPT/Mistral/Qwen: q_proj, v_proj; GPT-2: c_attn, whose fused q/k/v projection
  gets one LoRA pair; RoBERTa/BERT: query, value; others: q_proj, v_proj) unless ``lora_targets`` names them. LoRA's A
  matrices are initialised from a fixed seed, so a freshly prepared model starts from the same adapter.
- ``prefix``: ``prefix_tokens`` trained keys and values per attention layer (:mod:`zotune.prefix`).
- ``head``: the output projection only (``get_output_embeddings()``). Where it is tied to the input
  embeddings (OPT, GPT-2, SmolLM2) the shared matrix trains, so the input embeddings move too.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import torch
from torch import nn

from zotune.models import TUNINGS, LoadedModel, ModelConfig, ModelError

__all__ = ["LORA_TARGETS", "TUNINGS", "apply_tuning", "lora_targets", "merge_lora", "tune_loaded"]

# Query and value projections by model_type (model.lora_targets overrides; unlisted types: q_proj, v_proj).
LORA_TARGETS = {
    "llama": ["q_proj", "v_proj"],
    "mistral": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"],
    "qwen3": ["q_proj", "v_proj"],
    "opt": ["q_proj", "v_proj"],
    "gemma": ["q_proj", "v_proj"],
    "gpt2": ["c_attn"],
    "roberta": ["query", "value"],
    "bert": ["query", "value"],
}
_LORA_SEED = 0  # LoRA's A init: fixed, so a freshly prepared base starts from the same adapter
_PREFIX_SEED = 0  # which real tokens initialise the prefixes


def _linear_names(model: nn.Module) -> list[str]:
    """The last name component of every linear-like module (what LoRA can target)."""
    from transformers.pytorch_utils import Conv1D

    return sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, (nn.Linear, Conv1D)) and n})


def lora_targets(model: nn.Module, config: ModelConfig) -> list[str]:
    """The modules LoRA wraps: the architecture's query/value projections, else ``config.lora_targets``."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    targets = config.lora_targets or LORA_TARGETS.get(model_type, ["q_proj", "v_proj"])
    names = _linear_names(model)
    missing = [t for t in targets if t not in names]
    if missing:
        raise ModelError(
            f"LoRA target module(s) {', '.join(missing)} not in this {model_type or 'model'}; its linear "
            f"modules are: {', '.join(names)} (set --model.lora_targets)"
        )
    return list(targets)


def _apply_lora(model: nn.Module, config: ModelConfig, log) -> nn.Module:
    from peft import LoraConfig, inject_adapter_in_model

    targets = lora_targets(model, config)
    fused = getattr(model.config, "model_type", None) == "gpt2"
    peft_config = LoraConfig(
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        target_modules=targets,
        lora_dropout=0.0,
        fan_in_fan_out=fused,
        bias="none",
    )
    with torch.random.fork_rng(devices=[]):  # PEFT draws A from the global generator: leave the caller's alone
        model = inject_adapter_in_model(peft_config, model)
    # ... and redraw A from an explicit generator (PEFT's init: Kaiming-uniform with a = sqrt(5); B stays 0),
    # so a freshly prepared base starts from the same adapter and replay is exact.
    gen = torch.Generator().manual_seed(_LORA_SEED)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_A." in name:  # drawn on the CPU: the same adapter whatever the device
                a = torch.empty(p.shape, dtype=torch.float32)
                nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=gen)
                p.copy_(a)
    for name, p in model.named_parameters():
        p.requires_grad_("lora_" in name)
    note = " (GPT-2's fused q/k/v projection: one LoRA pair on all three)" if fused else ""
    log(f"LoRA r={config.lora_r} alpha={config.lora_alpha} on {', '.join(targets)}{note}")
    return model


def _apply_prefix(model: nn.Module, config: ModelConfig, kind: str, tokenizer, log) -> nn.Module:
    from zotune.prefix import PrefixLM

    if kind != "causal":
        raise ModelError(
            "prefix tuning supports causal LMs only (masked LMs take no key/value prefix); "
            "use --model.tuning lora or head"
        )
    special = set(getattr(tokenizer, "all_special_ids", None) or [])
    vocab = model.get_input_embeddings().weight.shape[0]
    gen = torch.Generator().manual_seed(_PREFIX_SEED)
    tokens = [t for t in torch.randperm(vocab, generator=gen).tolist() if t not in special][: config.prefix_tokens]
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        wrapped = PrefixLM(model, torch.tensor(tokens))
    except (TypeError, ValueError) as err:
        raise ModelError(f"prefix tuning does not work with {type(model).__name__}: {err}") from None
    log(
        f"prefix tuning: {config.prefix_tokens} tokens per layer in {len(wrapped.prefix.layers)} layers, "
        "initialised from real tokens' keys and values"
    )
    return wrapped


def _apply_head(model: nn.Module, log) -> nn.Module:
    head = model.get_output_embeddings()
    if head is None or not hasattr(head, "weight"):
        raise ModelError(f"{type(model).__name__} has no output embedding: head tuning needs one")
    chosen = {id(head.weight)} | ({id(head.bias)} if getattr(head, "bias", None) is not None else set())
    for p in model.parameters():
        p.requires_grad_(id(p) in chosen)
    embeddings = model.get_input_embeddings()
    if embeddings is not None and embeddings.weight is head.weight:
        log("head tuning: the output layer is tied to the input embeddings; training it moves both")
    return model


def apply_tuning(
    model: nn.Module, config: ModelConfig, kind: str = "causal", tokenizer=None, *, log: Callable[[str], None] = print
) -> nn.Module:
    """Set up ``config.tuning`` on ``model``: returns the model to train (maybe a wrapper), trainable set chosen.

    ``full`` leaves ``model`` as :func:`zotune.models.load_model` made it (``model.trainable``); the other
    modes choose the trainable parameters themselves. ``tokenizer`` (optional) keeps special tokens out of
    the prefix initialisation. Deterministic: the same model and config give the
    same trainable tensors, which is what replaying a trajectory needs.

    Example::

        loaded = load_model(config)
        model = apply_tuning(loaded.model, ModelConfig(name=..., tuning="lora"), loaded.kind, loaded.tokenizer)
        opt = MeZO([(n, p) for n, p in model.named_parameters() if p.requires_grad], lr=1e-4)
    """
    if config.tuning == "full" or getattr(model, "zotune_tuning", None) == config.tuning:
        return model
    if getattr(model, "zotune_tuning", None) is not None:
        raise ModelError(f"this model is already set up for {model.zotune_tuning} tuning, not {config.tuning}")
    if config.trainable != ["*"]:
        log(f"model.trainable is ignored with tuning {config.tuning}")
    if config.tuning == "lora":
        model = _apply_lora(model, config, log)
    elif config.tuning == "prefix":
        model = _apply_prefix(model, config, kind, tokenizer, log)
    else:
        model = _apply_head(model, log)
    model.zotune_tuning = config.tuning
    return model


def tune_loaded(loaded: LoadedModel, config: ModelConfig, *, log: Callable[[str], None] = print) -> LoadedModel:
    """:func:`apply_tuning` on a :class:`LoadedModel`."""
    model = apply_tuning(loaded.model, config, loaded.kind, loaded.tokenizer, log=log)
    return loaded if model is loaded.model else dataclasses.replace(loaded, model=model)


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Fold LoRA's update into the wrapped weights and put the plain layers back (for ``save_pretrained``)."""
    from peft.tuners.lora import LoraLayer

    for name, module in list(model.named_modules()):
        if isinstance(module, LoraLayer):
            module.merge()
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, module.get_base_layer())
    if hasattr(model, "peft_config"):
        del model.peft_config
    return model
