"""The trajectory file: a whole MeZO run as one seed plus a list of projected gradients.

MeZO's update is determined by the step's seed and one scalar (paper §2.1, "Storage
efficiency"), so a run can be stored in a few hundred kilobytes and replayed onto the base
model without data or forward passes: :func:`replay`.

Format (version 1, little-endian, no pickle)::

    magic    b"ZOTRAJ"                 6 bytes
    version  u16                       = 1
    length   u32                       bytes of the JSON header
    header   UTF-8 JSON                seed, distribution, options, parameter table, groups
    crc      u32                       zlib.crc32 of the header bytes
    records  tag (1 byte) + payload + u16 check (zlib.crc32(tag + payload) & 0xFFFF)

    tag "H"  hyper-parameters:  eps f32, then weight_decay f32 per group    (first step, and on change)
    tag "S"  an applied step:   step u32, projected_grad f32, then lr f32 per group
    tag "X"  a skipped step:    step u32, phase u8 (1: loss at +eps non-finite, 2: at -eps)
    tag "F"  a flush:           step u32 (the step whose pending +eps perturbation was removed)

Step seeds are not stored: the seed of step t is ``zotune.rng.step_seed(header["seed"], t)``.
An "S" record with two groups takes 19 bytes: 20,000 steps in 380 kB.
"""

from __future__ import annotations

import json
import os
import struct
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from zotune import rng
from zotune.optim import functional as F

__all__ = [
    "Flush",
    "Hyper",
    "Skip",
    "Step",
    "Trajectory",
    "TrajectoryError",
    "TrajectoryWriter",
    "read_trajectory",
    "replay",
]

MAGIC = b"ZOTRAJ"
VERSION = 1
_PREAMBLE = struct.Struct("<6sHI")
_CHECK = struct.Struct("<H")


class TrajectoryError(ValueError):
    """A trajectory file that cannot be read, or that does not fit the model it is applied to."""


@dataclass(frozen=True)
class Hyper:
    eps: float
    weight_decays: tuple[float, ...]


@dataclass(frozen=True)
class Step:
    step: int
    projected_grad: float
    lrs: tuple[float, ...]


@dataclass(frozen=True)
class Skip:
    step: int
    phase: int


@dataclass(frozen=True)
class Flush:
    step: int


Record = Hyper | Step | Skip | Flush


def _layouts(n_groups: int) -> dict[bytes, struct.Struct]:
    return {
        b"H": struct.Struct(f"<f{n_groups}f"),
        b"S": struct.Struct(f"<If{n_groups}f"),
        b"X": struct.Struct("<IB"),
        b"F": struct.Struct("<I"),
    }


def _check(tag: bytes, payload: bytes) -> bytes:
    return _CHECK.pack(zlib.crc32(tag + payload) & 0xFFFF)


def _pack(record: Record, layouts) -> bytes:
    if isinstance(record, Hyper):
        tag, payload = b"H", layouts[b"H"].pack(record.eps, *record.weight_decays)
    elif isinstance(record, Step):
        tag, payload = b"S", layouts[b"S"].pack(record.step, record.projected_grad, *record.lrs)
    elif isinstance(record, Skip):
        tag, payload = b"X", layouts[b"X"].pack(record.step, record.phase)
    else:
        tag, payload = b"F", layouts[b"F"].pack(record.step)
    return tag + payload + _check(tag, payload)


def _unpack(tag: bytes, values: tuple) -> Record:
    if tag == b"H":
        return Hyper(values[0], tuple(values[1:]))
    if tag == b"S":
        return Step(values[0], values[1], tuple(values[2:]))
    if tag == b"X":
        return Skip(values[0], values[1])
    return Flush(values[0])


@dataclass
class Trajectory:
    """A parsed trajectory: the JSON header and the records in order."""

    header: dict
    records: list[Record]

    @property
    def steps(self) -> list[Step]:
        return [r for r in self.records if isinstance(r, Step)]


def _encode_header(header: Mapping) -> bytes:
    body = json.dumps(header, sort_keys=True).encode("utf-8")
    return _PREAMBLE.pack(MAGIC, VERSION, len(body)) + body + struct.pack("<I", zlib.crc32(body))


def _read_header(data: bytes, path) -> tuple[dict, int]:
    if len(data) < _PREAMBLE.size:
        raise TrajectoryError(f"{path}: not a zotune trajectory (file too short for the header)")
    magic, version, length = _PREAMBLE.unpack_from(data)
    if magic != MAGIC:
        raise TrajectoryError(f"{path}: not a zotune trajectory (bad magic bytes {magic!r})")
    if version != VERSION:
        raise TrajectoryError(f"{path}: trajectory format version {version}; this zotune reads version {VERSION}")
    end = _PREAMBLE.size + length
    if len(data) < end + 4:
        raise TrajectoryError(f"{path}: truncated trajectory: the header is incomplete")
    body = data[_PREAMBLE.size : end]
    if struct.unpack_from("<I", data, end)[0] != zlib.crc32(body):
        raise TrajectoryError(f"{path}: corrupted trajectory: the header checksum does not match")
    return json.loads(body), end + 4


def read_trajectory(path: str | os.PathLike) -> Trajectory:
    """Parse a trajectory file; a truncated or corrupted one raises :class:`TrajectoryError` naming the record."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as err:
        raise TrajectoryError(f"cannot read trajectory {path}: {err.strerror}") from None
    header, pos = _read_header(data, path)
    layouts = _layouts(len(header["groups"]))
    records: list[Record] = []
    while pos < len(data):
        n = len(records)
        tag = data[pos : pos + 1]
        layout = layouts.get(tag)
        if layout is None:
            raise TrajectoryError(f"{path}: corrupted trajectory: record {n} (byte {pos}) has unknown type {tag!r}")
        end = pos + 1 + layout.size + _CHECK.size
        if end > len(data):
            raise TrajectoryError(
                f"{path}: truncated trajectory: record {n} (byte {pos}) is incomplete "
                f"({len(data) - pos} of {end - pos} bytes); the {n} records before it are intact"
            )
        payload = data[pos + 1 : pos + 1 + layout.size]
        if data[end - _CHECK.size : end] != _check(tag, payload):
            raise TrajectoryError(f"{path}: corrupted trajectory: record {n} (byte {pos}) fails its checksum")
        records.append(_unpack(tag, layout.unpack(payload)))
        pos = end
    return Trajectory(header, records)


# The parts of a header that must agree for a run to continue an existing file.
_IDENTITY = ("seed", "distribution", "fuse_next", "stochastic_rounding", "params", "groups")


class TrajectoryWriter:
    """Appends records to a trajectory file, flushing after each, so a crash loses at most one record.

    Args:
        path: the file; a new run overwrites it.
        header: the JSON header (see the module docstring).
        resume_at: continue an existing file whose first ``resume_at`` bytes are kept (the rest,
            written after the checkpoint being resumed, is cut off). Its header must match.
    """

    def __init__(self, path: str | os.PathLike, header: Mapping, *, resume_at: int | None = None):
        self.path = Path(path)
        self.header = dict(header)
        self._layouts = _layouts(len(self.header["groups"]))
        if resume_at is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, "wb")
            self._file.write(_encode_header(self.header))
        else:
            try:
                data = self.path.read_bytes()
            except OSError as err:
                raise TrajectoryError(f"cannot resume trajectory {self.path}: {err.strerror}") from None
            existing, _ = _read_header(data, self.path)
            for field in _IDENTITY:
                if existing.get(field) != self.header.get(field):
                    raise TrajectoryError(
                        f"{self.path}: cannot resume: the file's {field!r} differs from this optimizer's"
                    )
            if len(data) < resume_at:
                raise TrajectoryError(
                    f"{self.path}: cannot resume: the checkpoint expects {resume_at} bytes, the file has {len(data)}"
                )
            self._file = open(self.path, "r+b")
            self._file.truncate(resume_at)
            self._file.seek(resume_at)
        self._file.flush()

    def append(self, record: Record) -> None:
        self._file.write(_pack(record, self._layouts))
        self._file.flush()

    def tell(self) -> int:
        """Bytes written so far (what a checkpoint stores to resume this file)."""
        return self._file.tell()

    def close(self) -> None:
        self._file.close()


def _resolve_params(target, header: dict) -> list[torch.Tensor]:
    """The tensors that the header's parameter table names, checked before anything is modified."""
    table = header["params"]
    if isinstance(target, torch.nn.Module):
        if not header.get("named", True):
            raise TrajectoryError(
                "this trajectory was recorded with unnamed parameters (keys are list positions): "
                "pass the same list of tensors to replay, not a module"
            )
        target = dict(target.named_parameters())
    if isinstance(target, Mapping):
        missing = [e["name"] for e in table if e["name"] not in target]
        if missing:
            shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
            raise TrajectoryError(
                f"the model has no parameter named {shown} ({len(missing)} of {len(table)} recorded "
                "parameters missing): this trajectory belongs to another model"
            )
        tensors = [target[e["name"]] for e in table]
    else:
        tensors = list(target)
        if len(tensors) != len(table):
            raise TrajectoryError(f"the trajectory records {len(table)} parameters, {len(tensors)} were given")
    for entry, p in zip(table, tensors):
        if list(p.shape) != entry["shape"] or str(p.dtype).removeprefix("torch.") != entry["dtype"]:
            raise TrajectoryError(
                f"parameter {entry['name']!r} is {str(p.dtype).removeprefix('torch.')} {list(p.shape)} in the "
                f"model but {entry['dtype']} {entry['shape']} in the trajectory: it belongs to another model"
            )
    return tensors


@torch.no_grad()
def replay(target, trajectory, *, exact: bool = True, finish: bool = True, backend: str | None = None):
    """Rebuild fine-tuned weights from the base weights and a trajectory, with no data and no forward pass.

    Args:
        target: the base model (an ``nn.Module``, matched by parameter name), a ``{name: tensor}``
            mapping, or the list of tensors the optimizer was given (for unnamed runs). Modified in place.
        trajectory: a path or a :class:`Trajectory`.
        exact: repeat the optimizer's sweeps one for one (perturb, restore, update), which reproduces
            training bit for bit on the same backend; ``False`` applies each update in a single sweep
            (three times faster, equal up to float rounding).
        finish: remove a perturbation that training had fused in for the next step (``fuse_next``),
            leaving the trained weights. ``False`` leaves it, to resume training from
            ``optimizer.state_dict(flush=False)`` bit for bit.
        backend: as in :func:`zotune.optim.functional.sweep_`.

    Returns:
        ``target``.

    Example::

        model = AutoModelForCausalLM.from_pretrained(base)
        zotune.replay(model, "run/trajectory.zot")
    """
    traj = trajectory if isinstance(trajectory, Trajectory) else read_trajectory(trajectory)
    header = traj.header
    if header.get("first_step", 0) != 0:
        raise TrajectoryError(
            f"this trajectory starts at step {header['first_step']}, not at the base model: "
            "it was started on a resumed run whose earlier steps were not recorded"
        )
    tensors = _resolve_params(target, header)
    keys = [int(e["key"], 16) for e in header["params"]]
    groups = [([tensors[i] for i in g], [keys[i] for i in g]) for g in header["groups"]]
    every = ([t for g in groups for t in g[0]], [k for g in groups for k in g[1]])
    dist, seed0 = header["distribution"], int(header["seed"])
    fused, sr = header["fuse_next"], header["stochastic_rounding"]

    def perturb(step: int, coef: float) -> None:
        F.perturb_(*every, rng.step_seed(seed0, step), coef, distribution=dist, backend=backend)

    eps, wds, pending = None, None, None
    for n, record in enumerate(traj.records):
        if isinstance(record, Hyper):
            eps, wds = record.eps, record.weight_decays
            continue
        if eps is None:
            raise TrajectoryError(f"corrupted trajectory: record {n} comes before any hyper-parameter record")
        if isinstance(record, Flush):
            if pending != record.step:
                raise TrajectoryError(f"corrupted trajectory: record {n} flushes step {record.step}, none pending")
            perturb(record.step, -eps)
            pending = None
            continue
        t = record.step
        if pending is not None and pending != t:
            raise TrajectoryError(f"corrupted trajectory: record {n} is step {t} but step {pending} is pending")
        if isinstance(record, Skip):
            if exact:
                if pending is None:
                    perturb(t, eps)
                perturb(t, -eps if record.phase == 1 else -2 * eps)
                if record.phase == 2:
                    perturb(t, eps)
            elif pending is not None:
                perturb(t, -eps)
            pending = None
            continue
        seed = rng.step_seed(seed0, t)
        if exact:
            if pending is None:
                perturb(t, eps)
            perturb(t, -2 * eps)
        elif pending is not None:
            perturb(t, -eps)
        next_terms = [(rng.step_seed(seed0, t + 1), eps)] if fused and exact else []
        for (params, pkeys), lr, wd in zip(groups, record.lrs, wds):
            scale, coef = F.update_coefficients(lr, wd, eps, record.projected_grad)
            if not exact:
                coef = -lr * record.projected_grad
            F.sweep_(params, pkeys, [(seed, coef), *next_terms], scale=scale, distribution=dist,
                     rounding_seed=seed if sr else None, backend=backend)
        pending = t + 1 if fused and exact else None
    if pending is not None and finish:  # clean weights: remove the perturbation fused in for the next step
        perturb(pending, -eps)
    return target

