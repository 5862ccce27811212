"""Predict the peak GPU memory of inference, MeZO (full, LoRA, prefix) and backprop fine-tuning.

From a model's shapes alone (its config; the weights are never loaded): the parameter count comes
from building the model on the ``meta`` device, the activation terms from its hidden size, layers,
heads, FFN and vocabulary sizes. The estimates are deliberately simple and documented term by term:

- weights: ``P * w`` bytes (``w`` = 2 for float16/bfloat16, 4 for float32);
- inference activations (no grad, fused attention): the residual stream and its temporaries
  ``4 b s h w``, the MLP intermediate ``2 b s f w``, and the logits with a float32 loss
  ``b s V (w + 8)`` (the logits, their float32 upcast and the log-softmax);
- MeZO (zotune): weights + inference activations + the sweep's bookkeeping (Triton: 4 bytes per
  2048 elements; no z is stored, nothing per parameter);
- reference-style MeZO (``torch.normal`` + out-of-place update): + two copies of the largest tensor;
- MeZO + LoRA (rank r on the query and value projections, as in the MeZO paper): + the adapters;
  MeZO + prefix (k tokens per layer): + ``2 L k h`` parameters, activations at ``s + k``;
- MeZO-momentum / MeZO-Adam with ``state="stored"``: + one / two float32 tensors per parameter (the
  default ``state="history"`` recomputes them and costs what MeZO costs);
- the forward gradient (``zotune.ForwardGradient``, ``torch.func.jvp``): + the tangents (a copy of the
  weights) + the dual activations (a second set, as large as inference's);
- backprop fine-tuning with Adam in mixed precision (float32 weights under autocast, as
  ``torch.autocast`` training does): float32 weights, gradients and two Adam moments, 16 bytes per
  parameter whatever ``dtype`` (the forward's matmuls run in it) + the activations saved for the
  backward pass, ``L b s h (34 + 5 a s / h)`` bytes at 16 bits (Korthikanti et al., 2022, Table 2;
  the attention-score term drops with fused attention) + the logits' gradient.

Example::

    zotune memory --model facebook/opt-13b --gpu-memory 80GB --batch 16 --seq 64
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from zotune.errors import UserError

__all__ = ["DTYPES", "Estimate", "Shapes", "estimate", "parse_bytes", "report", "shapes_from_config"]

# OPT sizes (Zhang et al., 2022): hidden size, layers, heads, FFN size; for names like "opt-13b"
_OPT = {
    "125m": (768, 12, 12, 3072),
    "350m": (1024, 24, 16, 4096),
    "1.3b": (2048, 24, 32, 8192),
    "2.7b": (2560, 32, 32, 10240),
    "6.7b": (4096, 32, 32, 16384),
    "13b": (5120, 40, 40, 20480),
    "30b": (7168, 48, 56, 28672),
    "66b": (9216, 64, 72, 36864),
}
_WIDTH = {"float16": 2, "bfloat16": 2, "float32": 4}
DTYPES = tuple(sorted(_WIDTH))  # the dtypes an estimate knows


@dataclass(frozen=True)
class Shapes:
    """What the estimate needs from a model: parameter counts and activation sizes."""

    params: int  # trainable parameters (tied weights counted once)
    largest: int  # elements of the largest tensor
    hidden: int
    layers: int
    heads: int
    ffn: int
    vocab: int


@dataclass(frozen=True)
class Estimate:
    """Predicted peak bytes of each way of running the model."""

    inference: int
    mezo: int
    mezo_reference_style: int
    mezo_lora: int
    mezo_prefix: int
    backprop_adam: int
    mezo_momentum_stored: int = 0
    mezo_adam_stored: int = 0
    forward_gradient: int = 0

    def rows(self) -> list[tuple[str, int]]:
        return [
            ("inference", self.inference),
            ("MeZO (zotune)", self.mezo),
            ("MeZO, reference-style", self.mezo_reference_style),
            ("MeZO + LoRA", self.mezo_lora),
            ("MeZO + prefix", self.mezo_prefix),
            ("MeZO-momentum, stored state", self.mezo_momentum_stored),
            ("MeZO-Adam, stored state", self.mezo_adam_stored),
            ("forward gradient (jvp)", self.forward_gradient),
            ("backprop fine-tuning (Adam)", self.backprop_adam),
        ]


def parse_bytes(text: str) -> int:
    """'80GB', '80GiB', '24g', '512MB' -> bytes (GB and GiB both read as 2**30, as GPU makers mean it)."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmgt]?)(i?b?)\s*", text.lower())
    if not match:
        raise UserError(f"cannot read a memory size from {text!r}; write e.g. 80GB or 24GiB")
    return int(float(match.group(1)) * 1024 ** "_kmgt".index(match.group(2) or "_"))


def _load_config(model: str):
    from transformers import AutoConfig, OPTConfig

    from zotune.models import ModelError, hub_unavailable

    name = model.lower().split("/")[-1]
    if name.startswith("opt-") and name[4:] in _OPT:
        hidden, layers, heads, ffn = _OPT[name[4:]]
        return OPTConfig(
            hidden_size=hidden,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            ffn_dim=ffn,
            word_embed_proj_dim=hidden,
            vocab_size=50272,
        )
    path = Path(model)
    if path.is_file():
        return _config_file(path)
    if path.is_dir():
        try:
            return AutoConfig.from_pretrained(path)
        except (OSError, ValueError) as err:
            raise ModelError(f"{path}: cannot read a model config from this folder ({_first_line(err)})") from None
    tried = (
        f"it is not an OPT size ({', '.join(f'opt-{size}' for size in _OPT)}) and there is no config.json "
        f"file or model folder {path}"
    )
    offline = hub_unavailable()  # unreachable: the local cache at once, not ~25 s of retries first
    try:
        return AutoConfig.from_pretrained(model, local_files_only=offline is not None)
    except (OSError, ValueError) as err:
        if offline:
            raise ModelError(
                f"cannot find model {model!r}: {tried}, it is not in the local Hugging Face cache, "
                f"and the hub was not asked: {offline}"
            ) from None
        raise ModelError(
            f"cannot find model {model!r}: {tried}, and the hub has no config for it: {_first_line(err)}"
        ) from None


def _config_file(path: Path):
    """A model's config.json, as transformers writes it (with its ``model_type``)."""
    from transformers import AutoConfig

    from zotune.models import ModelError

    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        raise ModelError(f"{path}: not a config.json (not UTF-8 text at byte {err.start})") from None
    except json.JSONDecodeError as err:
        raise ModelError(
            f"{path}: not a config.json (invalid JSON: {err.msg} at line {err.lineno} column {err.colno})"
        ) from None
    if not isinstance(data, dict) or not isinstance(data.get("model_type"), str):
        raise ModelError(f'{path}: not a model\'s config.json (no "model_type" in it)')
    model_type = data.pop("model_type")
    try:
        return AutoConfig.for_model(model_type, **data)
    except (TypeError, ValueError) as err:
        raise ModelError(
            f"{path}: transformers cannot build a {model_type!r} config from it ({_first_line(err)})"
        ) from None


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def shapes_from_config(config) -> Shapes:
    """Shapes of the model a transformers config describes, built on the meta device (no memory)."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    tensors = list(model.parameters())  # tied weights appear once
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    hidden = getattr(text, "hidden_size", None) or text.d_model
    return Shapes(
        params=sum(t.numel() for t in tensors),
        largest=max(t.numel() for t in tensors),
        hidden=hidden,
        layers=getattr(text, "num_hidden_layers", None) or text.num_layers,
        heads=getattr(text, "num_attention_heads", None) or text.num_heads,
        ffn=getattr(text, "ffn_dim", None) or getattr(text, "intermediate_size", None) or 4 * hidden,
        vocab=text.vocab_size,
    )


def estimate(
    shapes: Shapes,
    *,
    dtype: str = "float16",
    batch: int = 16,
    seq: int = 64,
    lora_rank: int = 8,
    prefix_tokens: int = 5,
    fused_attention: bool = True,
) -> Estimate:
    """Peak bytes of each way of running the model (see the module docstring for every term)."""
    if dtype not in _WIDTH:
        raise UserError(f"dtype must be one of {sorted(_WIDTH)}, got {dtype!r}")
    if batch < 1 or seq < 1:
        raise UserError(f"batch and seq must be positive, got batch={batch}, seq={seq}")
    w = _WIDTH[dtype]
    s = shapes
    weights = s.params * w

    def activations(tokens: int) -> int:
        bt = batch * tokens
        attention = 0 if fused_attention else 2 * batch * s.heads * tokens * tokens * w
        return 4 * bt * s.hidden * w + 2 * bt * s.ffn * w + attention + bt * s.vocab * (w + 8)

    act = activations(seq)
    inference = weights + act
    mezo = inference + 4 * (s.params // 2048 + s.layers * 16)
    reference_style = inference + 2 * s.largest * w
    lora = 2 * s.layers * lora_rank * (s.hidden + s.hidden) * 2  # A and B on query and value, per layer
    mezo_lora = inference + lora * w
    prefix = 2 * s.layers * prefix_tokens * s.hidden
    mezo_prefix = weights + prefix * w + activations(seq + prefix_tokens)
    scores = 0 if fused_attention else 5 * s.heads * seq / s.hidden
    saved = int(s.layers * batch * seq * s.hidden * (34 + scores) * w / 2)
    states = s.params * 16
    backprop = states + saved + batch * seq * s.vocab * (w + 12)
    return Estimate(
        inference,
        mezo,
        reference_style,
        mezo_lora,
        mezo_prefix,
        backprop,
        mezo_momentum_stored=mezo + 4 * s.params,
        mezo_adam_stored=mezo + 8 * s.params,
        forward_gradient=2 * weights + 2 * act,
    )


def report(
    model: str,
    *,
    gpu_memory: str | None = None,
    dtype: str = "float16",
    batch: int = 16,
    seq: int = 64,
    lora_rank: int = 8,
    prefix_tokens: int = 5,
    eager_attention: bool = False,
) -> str:
    """The table ``zotune memory`` prints: each mode's predicted peak, against inference and ``gpu_memory``.

    ``model`` is a hub id or local directory, a config.json, or an OPT size like ``opt-13b``;
    ``gpu_memory`` (``"80GB"``) adds whether each mode fits one GPU of that size.
    """
    shapes = shapes_from_config(_load_config(model))
    est = estimate(
        shapes,
        dtype=dtype,
        batch=batch,
        seq=seq,
        lora_rank=lora_rank,
        prefix_tokens=prefix_tokens,
        fused_attention=not eager_attention,
    )
    budget = parse_bytes(gpu_memory) if gpu_memory else None
    lines = [f"{model}: {shapes.params / 1e9:.3f}B parameters, {dtype}, batch {batch}, seq {seq}"]
    for name, value in est.rows():
        fits = "" if budget is None else ("  fits" if value <= budget else "  does not fit")
        lines.append(f"  {name:<30} {value / 2**30:9.2f} GiB  ({value / est.inference:5.2f} x inference){fits}")
    return "\n".join(lines)
