"""Prefix tuning as MeZO's paper runs it: trained key/value prefixes in every attention layer.

Each layer gets ``k`` (default 5) prefix keys and values, initialised from the model's own key/value
states on ``k`` real vocabulary tokens and trained directly (no reparameterisation MLP); Malladi et al.
2023, §3 and Appendix E.5, after Li & Liang 2021. The prefixes reach attention as ``past_key_values``:
every forward builds a ``DynamicCache`` from the parameters and extends the attention mask by ``k``, so
nothing inside the model is patched and any Hugging Face causal LM that accepts a cache works. Positions
of the real tokens start at ``k``, as in PEFT's prefix tuning.

Causal LMs only: masked LMs (RoBERTa, BERT) take no cache in their forward.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["PrefixLM", "PrefixTable"]


class PrefixTable(nn.Module):
    """Per-layer prefix keys and values: ``layers.<i>.key`` / ``.value``, each (kv_heads, k, head_dim)."""

    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor]):
        super().__init__()
        self.layers = nn.ModuleList()
        for key, value in zip(keys, values):
            layer = nn.Module()
            layer.key = nn.Parameter(key.detach().clone())
            layer.value = nn.Parameter(value.detach().clone())
            self.layers.append(layer)

    @property
    def length(self) -> int:
        return self.layers[0].key.shape[1]

    def cache(self, batch: int):
        from transformers import DynamicCache

        cache = DynamicCache()
        for i, layer in enumerate(self.layers):
            shape = (batch, *layer.key.shape)
            cache.update(layer.key.unsqueeze(0).expand(shape), layer.value.unsqueeze(0).expand(shape), i)
        return cache


@torch.no_grad()
def _real_token_states(model: nn.Module, tokens: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    out = model(input_ids=tokens[None], attention_mask=torch.ones_like(tokens)[None], use_cache=True)
    cache = out.past_key_values
    if cache is None or not hasattr(cache, "layers"):
        raise ValueError(f"{type(model).__name__} returns no key/value cache: prefix tuning needs one")
    return [layer.keys[0] for layer in cache.layers], [layer.values[0] for layer in cache.layers]


class PrefixLM(nn.Module):
    """A causal LM with trained attention prefixes; otherwise it behaves as the wrapped model.

    Parameter names are the wrapped model's under ``model.`` and the prefixes' under ``prefix.``
    (``prefix.layers.3.key``). Attributes the wrapper lacks (``config``, ``get_output_embeddings``,
    ``save_pretrained``, ...) are the wrapped model's, so :func:`zotune.objectives.selective_head` and
    the rest of zotune see an ordinary LM. ``generate`` is a plain greedy loop without a cache.

    Args:
        model: a Hugging Face causal LM.
        tokens: the 1-D token ids whose key/value states initialise the prefixes (their length is k).

    Example::

        lm = PrefixLM(model, torch.tensor([17, 305, 9, 1200, 42]))
        lm(input_ids=ids, attention_mask=mask).logits
    """

    def __init__(self, model: nn.Module, tokens: torch.Tensor):
        super().__init__()
        self.model = model
        device = next(model.parameters()).device
        keys, values = _real_token_states(model, tokens.to(device))
        self.prefix = PrefixTable(keys, values)

    @classmethod
    def from_tensors(cls, model: nn.Module, tensors: dict[str, torch.Tensor]) -> PrefixLM:
        """A PrefixLM with given prefixes (``layers.<i>.key`` / ``.value``, as ``prefix.safetensors`` holds them)."""
        layers = len({name.split(".")[1] for name in tensors if name.startswith("layers.")})
        try:
            keys = [tensors[f"layers.{i}.key"] for i in range(layers)]
            values = [tensors[f"layers.{i}.value"] for i in range(layers)]
        except KeyError as err:
            raise ValueError(f"the prefix tensors lack {err.args[0]!r}") from None
        wrapped = cls.__new__(cls)
        nn.Module.__init__(wrapped)
        wrapped.model = model
        device = next(model.parameters()).device
        wrapped.prefix = PrefixTable([k.to(device) for k in keys], [v.to(device) for v in values])
        return wrapped

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("model"), name)

    def forward(self, input_ids=None, attention_mask=None, labels=None, **kwargs):
        batch = input_ids.shape[0] if input_ids is not None else kwargs["inputs_embeds"].shape[0]
        seq = input_ids.shape[1] if input_ids is not None else kwargs["inputs_embeds"].shape[1]
        device = self.prefix.layers[0].key.device
        if attention_mask is None:
            attention_mask = torch.ones((batch, seq), dtype=torch.long, device=device)
        k = self.prefix.length
        mask = torch.cat(
            [torch.ones((batch, k), dtype=attention_mask.dtype, device=attention_mask.device), attention_mask], dim=1
        )
        kwargs.pop("use_cache", None)
        if labels is not None:  # named in the signature: the HF Trainer keeps only the columns forward names
            kwargs["labels"] = labels
        return self.model(
            input_ids=input_ids,
            attention_mask=mask,
            past_key_values=self.prefix.cache(batch),
            use_cache=False,
            **kwargs,
        )

    @torch.no_grad()
    def generate(self, input_ids, attention_mask=None, max_new_tokens: int = 20, eos_token_id=None, **_ignored):
        """Greedy decoding (recomputes the whole sequence per token: fine for short answers)."""
        eos = eos_token_id if eos_token_id is not None else getattr(self.model.config, "eos_token_id", None)
        eos = set(eos if isinstance(eos, (list, tuple)) else [eos]) - {None}
        ids = input_ids
        mask = attention_mask if attention_mask is not None else torch.ones_like(ids)
        finished = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
        for _ in range(max_new_tokens):
            logits = self(input_ids=ids, attention_mask=mask).logits[:, -1]
            nxt = logits.argmax(-1)
            ids = torch.cat([ids, nxt[:, None]], dim=1)
            mask = torch.cat([mask, torch.ones_like(nxt)[:, None]], dim=1)
            finished |= torch.tensor([int(t) in eos for t in nxt], device=ids.device)
            if bool(finished.all()):
                break
        return ids
