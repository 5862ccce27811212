"""The host-side cost of one MeZO step, for two source trees side by side (a refactor's overhead check).

Usage: ``python benchmarks/step_overhead.py OLD_TREE NEW_TREE [--rows 16 --tensors 272 --repeats 3]``, each tree a
checkout of zotune (``git worktree add /tmp/old REV``). Each run imports one tree in a fresh process, builds
``--tensors`` float32 tensors of ``rows x 64`` plus 40 biases, and times 25 fused MeZO steps whose closure returns
a constant (no forward pass): what is left is the sweeps and the step's Python bookkeeping. Trees alternate,
``--repeats`` times, so drift in the machine's load hits both; the medians are printed per run.
``--option KEY=VALUE`` (repeatable; VALUE a Python literal) is passed to ``zotune.MeZO``, e.g. ``--option
sparsity=0.75 --option fuse_next=False`` for Sparse-MeZO's step; ``--threads`` sets torch's (and so the numba
kernel's) thread count.
"""

import argparse
import ast
import json
import subprocess
import sys

CHILD = r"""
import statistics, sys, time
sys.path.insert(0, sys.argv[1] + "/src")
import json, torch, zotune
torch.set_num_threads(int(sys.argv[5]))
rows, count = int(sys.argv[2]), int(sys.argv[3])
params = [(f"w{i}", torch.nn.Parameter(torch.randn(rows, 64) * 0.02)) for i in range(count)]
params += [(f"b{i}", torch.nn.Parameter(torch.zeros(1024))) for i in range(40)]
opt = zotune.MeZO(params, **{"lr": 1e-6, "fuse_next": True, **json.loads(sys.argv[4])})
loss = torch.tensor(1.0)
for _ in range(3):
    opt.step(lambda: loss)
times = []
for _ in range(25):
    t0 = time.perf_counter()
    opt.step(lambda: loss)
    times.append(time.perf_counter() - t0)
print(f"{1000 * statistics.median(times):.2f}")
"""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("trees", nargs=2, metavar="TREE")
    p.add_argument("--rows", type=int, default=16)
    p.add_argument("--tensors", type=int, default=272)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE", help="a zotune.MeZO keyword")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    options = {}
    for item in args.option:
        key, sep, value = item.partition("=")
        if not sep:
            p.error(f"--option takes KEY=VALUE, got {item!r}")
        try:
            options[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            p.error(f"--option {key}: {value!r} is not a Python literal")
    medians: dict[str, list[float]] = {t: [] for t in args.trees}
    for _ in range(args.repeats):
        for tree in args.trees:
            out = subprocess.run(
                [
                    sys.executable,
                    "-c",
                    CHILD,
                    tree,
                    str(args.rows),
                    str(args.tensors),
                    json.dumps(options),
                    str(args.threads),
                ],
                capture_output=True,
                text=True,
                check=True,
            )
            medians[tree].append(float(out.stdout.strip()))
    for tree, values in medians.items():
        print(f"{tree}: median step {min(values):.2f} ms (runs: {', '.join(f'{v:.2f}' for v in values)})")
    old, new = (min(medians[t]) for t in args.trees)
    print(f"new / old: {new / old:.3f}")


if __name__ == "__main__":
    main()
