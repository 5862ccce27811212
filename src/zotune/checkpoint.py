"""Files a run writes, each atomically: a crash never leaves a half-written one under its final name."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path

import torch

__all__ = ["load_tensors", "read_json", "save_tensors", "write_json"]


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


def read_json(path: str | os.PathLike):
    with open(path) as f:
        return json.load(f)


def save_tensors(path: str | os.PathLike, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None) -> None:
    """Save tensors as safetensors; refuses NaN or infinite values (they would poison every later load)."""
    from safetensors.torch import save_file

    for name, t in tensors.items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise ValueError(f"refusing to save {name}: it holds NaN or infinite values")
    prepared = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    _atomic(Path(path), lambda tmp: save_file(prepared, tmp, metadata=dict(metadata or {})))


def load_tensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Load a safetensors file (no pickle involved)."""
    from safetensors.torch import load_file

    return load_file(str(path))

