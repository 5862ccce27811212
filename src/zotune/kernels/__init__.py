"""Fast paths for the perturbation sweeps, behind one registry that detects them and falls back.

A backend turns the keyed generator of :mod:`zotune.rng` into in-place tensor work. Each backend
implements two operations on a contiguous, 1-D float32 tensor ``x`` that holds elements
``start .. start + x.numel() - 1`` of a parameter with key ``key``:

- ``fill(x, distribution, seed, key, start)``: ``x[:] = z(seed)``;
- ``axpy(x, distribution, key, start, scale, terms)``: ``x[:] = x * scale + sum(c * z(s) for s, c in terms)``
  with ``terms`` a sequence of one or two ``(seed, coefficient)`` pairs;

and may offer ``sweep``, the same over many whole tensors in one launch (the Triton backend).

``reference`` is always there and defines the numbers; the others must match it up to float32
rounding (``tests/test_kernels.py``). ``select(device)`` picks the fastest backend that can run on
that device; ``ZOTUNE_BACKEND=name`` in the environment, or ``backend=`` in the API, overrides it.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

__all__ = ["Backend", "available", "get", "register", "select"]

Terms = Sequence[tuple[int, float]]


@dataclass(frozen=True)
class Backend:
    """One implementation of the sweeps. ``supports(device)`` says whether it can run there."""

    name: str
    fill: Callable[[torch.Tensor, str, int, int, int], None]
    axpy: Callable[[torch.Tensor, str, int, int, float, Terms], None]
    supports: Callable[[torch.device], bool]
    priority: int = 0  # higher wins in select()
    chunk: int = 1 << 20  # elements per call: bounds any temporary the backend allocates
    # words(out, seed, key, start): out (1-D uint32 NumPy array) <- the rounding stream; None: the reference
    words: Callable[[object, int, int, int], None] | None = None
    # words also fills a 1-D int32 torch tensor where the data lies (the same bits): no host round trip
    device_words: bool = False
    # sweep(tensors, keys, starts, distribution, terms, *, scale, rounding_seed): the multi-tensor sweep, whole
    # tensors in their own dtype in one launch (one or two terms, or sweep_terms'); None: the chunked axpy path
    sweep: Callable[..., None] | None = None
    # sweep_terms(distribution): how many terms one sweep call takes for that distribution; None: two
    sweep_terms: Callable[[str], int] | None = None
    # masked_axpy(x, distribution, key, start, scale, terms, bits): axpy along m * z, m the packed mask bits of
    # x's elements (Sparse-MeZO); pack_mask(x, threshold, bits): bits <- |x| <= threshold, packed 8 a byte.
    # None: functional's torch path (the same numbers)
    masked_axpy: Callable[..., None] | None = None
    pack_mask: Callable[[torch.Tensor, float, torch.Tensor], None] | None = None


_REGISTRY: dict[str, Backend] = {}


def register(backend: Backend) -> Backend:
    """Add a backend; a duplicate or empty name is a programming error."""
    if not backend.name or not backend.name.isidentifier():
        raise ValueError(f"backend name must be an identifier, got {backend.name!r}")
    if backend.name in _REGISTRY:
        raise ValueError(f"backend {backend.name!r} is already registered")
    _REGISTRY[backend.name] = backend
    return backend


def available() -> list[str]:
    """Names of the registered backends, fastest first."""
    return [b.name for b in sorted(_REGISTRY.values(), key=lambda b: -b.priority)]


def get(name: str) -> Backend:
    """The backend called ``name``; a clear error listing the choices otherwise."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown backend {name!r}; available: {', '.join(available())}") from None


def select(device: torch.device | str, name: str | None = None) -> Backend:
    """The backend to use on ``device``: ``name`` if given, else $ZOTUNE_BACKEND, else the fastest."""
    device = torch.device(device)
    name = name or os.environ.get("ZOTUNE_BACKEND") or None
    if name is not None:
        backend = get(name)
        if not backend.supports(device):
            raise ValueError(f"backend {name!r} cannot run on device {device}")
        return backend
    for backend_name in available():
        backend = _REGISTRY[backend_name]
        if backend.supports(device):
            return backend
    raise RuntimeError(f"no backend supports device {device}")  # unreachable: reference supports all


from zotune.kernels import reference as _reference  # noqa: E402  (registers itself)

register(_reference.BACKEND)

try:  # the numba CPU kernel is optional: without numba the reference path runs
    from zotune.kernels import cpu as _cpu  # noqa: E402
except ImportError:  # pragma: no cover - depends on the environment
    _cpu = None
if _cpu is not None and _cpu.BACKEND is not None:
    register(_cpu.BACKEND)

try:  # the Triton GPU kernels are optional: without triton (or a GPU) the other backends run
    from zotune.kernels import gpu as _gpu  # noqa: E402
except Exception:  # pragma: no cover - no triton, or a triton that cannot load here: run without it
    _gpu = None
if _gpu is not None:
    register(_gpu.BACKEND)  # supports() only CUDA devices: select('cpu') is unaffected
