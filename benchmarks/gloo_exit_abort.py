"""Reproduce the abort at exit of a gloo job, and compare ways to end one (torch only).

What happens. A rank runs a collective on the gloo backend. The collective's work object (which
holds the collective's tensors) is released by a gloo worker thread (``pt_gloo_runloop``) after the
caller has been told the collective finished, with the worker's queue mutex held. If the caller has
meanwhile dropped its own reference to a tensor (a temporary, as a loop's losses and metrics are),
that release drops the tensor's last reference, which decrefs its Python object and so takes the
GIL. Two ways this goes wrong, both upstream (this script imports torch only):

- Exit. When the release lands while the interpreter is finalizing, CPython (before 3.14) ends the
  thread with ``pthread_exit``; its forced unwind reaches the ``noexcept`` destructor ``~AsyncWork``
  and libstdc++ calls ``std::terminate``: "terminate called without an active exception", SIGABRT,
  and the launcher (torchrun, ``accelerate launch``) reports the rank as failed after its work was
  done. The aborting thread (gdb, torch 2.13, Python 3.11; the main thread is in ``Py_FinalizeEx``)::

      #6  std::terminate()
      #9  _Unwind_ForcedUnwind
      #12 __GI___pthread_exit
      #13 PyThread_exit_thread              <- take_gil while the interpreter is finalizing
      #16 pybind11::gil_scoped_acquire::gil_scoped_acquire()
      #17 ConcretePyInterpreterVTable::decref(_object*)
      #18 c10::TensorImpl::decref_pyobject()
      #20 c10d::ProcessGroupGloo::AsyncWork::~AsyncWork()
      #22 c10d::ProcessGroupGloo::runLoop(int)

- ``destroy_process_group()``. It does not stop gloo's worker threads (``shutdown()`` and
  ``abort()`` leave them running). They stop in ``~ProcessGroupGloo``, which runs where the last
  reference to the group goes, on the main thread with the GIL held, and first locks the queue
  mutex: if a worker holds that mutex while it waits for the GIL to release a work, neither moves.
  Seen under ``accelerate launch`` with the HF Trainer (its DDP wrapper held the last reference),
  in 7 of 50 runs; the main thread in ``pthread_mutex_lock`` <- ``~ProcessGroupGloo`` <-
  ``Reducer::~Reducer``, a worker in ``take_gil`` <- ``decref_pyobject`` <- ``~AsyncAllgatherWork``
  <- ``runLoop``. (Rarer in this script, where ``destroy_process_group()`` drops the last reference.)

A rank that ends with a barrier (no rank is still in a collective) and ``os._exit(0)`` after
flushing its output runs neither teardown. Upstream: pytorch/pytorch#190489 (the abort with gloo and
no ``destroy_process_group``), pytorch/pytorch#38228 (C++ threads taking the GIL at exit),
python/cpython#87135 (3.14 parks such threads instead of ``pthread_exit``), and an abandoned attempt
to destroy process groups in an ``atexit`` handler (pytorch/pytorch#179291).

The script launches ``--trials`` two-rank jobs (each rank ``OMP_NUM_THREADS=1``) for each way of
ending, and prints how many had a rank abort and how many hung. The race needs the worker to be
late by a moment, so counts vary with the machine's load (2 cores: 3 of 20 jobs aborted when
returning from the script, 4 of 20 of the same ranks under torchrun; none with the other two
endings)::

    python benchmarks/gloo_exit_abort.py --trials 20
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys

RANK = """
import os
import sys
import torch
import torch.distributed as dist

dist.init_process_group("gloo")
dist.all_reduce(torch.ones(1))  # a temporary, as a training loop's losses and metrics are
if sys.argv[1] == "destroy":
    dist.destroy_process_group()
elif sys.argv[1] == "os._exit":
    dist.barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
"""

VARIANTS = {
    "exit": "return from the script",
    "destroy": "destroy_process_group(), then return",
    "os._exit": "barrier(), flush, os._exit(0)",
}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def job(variant: str, world: int = 2, timeout: float = 30) -> str:
    """Run one ``world``-rank job: "ok", "abort" (a rank failed; its stderr follows) or "hang"."""
    port = _free_port()
    ranks = []
    for rank in range(world):
        env = {
            **os.environ,
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "RANK": str(rank),
            "WORLD_SIZE": str(world),
            "OMP_NUM_THREADS": "1",
        }
        ranks.append(
            subprocess.Popen(
                [sys.executable, "-c", RANK, variant],
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    outcome = "ok"
    for proc in ranks:
        try:
            _, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            outcome = "hang"
            continue
        if proc.returncode != 0 and outcome == "ok":
            outcome = f"abort (exit code {proc.returncode}: {err.strip()[-200:]})"
    return outcome


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=20, help="jobs per variant")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    args = parser.parse_args(argv)
    for variant in args.variants:
        aborts = hangs = 0
        for _ in range(args.trials):
            outcome = job(variant)
            if outcome.startswith("abort"):
                aborts += 1
                if aborts == 1:
                    print(f"  first {outcome}")
            hangs += outcome == "hang"
        print(f"{VARIANTS[variant]:40s}: {aborts} aborted, {hangs} hung (> 30 s), of {args.trials} jobs", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
