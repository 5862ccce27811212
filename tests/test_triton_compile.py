"""The Triton sweep kernels compiled for GPUs on this machine, which has none (issue 19).

Triton's interpreter (tests/test_triton.py) checks what the kernels compute, but not that they compile:
the compiler rejects forms the interpreter runs, and only the compiled code shows whether a full tile
moves in 16-byte vectors or spills. Triton compiles for a named target without a driver (ptxas and
nvdisasm ship in its wheel), so every configuration benchmarks/sass.py reports is compiled here for
sm_90 (H100/H200) as its launch would specialise it, and the properties gpu.py's docstring states are
checked on the machine code.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

triton = pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("sass_benchmark", ROOT / "benchmarks" / "sass.py")
sass = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = sass  # its dataclasses resolve their annotations through sys.modules
_spec.loader.exec_module(sass)

try:
    sass.tool("ptxas"), sass.tool("nvdisasm"), sass.tool("cuobjdump")
except FileNotFoundError as e:  # a Triton wheel without NVIDIA's tools (not the pinned x86_64 Linux one)
    pytest.skip(str(e), allow_module_level=True)


@pytest.fixture(scope="module")
def gpu():
    return sass.load_gpu()


@pytest.fixture(autouse=True)
def _fp_fusion_named(monkeypatch):
    monkeypatch.setenv("TRITON_DEFAULT_FP_FUSION", "1")  # silences Triton 3.9's warning; the launches name it


@pytest.mark.parametrize("config", sass.configs(), ids=lambda c: c.name)
def test_each_sweep_configuration_compiles_for_sm90_without_spills_calls_loops_shared_memory_or_per_element_bounds(
    gpu, config
):
    report = sass.analyse(gpu, config, arch=90)  # fast_path raises on a loop (a backward branch)
    assert report.spills == 0, f"{report.spills} bytes of local memory a thread"
    assert report.calls == 0  # no libdevice or other calls: the Gaussian's math is inline polynomials
    assert report.shared == 0  # no layout conversion through shared memory (and its barriers)
    # full tiles move in 16-byte vectors, but a 16-bit Gaussian tile's row of four lanes: 8 bytes (gaussian-fast's
    # row of eight: 16)
    vector = 64 if config.distribution == "gaussian" and config.dtype != torch.float32 else 128
    assert report.store_bits == vector
    if not config.fill:
        assert report.load_bits == vector
    # a whole tile tests its bounds once (two 64-bit compares), not per element: its branch has no mask
    assert report.wide_compares <= 2
    if config.distribution == "rademacher":
        assert report.per_element["mufu"] == 0  # signs, not transcendentals


def test_gaussian_fast_issues_about_half_the_gaussians_instructions_on_fp16(gpu):
    """What gaussian-fast is for: eight normals a Philox call and Box-Muller on the MUFU (lg2, sqrt, sin, cos: two
    an element a term) rather than polynomials. On fp16 weights, where a thread's vector is one Philox block, it
    measured 28.0 against 50.1 instructions an element (1 term) and 46.6 against 90.4 (2 terms) with Triton 3.9;
    0.65 leaves room for another compiler's scheduling, and still fails if either lever is lost."""
    by_name = {c.name: c for c in sass.configs()}
    for terms in (1, 2):
        fast = sass.analyse(gpu, by_name[f"gaussian-fast {terms}-term fp16"], arch=90)
        plain = sass.analyse(gpu, by_name[f"gaussian {terms}-term fp16"], arch=90)
        assert fast.per_element["mufu"] == 2 * terms
        assert fast.total <= 0.65 * plain.total, (fast.total, plain.total)


@pytest.mark.parametrize(
    "config",
    [c for c in sass.configs() if c.name in ("gaussian 2-term bf16, stochastic rounding", "rademacher 1-term fp16")],
    ids=lambda c: c.name,
)
def test_the_16_bit_sweeps_compile_for_sm80(gpu, config):
    """A100s run bf16/fp16 weights too; their conversions differ from sm_90's."""
    report = sass.analyse(gpu, config, arch=80)
    assert report.spills == 0 and report.registers > 0


def _listing(*rows: str) -> list[str]:
    return [row if row.endswith(":") else f"        /*{16 * i:04x}*/  {row} ;" for i, row in enumerate(rows)]


def test_the_fast_path_is_the_shortest_route_to_exit_and_counts_predicated_instructions():
    lines = _listing(
        "S2R R0, SR_TID.X",
        "ISETP.NE.AND P0, PT, R0, RZ, PT",
        "@P0 BRA `(.L_x_0)",
        "LDG.E.U16 R2, desc[UR4][R4.64]",  # the long way: skipped when the branch is taken
        "LDG.E.U16 R3, desc[UR4][R4.64+0x2]",
        "LDG.E.U16 R6, desc[UR4][R4.64+0x4]",
        ".L_x_0:",
        "@!P0 STG.E.64 desc[UR4][R4.64], R2",  # predicated: issued either way
        "FFMA R2, R2, R3, R6",
        "EXIT",
        ".L_x_1:",
        "BRA `(.L_x_1)",  # the padding after EXIT, unreachable
    )
    path = sass.fast_path(lines)
    assert [op for _, op, _ in path] == ["S2R", "ISETP.NE.AND", "STG.E.64", "FFMA"]
    assert [sass.kind(op) for _, op, _ in path] == ["other", "integer", "memory", "float"]
    assert sass._width("STG.E.64") == 64 and sass._width("LDG.E.U16") == 16 and sass._width("LDG.E") == 32


def test_a_loop_is_refused_rather_than_counted_once():
    lines = _listing(".L_x_0:", "IADD3 R0, R0, 0x1, RZ", "ISETP.NE.AND P0, PT, R0, RZ, PT", "@P0 BRA `(.L_x_0)", "EXIT")
    with pytest.raises(ValueError, match="loop"):
        sass.fast_path(lines)
