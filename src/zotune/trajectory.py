"""The trajectory file: a whole MeZO run as one seed plus a list of projected gradients.

MeZO's update is determined by the step's seed and one scalar (paper §2.1, "Storage
efficiency"), so a run can be stored in a few hundred kilobytes and replayed onto the base
model without data or forward passes: :func:`zotune.replay` (:mod:`zotune.optim.replay`). This module
is the format alone (records, reader, writer) and imports nothing from :mod:`zotune.optim`.

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

Additions for the variants of paper §2.2 / Appendix B (still version 1: a file of plain MeZO is
byte for byte what it was, and every older file reads and replays as before):

    tag "N"  a step with n > 1 perturbations (n-SPSA):
             step u32, n u16, then projected_grad f32 per perturbation, then lr f32 per group;
             perturbation j has seed ``step_seed(header["seed"], t, j)``
    tag "L"  per-tensor scales s_l of the next step record (layerwise variants):
             step u32, then f32 per parameter of the header's table (for "grad-norm" these are the
             c_l: the step perturbed along z / c_l and updated along c_l z)
    tag "P"  a per-layer probe pass (the "grad-norm" variant), before the records of its step:
             step u32, probes u16, sweeps applied u32 (all of them unless interrupted). Layer i
             (header "layer_groups") was perturbed by +eps z, -2eps z, +eps z per probe r, z of seed
             ``zotune.optim.variants.layer_probe_seed(seed, step, i, r, len(layer_groups))``;
             an interrupted pass was undone by one more sweep of the carried multiple

    tag "K"  the estimator's extra scalars of the next step record (HiZOO's curvature kappa):
             step u32, count u8, then f32 per value

    header keys, always written:
      "distribution"     the directions' kind, a name of zotune.optim.directions: "gaussian" (MeZO's),
                         "rademacher", "gaussian-fast" (a Gaussian from 16-bit uniforms, zotune.rng),
                         "sphere" (Gaussian rescaled onto the sphere of radius sqrt(d)),
                         "lowrank" (U V^T / sqrt(rank) on matrices), "subzero" (U Z V^T, U and V
                         orthonormal) or "subspace" (P Psi, P orthonormal)

    header keys, present only when not the default:
      "estimator"        a name of zotune.optim.estimators.ESTIMATORS other than the default "two-sided":
                         "one-sided", or "fzoo" (its "N" records hold the normalized coefficients
                         (l_j - l_0) / (eps sigma), so replay needs nothing more), or "hizoo" ("S" records
                         hold c, a "K" record before each its kappa), or "kerzoo" / "kerzoo-linear" (the
                         kernel-weighted coefficients; each direction's r comes from its seed), or "grzo" / "grzo-raw"
                         (GRZO: an "N" record holds one coefficient per row of the step's batch, its
                         directions U (.) r_i s_i^T regenerated from the step's seed: optim.flipout);
                         "forward-gradient" marks a trajectory
                         of plain updates without perturbation sweeps (written by
                         zotune.optim.forward_grad), replayed as single-sweep updates
      "n_perturbations"  informational: the optimizer's n (or its schedule's description)
      "lowrank"          {"rank", "every"}: the factors' rank and the steps between draws of V (of P for
                         "subspace", of U and V for "subzero"), with a "distribution" of those kinds
      "sparsity"         Sparse-MeZO: the fraction of each matrix left still (masks from each step's weights)
      "batched"          true: each step's losses were taken on perturbed copies in one batched forward, the
                         weights never perturbed in place, so replay repeats the updates only (no probe sweeps)
      "layerwise"        "param-norm" or "grad-norm"
      "layer_groups"     grad-norm: the layers, as lists of indices into the parameter table
      "grad_norm_every", "grad_norm_probes"   grad-norm: informational
      "variant"          the update rule: {"name": "momentum" | "adam", "beta1", "beta2",
                         "adam_eps", "window", "state": "history" | "stored"}, or {"name": "hizoo",
                         "alpha"} (its diagonal s evolves from the seeds and the "K" records alone), or
                         {"name": "muon"} (ZO-Muon: each update rebuilt from the seeds and coefficients), or
                         {"name": "grzo"} (with "sparsity" for Sparse-GRZO; estimator "grzo" or "grzo-raw")

A skip record's phase is the 1-based index of the loss evaluation that came out non-finite
(two-sided: 2j+1 for L+_j, 2j+2 for L-_j; one-sided and fzoo: 1 for L(theta), j+2 for L+_j); a step
whose losses were finite but whose estimate was not (fzoo with equal perturbed losses) records its last.
"""

from __future__ import annotations

import json
import os
import struct
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from zotune.errors import UserError

__all__ = [
    "Extras",
    "Flush",
    "Hyper",
    "LayerProbe",
    "LayerScales",
    "MultiStep",
    "Skip",
    "Step",
    "Trajectory",
    "TrajectoryError",
    "TrajectoryWriter",
    "read_trajectory",
]

MAGIC = b"ZOTRAJ"
VERSION = 1
_PREAMBLE = struct.Struct("<6sHI")
_CHECK = struct.Struct("<H")


class TrajectoryError(UserError):
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


@dataclass(frozen=True)
class MultiStep:
    """An applied step with n > 1 perturbations: one projected gradient per perturbation."""

    step: int
    projected_grads: tuple[float, ...]
    lrs: tuple[float, ...]


@dataclass(frozen=True)
class LayerScales:
    """The per-tensor scales s_l that the next step record of ``step`` used (layerwise variants)."""

    step: int
    scales: tuple[float, ...]


@dataclass(frozen=True)
class Extras:
    """The estimator's extra scalars of the next step record of ``step`` (HiZOO's curvature kappa)."""

    step: int
    values: tuple[float, ...]


@dataclass(frozen=True)
class LayerProbe:
    """The per-layer probe sweeps of the gradient-norm variant at ``step`` (``applied`` of them)."""

    step: int
    probes: int
    applied: int


Record = Hyper | Step | Skip | Flush | MultiStep | LayerScales | LayerProbe | Extras
_MULTI_HEAD = struct.Struct("<IH")
_EXTRAS_HEAD = struct.Struct("<IB")


def _layouts(n_groups: int, n_params: int = 0) -> dict[bytes, struct.Struct]:
    return {
        b"H": struct.Struct(f"<f{n_groups}f"),
        b"S": struct.Struct(f"<If{n_groups}f"),
        b"X": struct.Struct("<IB"),
        b"F": struct.Struct("<I"),
        b"L": struct.Struct(f"<I{n_params}f"),
        b"P": struct.Struct("<IHI"),
        b"N": _MULTI_HEAD,  # a prefix: the record's length depends on its n
        b"K": _EXTRAS_HEAD,  # a prefix: the record's length depends on its count
    }


def _multi_layout(n: int, n_groups: int) -> struct.Struct:
    return struct.Struct(f"<IH{n}f{n_groups}f")


def _check(tag: bytes, payload: bytes) -> bytes:
    return _CHECK.pack(zlib.crc32(tag + payload) & 0xFFFF)


def _pack(record: Record, layouts) -> bytes:
    if isinstance(record, Hyper):
        tag, payload = b"H", layouts[b"H"].pack(record.eps, *record.weight_decays)
    elif isinstance(record, Step):
        tag, payload = b"S", layouts[b"S"].pack(record.step, record.projected_grad, *record.lrs)
    elif isinstance(record, Skip):
        tag, payload = b"X", layouts[b"X"].pack(record.step, record.phase)
    elif isinstance(record, MultiStep):
        layout = _multi_layout(len(record.projected_grads), layouts[b"H"].size // 4 - 1)
        tag, payload = b"N", layout.pack(record.step, len(record.projected_grads), *record.projected_grads, *record.lrs)
    elif isinstance(record, LayerScales):
        tag, payload = b"L", layouts[b"L"].pack(record.step, *record.scales)
    elif isinstance(record, LayerProbe):
        tag, payload = b"P", layouts[b"P"].pack(record.step, record.probes, record.applied)
    elif isinstance(record, Extras):
        tag, payload = b"K", struct.pack(f"<IB{len(record.values)}f", record.step, len(record.values), *record.values)
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
    if tag == b"N":
        n = values[1]
        return MultiStep(values[0], tuple(values[2 : 2 + n]), tuple(values[2 + n :]))
    if tag == b"L":
        return LayerScales(values[0], tuple(values[1:]))
    if tag == b"P":
        return LayerProbe(*values)
    if tag == b"K":
        return Extras(values[0], tuple(values[2:]))
    return Flush(values[0])


@dataclass
class Trajectory:
    """A parsed trajectory: the JSON header and the records in order."""

    header: dict
    records: list[Record]

    @property
    def steps(self) -> list[Step | MultiStep]:
        return [r for r in self.records if isinstance(r, (Step, MultiStep))]

    @property
    def n_steps(self) -> int:
        """The optimizer steps recorded, applied or skipped (a run's step count)."""
        return sum(isinstance(r, (Step, MultiStep, Skip)) for r in self.records)


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
    try:  # the checksum matched: a header that does not parse was written wrong, not damaged since
        header = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise TrajectoryError(f"{path}: not a zotune trajectory (its header is not JSON: {err})") from None
    if not (
        isinstance(header, dict)
        and isinstance(header.get("groups"), list)
        and isinstance(header.get("params"), list)
        and isinstance(header.get("seed"), int)
    ):
        raise TrajectoryError(f"{path}: not a zotune trajectory (its header lacks the seed, params or groups)")
    return header, end + 4


def read_trajectory(path: str | os.PathLike, *, size: int | None = None) -> Trajectory:
    """Parse a trajectory file; a truncated or corrupted one raises :class:`TrajectoryError` naming the record.

    ``size``: read only the first ``size`` bytes (the file as a checkpoint saw it).
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            data = f.read() if size is None else f.read(size)
    except OSError as err:
        raise TrajectoryError(f"cannot read trajectory {path}: {err.strerror}") from None
    header, pos = _read_header(data, path)
    n_groups = len(header["groups"])
    layouts = _layouts(n_groups, len(header["params"]))
    records: list[Record] = []
    while pos < len(data):
        n = len(records)
        tag = data[pos : pos + 1]
        layout = layouts.get(tag)
        if layout is None:
            raise TrajectoryError(f"{path}: corrupted trajectory: record {n} (byte {pos}) has unknown type {tag!r}")
        if tag == b"N" and pos + 1 + _MULTI_HEAD.size <= len(data):
            layout = _multi_layout(_MULTI_HEAD.unpack_from(data, pos + 1)[1], n_groups)
        elif tag == b"K" and pos + 1 + _EXTRAS_HEAD.size <= len(data):
            layout = struct.Struct(f"<IB{_EXTRAS_HEAD.unpack_from(data, pos + 1)[1]}f")
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
_IDENTITY = (
    "seed",
    "distribution",
    "fuse_next",
    "stochastic_rounding",
    "params",
    "groups",
    "estimator",
    "layerwise",
    "variant",
    "layer_groups",
    "lowrank",
    "sparsity",
    "batched",
)


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
        self._layouts = _layouts(len(self.header["groups"]), len(self.header["params"]))
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
