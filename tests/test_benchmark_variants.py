"""benchmarks/variants.py --smoke end to end: every chosen variant gets a row with its cost and a wall time."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# variant -> forward passes per step (grad-norm: + 2 per layer once; the tiny Llama has 5 layers:
# embeddings, 2 blocks, final norm, head)
VARIANTS = {"mezo": "2", "one-sided": "2", "n-spsa-2": "4", "grad-norm": "2 (+10 layer probes)"}


def test_variants_smoke_prints_a_row_per_variant():
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "src"), env.get("PYTHONPATH")]))
    before = (ROOT / "benchmarks" / "RESULTS.md").read_bytes()
    res = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "variants.py"),
            "--smoke",
            "--no-append",
            "--variants",
            ",".join(VARIANTS),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,  # a hang guard: the smoke run takes ~14 s on a 2-core runner with a benchmark beside it
    )
    assert res.returncode == 0, res.stderr[-3000:]
    lines = [line for line in res.stdout.splitlines() if line.startswith("|") and not line.startswith("|---")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = {
        cells[0]: dict(zip(header, cells))
        for cells in ([c.strip() for c in line.strip("|").split("|")] for line in lines[1:])
    }
    assert list(rows) == list(VARIANTS)
    for name, passes in VARIANTS.items():
        row = rows[name]
        assert row["forward passes / step"] == passes
        assert float(row["wall s"]) >= 0 and float(row["s / step"]) >= 0
        steps = row["steps to 60%"]
        assert steps == "not reached in 4" or steps in ("2", "4")
        if steps != "not reached in 4":
            extra = 10 if name == "grad-norm" else 0
            assert int(row["forward passes to 60%"]) == int(steps) * int(passes.split()[0]) + extra
    assert "Variants: steps to 60% validation accuracy on SST-2" in res.stdout
    assert (ROOT / "benchmarks" / "RESULTS.md").read_bytes() == before
