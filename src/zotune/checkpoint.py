"""Files a run writes, each atomically: a crash never leaves a half-written one under its final name."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path

import torch

from zotune.errors import UserError

__all__ = [
    "SNAPSHOT",
    "CheckpointError",
    "CheckpointMismatch",
    "copy_into",
    "drop_snapshot",
    "load_snapshot",
    "load_tensors",
    "read_header",
    "read_json",
    "save_snapshot",
    "save_tensors",
    "write_json",
]


class CheckpointError(UserError):
    """A file of a run (state.json, summary.json, best.json, a safetensors file) that cannot be read:
    cut short, corrupted, or not the kind of file its name says."""


def _atomic(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".partial")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: str | os.PathLike, data) -> None:
    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(data, f, indent=2, sort_keys=True)
            f.write("\n")

    _atomic(Path(path), write)


def write_text(path: str | os.PathLike, text: str) -> None:
    """Replace a text file whole (a crash leaves the old file or the new one, never half of it)."""

    def write(tmp):
        Path(tmp).write_text(text)

    _atomic(Path(path), write)


def read_json(path: str | os.PathLike):
    """A JSON file a run wrote; one that is cut short or not JSON raises :class:`CheckpointError` naming it."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except UnicodeDecodeError as err:
        raise CheckpointError(
            f"{path}: not a JSON file (not UTF-8 text at byte {err.start}); the file is corrupted"
        ) from None
    except json.JSONDecodeError as err:
        raise CheckpointError(
            f"{path}: not valid JSON ({err.msg} at line {err.lineno} column {err.colno}); "
            f"the file is cut short or corrupted"
        ) from None


_SAFETENSORS_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
}
_CHUNK = 4 << 20  # elements per slice while checking and writing


def save_tensors(
    path: str | os.PathLike, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None
) -> None:
    """Save tensors as safetensors, streamed from their memory; refuses NaN or infinite values.

    Written here rather than with ``safetensors.torch.save_file``, which copies each tensor into a
    bytes object first: saving the best weights mid-run then raised the peak by the largest tensor
    and more (+187 MB for a 113 MB embedding, measured), which an inference-memory optimizer must not.
    The file is the safetensors format (8-byte header length, JSON header, raw little-endian data),
    read back by ``safetensors`` itself (tested); the data goes out slice by slice, so a GPU tensor
    costs one slice of host memory at a time. NaN or infinite values are refused before anything is
    written: they would poison every later load.
    """
    flat = {}
    for name, t in tensors.items():
        if t.dtype not in _SAFETENSORS_DTYPES:
            raise ValueError(f"cannot save {name}: dtype {t.dtype} has no safetensors name")
        flat[name] = t.detach().reshape(-1)  # a view for contiguous tensors (the usual case), else one copy
        if t.is_floating_point():
            for i in range(0, flat[name].numel(), _CHUNK):
                if not torch.isfinite(flat[name][i : i + _CHUNK]).all():
                    raise ValueError(f"refusing to save {name}: it holds NaN or infinite values")
    header: dict = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for name, t in tensors.items():
        size = t.numel() * t.element_size()
        header[name] = {
            "dtype": _SAFETENSORS_DTYPES[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    body = json.dumps(header, separators=(",", ":")).encode("utf-8")
    body += b" " * (-len(body) % 8)  # the data starts 8-byte aligned, as safetensors writes it

    def write(tmp):
        with open(tmp, "wb") as f:
            f.write(len(body).to_bytes(8, "little"))
            f.write(body)
            for t in flat.values():
                for i in range(0, t.numel(), _CHUNK):
                    part = t[i : i + _CHUNK].cpu().contiguous()
                    f.write(part.view(torch.uint8).numpy().data)

    _atomic(Path(path), write)


def load_tensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Load a safetensors file (no pickle involved); one that is cut short or corrupted raises
    :class:`CheckpointError` naming it."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except SafetensorError as err:
        raise CheckpointError(
            f"{path}: not a readable safetensors file ({err}); it is cut short or corrupted"
        ) from None


class CheckpointMismatch(CheckpointError):
    """A safetensors file whose tensors are not among the target's (name or shape), or that is not a
    readable safetensors file at all."""


def _read_safetensors_header(f, path) -> tuple[dict, int]:
    """The JSON header of an open safetensors file (``__metadata__`` included) and where its data starts."""
    head = f.read(8)
    if len(head) < 8:
        raise CheckpointMismatch(f"{path}: not a safetensors file (too short)")
    n = int.from_bytes(head, "little")
    if n > 100 << 20:
        raise CheckpointMismatch(f"{path}: not a safetensors file (header length {n})")
    raw = f.read(n)
    if len(raw) < n:
        raise CheckpointMismatch(
            f"{path}: a truncated safetensors file (its header needs {n} bytes, {len(raw)} follow)"
        )
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise CheckpointMismatch(f"{path}: not a safetensors file (unreadable header)") from None
    if not isinstance(header, dict):
        raise CheckpointMismatch(f"{path}: not a safetensors file (unreadable header)")
    for name, info in header.items():
        if name != "__metadata__" and not _is_entry(info):
            raise CheckpointMismatch(
                f"{path}: not a safetensors file (tensor {name!r} has a malformed entry {str(info)[:80]})"
            )
    return header, 8 + n


def _is_entry(info) -> bool:
    """A header entry as the format defines it: dtype, shape, and ``data_offsets`` ``[begin, end]``."""

    def count(v) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and v >= 0

    if not isinstance(info, dict) or not isinstance(info.get("dtype"), str):
        return False
    shape, offsets = info.get("shape"), info.get("data_offsets")
    return (
        isinstance(shape, list)
        and all(count(d) for d in shape)
        and isinstance(offsets, list)
        and len(offsets) == 2
        and all(count(o) for o in offsets)
        and offsets[0] <= offsets[1]
    )


def read_header(path: str | os.PathLike) -> tuple[dict[str, str], dict[str, list[int]]]:
    """A safetensors file's ``__metadata__`` ({} if none) and its tensors' shapes, without reading them."""
    with open(path, "rb") as f:
        header = _read_safetensors_header(f, path)[0]
    metadata = header.pop("__metadata__", None)
    shapes = {name: list(info["shape"]) for name, info in header.items()}  # every entry checked on reading
    return (dict(metadata) if isinstance(metadata, dict) else {}), shapes


def _read_exactly(f, into: torch.Tensor, path, name: str) -> None:
    """Fill a contiguous CPU tensor from the file's current position."""
    view = into.view(torch.uint8).numpy().data if into.numel() else memoryview(b"")
    if f.readinto(view) != len(view):
        raise CheckpointMismatch(f"{path}: tensor {name!r} is cut short (a truncated file)")


@torch.no_grad()
def copy_into(
    path: str | os.PathLike, targets: Mapping[str, torch.Tensor], *, chunk_bytes: int = 16 << 20
) -> list[str]:
    """Copy a safetensors file's tensors into ``targets`` in place; returns the names.

    Every name and shape is checked before anything is written (:class:`CheckpointMismatch`). The
    bytes are read with plain reads straight into the target's memory (a CPU tensor of the file's
    dtype), or through one buffer of at most ``chunk_bytes`` (another dtype or device): restoring
    the best weights at the end of a run costs no second copy of the model. (``load_tensors`` +
    ``copy_`` held the whole checkpoint, +516 MB for SmolLM2-135M in float32; ``safe_open`` maps the
    file, and the mapped pages count in the process's resident memory as they are read: +257 MB for
    a 256 MB file, measured.)
    """
    dtypes = {v: k for k, v in _SAFETENSORS_DTYPES.items()}
    with open(path, "rb") as f:
        header, data = _read_safetensors_header(f, path)
        header.pop("__metadata__", None)
        for name, info in header.items():
            shape = list(info["shape"])
            if name not in targets or list(targets[name].shape) != shape:
                have = "no such tensor" if name not in targets else f"shape {list(targets[name].shape)}"
                raise CheckpointMismatch(f"{path}: tensor {name!r} {shape} does not fit the model ({have})")
            if info["dtype"] not in dtypes:
                raise CheckpointMismatch(
                    f"{path}: tensor {name!r} has dtype {info['dtype']}, which zotune does not read"
                )
            if data + info["data_offsets"][1] > os.fstat(f.fileno()).st_size:
                raise CheckpointMismatch(f"{path}: tensor {name!r} is cut short (a truncated file)")
            begin, end = info["data_offsets"]
            if end - begin != targets[name].numel() * torch.empty((), dtype=dtypes[info["dtype"]]).element_size():
                raise CheckpointMismatch(f"{path}: tensor {name!r} has {end - begin} bytes for its shape and dtype")
        for name, info in header.items():
            target, dtype = targets[name], dtypes[info["dtype"]]
            begin, end = info["data_offsets"]
            f.seek(data + begin)
            if not target.is_contiguous():  # rare (parameters are contiguous): one tensor's copy
                whole = torch.empty(target.numel(), dtype=dtype)
                _read_exactly(f, whole, path, name)
                target.copy_(whole.view(target.shape))
                continue
            flat = target.view(-1)
            if target.device.type == "cpu" and target.dtype == dtype:
                _read_exactly(f, flat, path, name)  # straight into the weights
                continue
            step = max(1, chunk_bytes // torch.empty((), dtype=dtype).element_size())
            buffer = torch.empty(min(step, max(1, target.numel())), dtype=dtype)
            for start in range(0, target.numel(), step):
                part = buffer[: min(step, target.numel() - start)]
                _read_exactly(f, part, path, name)
                flat[start : start + part.numel()].copy_(part)
    return list(header)


# -- the resume snapshot: a run's trainable weights at its state's step ------------------------------

SNAPSHOT = Path("resume") / "model.safetensors"  # in a run directory: the weights at state.json's step
_MOMENT = "zotune.moment."  # the snapshot's names of a stored-state optimizer's moments (beside the weights)


def save_snapshot(run_dir: Path, step: int, trajectory_bytes, trainable, moments, log) -> None:
    """The trainable weights exactly as they are (a fused perturbation included), tagged with the step
    and the trajectory's length, and the optimizer's stored moments (stored-state momentum/Adam), which
    resume would otherwise rebuild. A failure (a full disk, non-finite weights) drops the snapshot and
    says so: resume can still replay the trajectory."""
    try:
        save_tensors(
            run_dir / SNAPSHOT,
            {**dict(trainable), **{_MOMENT + n: t for n, t in moments.items()}},
            {"step": str(step), "trajectory_bytes": str(trajectory_bytes)},
        )
    except (OSError, ValueError) as err:
        drop_snapshot(run_dir)
        log(f"warning: no weights saved for --resume ({err}); it will replay the trajectory")


def drop_snapshot(run_dir: Path) -> None:
    (run_dir / SNAPSHOT).unlink(missing_ok=True)
    with contextlib.suppress(OSError):  # the folder goes too when nothing else is in it
        (run_dir / SNAPSHOT).parent.rmdir()


def load_snapshot(run_dir: Path, step: int, trajectory_bytes, trainable) -> dict | None:
    """Load the snapshot into the trainable weights if it is the state's (same step and trajectory length).

    Returns the saved moments (``{}`` when there are none), or None when nothing was loaded (no
    snapshot, another step's, other tensors, or a damaged file: the caller replays instead).
    """
    path = run_dir / SNAPSHOT
    if not path.is_file():
        return None
    try:
        meta, shapes = read_header(path)
        if meta.get("step") != str(step) or meta.get("trajectory_bytes") != str(trajectory_bytes):
            return None  # an older save's, or the state was written by a version without snapshots
        weights = {n: s for n, s in shapes.items() if not n.startswith(_MOMENT)}
        if weights != {n: list(p.shape) for n, p in trainable}:  # every tensor, or replay would mix the two
            return None
        moments = {n: torch.empty(s, dtype=torch.float32) for n, s in shapes.items() if n.startswith(_MOMENT)}
        copy_into(path, {**dict(trainable), **moments})
    except CheckpointMismatch:
        return None
    return {n[len(_MOMENT) :]: t for n, t in moments.items()}
