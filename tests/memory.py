"""How much a piece of code grows a fresh process's peak resident memory: the measurement the memory tests share.

Each measurement runs in a process of its own (the test process's peak is long past). glibc raises its mmap
threshold to the size of each large block freed, after which such blocks come from the heap and stay resident: the
same GRZO step then grew the peak by 8 to 96 MB from run to run on a busy CPU. A fixed threshold returns every freed
block above 128 kB to the system, so the growth measures what the code holds (8-9 MB for that step, every run).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

_TEMPLATE = """\
import resource
{setup}
_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
{measured}
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - _before) / 1024)
"""


def rss_growth_mb(setup: str, measured: str, *, timeout: float = 300) -> float:
    """MB by which running ``measured`` after ``setup`` (both Python source) grows a fresh process's peak RSS."""
    script = _TEMPLATE.format(setup=textwrap.dedent(setup).strip(), measured=textwrap.dedent(measured).strip())
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=timeout, check=False, env=env
    )
    if out.returncode != 0:
        raise AssertionError(f"the measured script failed:\n{script}\n{out.stderr}")
    return float(out.stdout.strip().splitlines()[-1])
