"""The Triton sweep kernels compiled for a GPU on a machine without one, and their machine code counted.

Triton compiles for a named target with no driver: ptxas and nvdisasm ship in its wheel. Each kernel
configuration that ``zotune.kernels.gpu`` launches is compiled here as a launch would specialise it (the
JIT's own binder over tensors as aligned as the parameters it sweeps), for sm_90 (H100) unless ``--arch``
names another, then disassembled. Per configuration it reports:

- registers and local memory (spills) per thread, shared memory per program (layout conversions);
- the widest global load and store (bits) on the full-tile path;
- the instructions one thread issues per element along the path a full tile takes, by kind: integer
  (Philox, indices, bit work), float, MUFU (the transcendental unit), memory, other. Uniform-datapath
  instructions (``U*``, issued once per warp for all its threads) are left out.

Static counts, not time. Beside them is an issue-bound model: an SM issues at most one warp
instruction a clock on each of its four sub-partitions, so a kernel that issues ``I`` instructions per
element needs at least ``I * elements / (4 * 32 * SMs * clock)`` seconds, which is put against the
time of a copy of the same bytes at the copy bandwidth measured on the card (the ratio
``issue / copy``; below 1 the sweep can be memory-bound, above it cannot). The defaults are the H100
SXM of benchmarks/RESULTS.md: 132 SMs, 1.755 GHz (the clock under sustained load), 2.96 TB/s. The model
ignores latency, dual issue and pipe limits (MUFU runs at a quarter rate), so it is a floor for the
compute side, to be checked against the GPU's own timings (benchmarks/sweep_gpu.py) when one is lent.

    python benchmarks/sass.py [--arch 90] [--against OTHER_gpu.py ...] [--dump DIR]

``--against FILE`` (repeatable) compiles another version of zotune/kernels/gpu.py beside this one (for example
``git show 3ac4d08:src/zotune/kernels/gpu.py``, the kernels before issue 19's changes), in one table.
``--dump DIR`` writes each configuration's PTX and SASS there.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import re
import subprocess
import sys
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch

KINDS = ("integer", "float", "mufu", "memory", "other")
_FLOAT = re.compile(r"^(FFMA|FMUL|FADD|FMNMX|FSEL|FSET|FSETP|FCHK|HFMA2|HADD2|HMUL2|F2F|F2FP|I2F|I2FP|F2I|FRND|DFMA)")
_INTEGER = re.compile(r"^(IMAD|IADD3|IADD|LOP3|LOP|SHF|SHL|SHR|LEA|ISETP|IMNMX|IABS|PRMT|SEL|POPC|FLO|BREV|BMSK|IDP)")
_MEMORY = re.compile(r"^(LDG|STG|LDS|STS|LDL|STL|LD|ST|ATOM|RED|LDC|LDSM)")
_INSTRUCTION = re.compile(r"^\s*/\*([0-9a-f]+)\*/\s+(@!?U?P[0-9T]+\s+)?([A-Z][A-Z0-9_.]*)(.*?);")
_LABEL = re.compile(r"^(\.L_x_\d+):")
_TARGET = re.compile(r"`\((\.L_x_\d+)\)")


def tool(name: str) -> str:
    """Path of a CUDA binary shipped in Triton's wheel (ptxas, nvdisasm); FileNotFoundError if absent."""
    import triton

    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
    if not path.exists():
        raise FileNotFoundError(f"{name} is not in this Triton's wheel ({path})")
    return str(path)


def load_gpu(path: str | None = None):
    """zotune.kernels.gpu compiled (not interpreted), or another version of that file as its own module."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("unset TRITON_INTERPRET: the interpreter's kernels cannot be compiled")
    if path is None:
        from zotune.kernels import gpu

        return gpu
    spec = importlib.util.spec_from_file_location(f"zotune_kernels_gpu_{abs(hash(path))}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def compile_launch(fn, args, kwargs, arch: int = 90):
    """``fn[grid](*args, **kwargs)`` compiled for sm_``arch`` as Triton's launcher would, without launching."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
    return triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target, options=options.__dict__)


@dataclass(frozen=True)
class Config:
    """One launch configuration of a sweep kernel."""

    name: str
    dtype: torch.dtype
    distribution: str  # "gaussian" | "rademacher" | "gaussian-fast"
    terms: int = 1
    fill: bool = False
    rounding: bool = False
    masked: bool = False  # Sparse-MeZO's one-pass kernel (float32 only)
    single: bool = False  # the one-tensor kernel (scalar arguments, no launch table)


def configs() -> list[Config]:
    """The configurations a MeZO step and the estimators launch (fp16 as the H100 figures; fp32 as OPT-125m)."""
    out = []
    for dtype, tag in ((torch.float16, "fp16"), (torch.float32, "fp32")):
        for distribution in ("gaussian", "gaussian-fast", "rademacher"):
            for terms in (1, 2):
                out.append(Config(f"{distribution} {terms}-term {tag}", dtype, distribution, terms))
    out += [
        Config("gaussian fill fp32", torch.float32, "gaussian", fill=True),
        Config("rademacher 9-term fp16 (FZOO's update, N = 8)", torch.float16, "rademacher", 9),
        Config("gaussian 2-term bf16, stochastic rounding", torch.bfloat16, "gaussian", 2, rounding=True),
        Config("gaussian-fast 2-term bf16, stochastic rounding", torch.bfloat16, "gaussian-fast", 2, rounding=True),
        Config("gaussian 1-term fp32, one tensor", torch.float32, "gaussian", single=True),
        Config("gaussian 2-term fp32, masked (Sparse-MeZO)", torch.float32, "gaussian", 2, masked=True),
        Config("gaussian-fast 2-term fp32, masked (Sparse-MeZO)", torch.float32, "gaussian-fast", 2, masked=True),
        Config("rademacher 2-term fp32, masked (Sparse-MeZO)", torch.float32, "rademacher", 2, masked=True),
    ]
    return out


def compile_config(gpu, config: Config, arch: int = 90):
    """The compiled kernel of ``config`` in the module ``gpu`` (zotune/kernels/gpu.py, any version)."""
    block = gpu.BLOCK
    x = torch.empty(4 * block, dtype=config.dtype)  # torch's CPU allocations are 64-byte aligned, as CUDA's
    vec = max(1, 16 // x.element_size())
    seeds = (1, 2, 3, 4, 5, 6)
    shared = dict(NT=config.terms, RADEMACHER=config.distribution == "rademacher", BLOCK=block)
    if "FAST" in gpu._sweep_kernel.arg_names:  # versions before gaussian-fast have no such argument
        shared["FAST"] = config.distribution == "gaussian-fast"
    launch = dict(num_warps=4 if block <= 1024 else 8)
    if "enable_fp_fusion" in _launch_options(gpu):
        launch["enable_fp_fusion"] = config.distribution != "rademacher"
    if config.masked:
        bits = torch.zeros(x.numel() // 8, dtype=torch.uint8)
        return compile_launch(
            gpu._masked_kernel, (x, bits, x.numel(), 0, 7, 8, *seeds[:4], 1.0, 0.5, 0.25), {**shared, **launch}, arch
        )
    flags = dict(FILL=config.fill, ROUND=config.rounding)
    if _has_align(gpu):
        flags["ALIGN"] = vec
    extra = (torch.zeros(3 * max(1, config.terms - 2), dtype=torch.int32),) if _has_extra(gpu) else ()
    if config.single:
        fn, args = gpu._sweep_kernel_one, (x, x.numel(), 0, 7, 8, *seeds, 1.0, 0.5, 0.25, *extra)
    else:
        table, tiles = torch.zeros(6, dtype=torch.int64), torch.zeros(4, dtype=torch.int32)
        fn, args = gpu._sweep_kernel, (x, table, tiles, *seeds, 1.0, 0.5, 0.25, *extra)
    return compile_launch(fn, args, {**shared, **flags, **launch}, arch)


def _has_extra(gpu) -> bool:
    """Whether this version's sweep kernels take the terms past two in a buffer (``extra``)."""
    return "extra" in gpu._sweep_kernel.arg_names


def _has_kernel(gpu, config: Config) -> bool:
    """Whether this version of gpu.py has the kernel ``config`` needs (older ones lack some)."""
    if config.distribution == "gaussian-fast" and "FAST" not in gpu._sweep_kernel.arg_names:
        return False
    if config.masked:
        return hasattr(gpu, "_masked_kernel")
    if config.single:
        return hasattr(gpu, "_sweep_kernel_one")
    return _has_extra(gpu) if config.terms > 2 else True


def _has_align(gpu) -> bool:
    return "ALIGN" in gpu._sweep_kernel.arg_names


def _launch_options(gpu) -> str:
    """The source of the module's sweep(), to tell which launch options that version names."""
    import inspect

    return inspect.getsource(gpu.sweep)


def disassemble(cubin: bytes) -> list[str]:
    """nvdisasm's listing of a cubin, one line per instruction or label."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "k.cubin"
        path.write_bytes(cubin)
        out = subprocess.run([tool("nvdisasm"), "-c", str(path)], capture_output=True, text=True, check=True)
    return out.stdout.splitlines()


def _blocks(lines: list[str]):
    """Basic blocks of a listing: [(label or None, [(predicated, opcode, operands)], successors)]."""
    blocks, current, label = [], [], None
    for line in lines:
        m = _LABEL.match(line.strip())
        if m:
            if current or label is not None:
                blocks.append([label, current])
            label, current = m.group(1), []
            continue
        m = _INSTRUCTION.match(line)
        if not m:
            continue
        predicated, opcode, operands = m.group(2) is not None, m.group(3), m.group(4)
        current.append((predicated, opcode, operands))
        if opcode.startswith(("BRA", "EXIT", "RET", "JMP")):
            blocks.append([label, current])
            label, current = None, []
    if current:
        blocks.append([label, current])
    index = {b[0]: i for i, b in enumerate(blocks) if b[0]}
    out = []
    for i, (label, body) in enumerate(blocks):
        succ = []
        last = body[-1] if body else (False, "", "")
        target = _TARGET.search(last[2]) if last[1].startswith("BRA") else None
        if target and target.group(1) in index:
            succ.append(index[target.group(1)])
        ends = last[1].startswith(("EXIT", "RET")) or last[1].startswith("BRA")
        if (not ends or last[0]) and i + 1 < len(blocks):  # falls through, or a predicated branch/exit
            succ.append(i + 1)
        out.append((label, body, succ))
    return out


def fast_path(lines: list[str]) -> list[tuple[bool, str, str]]:
    """The instructions a thread issues on the shortest path from the entry to an EXIT: for the sweep kernels,
    whose only runtime branches are a tile being full or not, the full tile's path (a partial tile adds its
    masks). Predicated instructions count (they issue whether or not their predicate holds)."""
    blocks = _blocks(lines)
    best: dict[int, tuple[int, list[int]]] = {0: (len(blocks[0][1]), [0])}
    order = range(len(blocks))  # forward branches only in these kernels (no loops): program order is topological
    exits = []
    for i in order:
        if i not in best:
            continue
        cost, path = best[i]
        body = blocks[i][1]
        if any(op.startswith("EXIT") for _, op, _ in body):  # a predicated EXIT ends the full tile's path too
            exits.append((cost, path))
        for s in blocks[i][2]:
            if s <= i:
                raise ValueError("a backward branch: the kernel has a loop, and a path count would not be its cost")
            c = cost + len(blocks[s][1])
            if s not in best or c < best[s][0]:
                best[s] = (c, path + [s])
    if not exits:
        raise ValueError("no EXIT reached in the listing")
    _, path = min(exits)
    return [ins for i in path for ins in blocks[i][1] if not ins[1].startswith(("NOP", "EXIT", "BRA"))]


def kind(opcode: str) -> str:
    if opcode.startswith("MUFU"):
        return "mufu"
    if _MEMORY.match(opcode):
        return "memory"
    if _FLOAT.match(opcode):
        return "float"
    if _INTEGER.match(opcode):
        return "integer"
    return "other"


def _width(opcode: str) -> int:
    """Bits moved per thread by a global load/store opcode (LDG.E.128 -> 128; LDG.E.U16 -> 16; LDG.E -> 32)."""
    for bits in (128, 64, 16, 8):
        if f".{bits}" in opcode or f".U{bits}" in opcode or f".S{bits}" in opcode:
            return bits
    return 32


@dataclass
class Report:
    config: Config
    registers: int
    spills: int
    per_element: dict[str, float]
    load_bits: int
    store_bits: int
    calls: int
    shared: int  # bytes of shared memory a program uses: a layout conversion goes through it
    wide_compares: int  # 64-bit compares (ISETP ... .EX) a thread issues on the path: bounds per element show here

    @property
    def total(self) -> float:
        return sum(self.per_element.values())

    def issue_over_copy(self, sms: int, clock_ghz: float, copy_tbs: float) -> float:
        """Issue-bound time over a copy of the same bytes (read and write), by the model in the docstring."""
        size = self.config.dtype.itemsize
        issue = self.total / (4 * 32 * sms * clock_ghz * 1e9)
        copy = 2 * size / (copy_tbs * 1e12)
        return issue / copy


def analyse(gpu, config: Config, arch: int = 90, dump: Path | None = None) -> Report:
    kernel = compile_config(gpu, config, arch)
    lines = disassemble(kernel.asm["cubin"])
    if dump is not None:
        stem = re.sub(r"[^A-Za-z0-9]+", "_", config.name).strip("_")
        (dump / f"{stem}.ptx").write_text(kernel.asm["ptx"])
        (dump / f"{stem}.sass").write_text("\n".join(lines))
    path = fast_path(lines)
    threads = kernel.metadata.num_warps * 32
    elements = gpu.BLOCK / threads  # elements one thread sweeps
    thread_ops = [op for _, op, _ in path if not op.startswith(("U", "S2UR", "R2UR"))]  # uniform ones: per warp
    usage = _usage(kernel)
    counts = Counter(kind(op) for op in thread_ops)
    loads = [_width(op) for op in thread_ops if op.startswith("LDG")]
    stores = [_width(op) for op in thread_ops if op.startswith("STG")]
    ptx = kernel.asm["ptx"]
    return Report(
        config=config,
        registers=int(re.search(r"REG:(\d+)", usage).group(1)),
        spills=sum(int(m) for m in re.findall(r"(?:STACK|LOCAL):(\d+)", usage)),  # local memory: spills and stack
        per_element={k: counts.get(k, 0) / elements for k in KINDS},
        load_bits=max(loads, default=0),
        store_bits=max(stores, default=0),
        calls=len(re.findall(r"^\s*call", ptx, flags=re.M)),
        shared=int(kernel.metadata.shared),
        wide_compares=sum(op.startswith("ISETP") and ".EX" in op for op in thread_ops),
    )


def _usage(kernel) -> str:
    """cuobjdump's resource usage line of a compiled kernel (kernel.n_regs is only set once loaded on a GPU)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "k.cubin"
        path.write_bytes(kernel.asm["cubin"])
        out = subprocess.run([tool("cuobjdump"), "-res-usage", str(path)], capture_output=True, text=True, check=True)
    return out.stdout


def table(rows: list[tuple[str, Report]], sms: int, clock_ghz: float, copy_tbs: float) -> str:
    head = (
        "| kernels | configuration | regs | ld/st bits | int | float | mufu | mem | other | per element "
        "| issue / copy |\n| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
    )
    out = [head]
    for tag, r in rows:
        p = r.per_element
        out.append(
            f"| {tag} | {r.config.name} | {r.registers} | {r.load_bits}/{r.store_bits} | {p['integer']:.1f} "
            f"| {p['float']:.1f} | {p['mufu']:.2f} | {p['memory']:.2f} | {p['other']:.1f} | {r.total:.1f} "
            f"| {r.issue_over_copy(sms, clock_ghz, copy_tbs):.2f} |"
        )
    return "\n".join(out)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability x10 (90: H100/H200, 80: A100)")
    parser.add_argument(
        "--against",
        action="append",
        default=[],
        metavar="FILE",
        help="another version of zotune/kernels/gpu.py, compiled beside this one (repeatable)",
    )
    parser.add_argument("--dump", help="write each configuration's PTX and SASS to this folder")
    parser.add_argument("--sms", type=int, default=132)
    parser.add_argument("--clock-ghz", type=float, default=1.755)
    parser.add_argument("--copy-tbs", type=float, default=2.96, help="copy bandwidth (read + write), TB/s")
    args = parser.parse_args(argv)
    try:
        tool("ptxas"), tool("nvdisasm")
    except FileNotFoundError as e:
        print(f"sass.py: {e}", file=sys.stderr)
        return 2
    dump = Path(args.dump) if args.dump else None
    if dump:
        dump.mkdir(parents=True, exist_ok=True)
    versions = [(path, load_gpu(path)) for path in args.against] + [("this", load_gpu())]
    rows = []
    for config in configs():
        for tag, gpu in versions:
            if not _has_kernel(gpu, config):
                continue
            rows.append((tag, analyse(gpu, config, args.arch, dump)))
    import triton

    print(
        f"sm_{args.arch}, Triton {triton.__version__}, BLOCK {versions[-1][1].BLOCK}; instructions one thread issues "
        f"per element on a full tile (uniform-datapath ones apart); issue / copy: {args.sms} SMs x 4 warp "
        f"instructions a clock at {args.clock_ghz} GHz against a copy at {args.copy_tbs} TB/s (a model: see --help)"
    )
    print(table(rows, args.sms, args.clock_ghz, args.copy_tbs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
