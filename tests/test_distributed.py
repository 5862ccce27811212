"""Distributed MeZO on 2 CPU processes (gloo): data parallel with scalars, FSDP2 shards, checks.

One spawn runs every multi-process scenario (starting processes is the slow part); the tests
then compare what the ranks saved with single-process runs on the whole batch.
"""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest
import torch
from conftest import ulp32

import zotune
from zotune import distributed as zd
from zotune import rng
from zotune.optim.accumulate import accumulate

WORLD = 2
STEPS = 4
SEED, LR, EPS = 3, 0.003, 1e-3
# Ranks (and micro-batches) take float32 means over their shard and combine them in float64; one process
# takes one float32 mean over the whole batch (12 rows x 3 = 36 squares). The rows' predictions are the
# same dot products either way (bit for bit here, also with ATEN_CPU_CAPABILITY=default), so the losses
# differ by the means' roundings: a float32 sum of n non-negative terms is within (n - 1) 2^-24 of its
# value in any order, and 2^-24 L < ulp(L), so <= 35 ulp(L) for the whole batch, <= 23 for the largest
# shard or micro-batch (8 rows, 24 squares), + 2 for the divisions: 60 ulp of L per loss (measured <= 3).
LOSS_ULPS = 60


NEW_METHODS = {  # the optimizer class and keyword arguments of each method the issue "Converge faster" added
    "fzoo": ("FZOO", dict(n_perturbations=4, lr=LR * 1e-3)),  # its step is lr / (eps std): another scale
    "hizoo": ("HiZOO", dict(alpha=1e-3)),
    "kerzoo": ("KerZOO", {}),
    "sparse-mezo": ("MeZO", dict(sparsity=0.5)),
    "lozo": ("MeZO", dict(distribution="lowrank", lowrank_rank=2)),
    "subzero": ("MeZO", dict(distribution="subzero", lowrank_rank=2)),
    "zo-muon": ("ZOMuon", dict(lowrank_rank=2, n_perturbations=2)),
}


def _new_method(model, method: str):
    cls, kwargs = NEW_METHODS[method]
    return getattr(zotune, cls)(model.named_parameters(), **{"lr": LR, "eps": EPS, "seed": SEED, **kwargs})


def _mlp(hidden: int, seed: int = 0) -> torch.nn.Module:
    gen = torch.Generator().manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, 3))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) / p.shape[-1] ** 0.5)
    return model


def _data(n: int = 12):
    gen = torch.Generator().manual_seed(7)
    return torch.randn(n, 4, generator=gen), torch.randn(n, 3, generator=gen)


def _loss(model, x, y):
    return (model(x) - y).pow(2).mean()


# GRZO's examples: the 12 rows of _data as 6 examples of 2, 1, 3, 1, 2 and 3 rows (a question's options), split
# unevenly: rank 0 runs the first two examples (3 rows), rank 1 the other four (9 rows)
GRZO_ROWS = [2, 1, 3, 1, 2, 3]
GRZO_SPLIT = 2
GRZO_LR = LR * 1e-3  # its step moves an element ~lr / (2 eps sqrt(B)): ~1e-3 here, as MeZO's lr |g| at LR


def _grzo_losses(model, x, y, rows):
    """Each example's loss: the mean of its rows' squared errors (a 1-D tensor, one per example)."""
    per_row = (model(x) - y).pow(2).mean(-1)
    return torch.stack([part.mean() for part in per_row.split(rows)])


def _grzo_run(model, opt, x, y, rows) -> dict:
    trace = []
    for _ in range(STEPS):
        opt.step(lambda: _grzo_losses(model, x, y, rows), rows)
        trace.append((list(opt.projected_grads), *opt.last_losses))
    return {"params": _params(model), "trace": trace}


def _optimizer(model, seed: int = SEED, **kwargs):
    return zotune.MeZO(model.named_parameters(), lr=LR, eps=EPS, seed=seed, **kwargs)


def _params(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _run(model, opt, closure, steps: int = STEPS) -> dict:
    """Trains and keeps the weights and each step's projected gradient and losses."""
    trace = []
    for _ in range(steps):
        opt.step(closure)
        trace.append((opt.projected_grad, *opt.last_losses))
    return {"params": _params(model), "trace": trace}


def _single(hidden: int, steps: int = STEPS) -> dict:
    """The reference: one process, the whole batch."""
    model = _mlp(hidden)
    x, y = _data()
    return _run(model, _optimizer(model), lambda: _loss(model, x, y), steps)


def _assert_matches_single(got: dict, want: dict) -> None:
    """The same run up to where the losses' roundings (LOSS_ULPS each) take it, step by step.

    g = (L+ - L-) / 2 eps, rounded to float32: the two runs' g differ by <= 2 * LOSS_ULPS ulp(L) / 2 eps
    + 1 ulp(g) each (~1e-2 against |g| ~ 0.3-12; measured <= 2.4e-4). A run that loses a shard's loss,
    mis-weights it or perturbs a shard with another slice of z is off by O(|g|) (0.2-0.8 here).
    The weights then move apart by lr |dg| max|z| a step (the gaps seen), plus each run's float32
    roundings of its 3 sweeps (+eps z, -2 eps z, +eps z - lr g z): <= 2^-24 of the swept value each,
    |theta_i| + 2 eps max|z| + lr |g| max|z| with |theta_i| within the run's total movement of its end
    value: 6 * 2^-24 of that a step for the two runs, elementwise (the lr |dg| z part is most of the gaps
    seen: up to 0.72 of this bound at the largest z). A run that undoes the perturbation 2^-10 eps off
    leaves ~1e-6 |z| a step in the weights and fails by 1.2-2x.
    """
    assert len(got["trace"]) == len(want["trace"])
    zmax = [
        max(
            float(abs(rng.gaussian(rng.step_seed(SEED, t), rng.param_key(n), 0, p.numel())).max())
            for n, p in want["params"].items()
        )
        for t in range(len(want["trace"]))
    ]
    moved = sum(LR * abs(g) * z for (g, *_), z in zip(want["trace"], zmax))  # how far any weight went
    atol = 0.0
    for t, ((g, *losses), (g_want, *losses_want)) in enumerate(zip(got["trace"], want["trace"])):
        g_tol = LOSS_ULPS * ulp32(max(map(abs, losses + losses_want))) / EPS + 2 * ulp32(g_want)
        assert g == pytest.approx(g_want, rel=0, abs=g_tol), f"step {t}"
        swept = moved + 2 * EPS * zmax[t] + LR * abs(g_want) * zmax[t]  # beyond |theta_i|
        atol += LR * abs(g - g_want) * zmax[t] + 6 * 2**-24 * swept
    rtol = len(zmax) * 6 * 2**-24  # the roundings' part that scales with |theta_i|
    assert list(got["params"]) == list(want["params"])
    for name, want_p in want["params"].items():
        torch.testing.assert_close(got["params"][name], want_p, rtol=rtol, atol=atol, msg=lambda m, n=name: f"{n}: {m}")


def _error(fn) -> str:
    try:
        fn()
    except (RuntimeError, ValueError) as e:
        return str(e)
    return ""


def _worker(rank: int, world: int, out: str) -> None:
    import torch.distributed as dist

    # A file rendezvous rather than a TCP port: a port found free and closed can be taken by another
    # process before rank 0 binds it (a rare EADDRINUSE on a busy runner); a fresh file cannot.
    dist.init_process_group("gloo", init_method=f"file://{out}/rendezvous", rank=rank, world_size=world)
    torch.set_num_threads(1)
    result = {}
    x, y = _data()
    half = len(x) // world
    xs, ys = x[rank * half : (rank + 1) * half], y[rank * half : (rank + 1) * half]

    # 1. data parallel, scalars only, for two model sizes
    for hidden in (5, 256):
        model = _mlp(hidden)
        opt = _optimizer(model)
        zd.check_consistent(opt)
        zd.comm_stats().reset()
        result[f"dp{hidden}"] = _run(model, opt, zd.all_reduce_closure(lambda m=model: _loss(m, xs, ys)))
        result[f"bytes{hidden}"] = zd.comm_stats().bytes / STEPS

    # 1b. unequal shards, weighted by their sizes (rank 0: 8 rows, rank 1: 4 rows)
    cut = 8
    xw, yw = (x[:cut], y[:cut]) if rank == 0 else (x[cut:], y[cut:])
    model = _mlp(5)
    opt = _optimizer(model)
    result["weighted"] = _run(model, opt, zd.all_reduce_closure(lambda: _loss(model, xw, yw), weight=len(xw)))

    # 1c. the estimators, directions and rules of issue 20 under data parallel
    for name in NEW_METHODS:
        model = _mlp(16)
        opt = _new_method(model, name)
        zd.check_consistent(opt)
        result[f"dp-{name}"] = _run(model, opt, zd.all_reduce_closure(lambda m=model: _loss(m, xs, ys)))

    # 1d. GRZO: per-example losses gathered, each rank's rows perturbed at their places in the whole batch
    cut_rows = sum(GRZO_ROWS[:GRZO_SPLIT])
    rows = GRZO_ROWS[:GRZO_SPLIT] if rank == 0 else GRZO_ROWS[GRZO_SPLIT:]
    xg, yg = (x[:cut_rows], y[:cut_rows]) if rank == 0 else (x[cut_rows:], y[cut_rows:])
    model = _mlp(16)
    path = os.path.join(out, f"grzo{rank}.zot")
    opt = zotune.GRZO(model, lr=GRZO_LR, eps=EPS, seed=SEED, trajectory=path, data_parallel=True)
    zd.check_consistent(opt)
    zd.comm_stats().reset()
    result["grzo"] = _grzo_run(model, opt, xg, yg, rows)
    opt.flush()
    result["grzo"]["bytes"] = zd.comm_stats().bytes / STEPS
    result["grzo"]["trajectory"] = path
    result["grzo_no_rows"] = _error(lambda: opt.step(lambda: _grzo_losses(model, xg, yg, rows)))

    # 2. FSDP2: every rank perturbs and updates its own (uneven) row shard; data parallel on top
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Shard, distribute_tensor, init_device_mesh

    # gloo reduces CPU tensors: shard on an explicit CPU mesh (FSDP2's default mesh, and so the
    # shards, would go to the GPU when there is one)
    mesh = init_device_mesh("cpu", (world,))
    model = _mlp(5)
    fully_shard(model[0], mesh=mesh)
    fully_shard(model, mesh=mesh, reshard_after_forward=True)  # the root too: MeZO updates the sharded storage
    result["local_rows"] = model[0].weight.to_local().shape[0]
    opt = _optimizer(model, trajectory=os.path.join(out, f"fsdp{rank}.zot"))
    zd.check_consistent(opt)
    result["fsdp"] = _run(model, opt, zd.all_reduce_closure(lambda: _loss(model, xs, ys)))
    result["fsdp"]["params"] = {n: p.full_tensor().detach().clone() for n, p in model.named_parameters()}

    # 2b. a column-sharded DTensor has no contiguous element range: a clear error
    column = torch.nn.Parameter(distribute_tensor(torch.zeros(3, 4), mesh, [Shard(1)]))
    result["shard1"] = _error(lambda: _optimizer_of([column]).step(lambda: torch.tensor(0.0)))

    # 3. ranks that disagree are stopped on every rank, naming what differs
    result["bad_seed"] = _error(lambda: zd.check_consistent(_optimizer(_mlp(5), seed=3 + rank)))
    opt = _optimizer(_mlp(5))
    if rank == 1:
        opt.step(lambda: torch.tensor(1.0))
    result["bad_step"] = _error(lambda: zd.check_consistent(opt, check_values=False))
    result["bad_params"] = _error(lambda: zd.check_consistent(_optimizer(_mlp(5 + rank))))
    result["bad_values"] = _error(lambda: zd.check_consistent(_optimizer(_mlp(5, seed=rank))))
    result["bad_variant"] = _error(lambda: zd.check_consistent(_optimizer(_mlp(5), n_perturbations=1 + rank)))
    result["out"] = os.path.join(out, f"rank{rank}.pt")
    torch.save(result, result["out"])
    # end the rank without gloo's teardowns: a worker thread releasing a collective's tensors at exit can abort
    # the process (SIGABRT, "terminate called without an active exception": seen here in CI) or hang it in
    # destroy_process_group() (benchmarks/gloo_exit_abort.py); the barrier leaves no collective in flight
    dist.barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _optimizer_of(params):
    return zotune.MeZO(params, lr=0.05, seed=3)


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    import torch.multiprocessing as mp

    out = str(tmp_path_factory.mktemp("ranks"))
    mp.spawn(_worker, args=(WORLD, out), nprocs=WORLD, join=True)
    return [torch.load(os.path.join(out, f"rank{r}.pt")) for r in range(WORLD)]


def _assert_params_equal(got: dict, want: dict, **tol) -> None:
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], **tol, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("hidden", [5, 256])
def test_data_parallel_matches_one_process_on_the_whole_batch(ranks, hidden):
    want = _single(hidden)
    for r in ranks:
        _assert_matches_single(r[f"dp{hidden}"], want)
    # identical: both ranks add the same two float64 losses (a + b == b + a) and apply the same update
    _assert_params_equal(ranks[1][f"dp{hidden}"]["params"], ranks[0][f"dp{hidden}"]["params"], rtol=0, atol=0)


@pytest.mark.parametrize("method", NEW_METHODS)
def test_the_new_methods_under_data_parallel_match_one_process(ranks, method):
    """Each rank steps on its half of the batch, the losses all-reduced: both ranks end identical, and at the
    single-process run on the whole batch up to the losses' roundings."""
    model = _mlp(16)
    x, y = _data()
    start = _params(model)
    want = _run(model, _new_method(model, method), lambda: _loss(model, x, y))
    got = [r[f"dp-{method}"] for r in ranks]
    _assert_params_equal(got[1]["params"], got[0]["params"], rtol=0, atol=0)
    # The ranks' losses differ from one process's by <= LOSS_ULPS ulp(L) ~ 7e-6 (L ~ 1), against differences
    # L+ - L- ~ 2 eps |g| ~ 1e-3: each step's coefficients within ~1% (FZOO's spread and ZO-Muon's msign
    # included), so the weights within ~1% of how far they moved; 5% allows for four steps. A rank that
    # perturbs with another z, or whose loss is not all-reduced, is off by O(the movement) (without the all-reduce every method fails this test: checked).
    for name, want_p in want["params"].items():
        moved = float((want_p - start[name]).abs().max())
        assert moved > 0 or (method == "zo-muon" and want_p.dim() == 1), f"{method}: {name} did not move"  # 2-D only
        # (+ 1e-7: a float32 rounding of weights of size ~1, for a weight that barely moved)
        torch.testing.assert_close(got[0]["params"][name], want_p, rtol=0, atol=0.05 * moved + 1e-7)
    # each coefficient within ~1% (above): 2% is twice that (the abs term is negligible: these g are O(1), and
    # the losses' ulps make an absolute error of ~7e-6 / 2 eps ~ 4e-3 in g)
    for (g, *_), (g_want, *_) in zip(got[0]["trace"], want["trace"]):
        assert g == pytest.approx(g_want, rel=0.02, abs=1e-6)


def test_grzo_across_ranks_is_grzo_on_the_whole_batch(ranks):
    """GRZO with data_parallel: uneven shards of multi-row examples give both ranks the update one process makes on
    the whole batch, its trajectory replays it, and a step communicates the rows and the per-example losses."""
    model = _mlp(16)
    x, y = _data()
    start = _params(model)
    want = _grzo_run(model, zotune.GRZO(model, lr=GRZO_LR, eps=EPS, seed=SEED), x, y, GRZO_ROWS)
    got = [r["grzo"] for r in ranks]
    _assert_params_equal(got[1]["params"], got[0]["params"], rtol=0, atol=0)  # the same gathered losses
    for (c, *losses), (c_want, *losses_want) in zip(got[0]["trace"], want["trace"]):
        assert len(c) == sum(GRZO_ROWS)  # a coefficient for every row of the whole batch
        # each row's loss is the same row's forward (a batch of 3 or 9 rows against 12: float32 ulps of the
        # losses, ~1e-7 of ~10 seen); the coefficients divide differences of ~1e-2 by their spread, which turns
        # those ulps into ~1e-5 of the largest coefficient (5e-5 seen after four steps): 1e-3 of it
        np.testing.assert_allclose(losses, losses_want, rtol=1e-6)
        np.testing.assert_allclose(c, c_want, rtol=0, atol=1e-3 * max(map(abs, c_want)))
    for name, want_p in want["params"].items():
        moved = float((want_p - start[name]).abs().max())
        if name.endswith("bias"):  # GRZO trains the Linear weights only
            assert moved == 0 and torch.equal(got[0]["params"][name], want_p), name
            continue
        assert moved > 0, name
        # the coefficients' 1e-3 relative, four steps: well within 1% of how far a weight moved; a rank that
        # numbers its rows from 0 (another rank's directions) or keeps its own losses is off by O(the movement);
        # + 1e-7: a float32 rounding of weights of size ~1
        torch.testing.assert_close(got[0]["params"][name], want_p, rtol=0, atol=0.01 * moved + 1e-7)
    replayed = _mlp(16)
    zotune.replay(replayed, got[0]["trajectory"])
    _assert_params_equal(_params(replayed), got[0]["params"], rtol=0, atol=0)
    for r in ranks:
        # a step: the rows (one length, then 4 int64 padded) and each pass's losses (4 float64 padded)
        assert r["grzo"]["bytes"] == 8 + 8 * 4 + 2 * 8 * 4
        assert "rows=" in r["grzo_no_rows"]


def test_data_parallel_communicates_a_few_bytes_per_step_whatever_the_model_size(ranks):
    for r in ranks:
        assert r["bytes5"] == r["bytes256"] == 16  # two all-reduces of one float64
    n_small = sum(p.numel() for p in _mlp(5).parameters())
    n_large = sum(p.numel() for p in _mlp(256).parameters())
    assert n_large > 30 * n_small


def test_unequal_shards_weighted_by_size_match_the_whole_batch(ranks):
    want = _single(5)
    for r in ranks:
        _assert_matches_single(r["weighted"], want)


def test_fsdp2_sharded_training_matches_unsharded(ranks):
    assert [r["local_rows"] for r in ranks] == [3, 2]  # uneven shards of 5 rows
    want = _single(5)
    for r in ranks:
        _assert_matches_single(r["fsdp"], want)
    # same as data parallel, bit for bit
    _assert_params_equal(ranks[0]["fsdp"]["params"], ranks[0]["dp5"]["params"], rtol=0, atol=0)


def test_a_sharded_run_replays_onto_the_unsharded_model(ranks):
    out = os.path.dirname(ranks[0]["out"])
    for rank, r in enumerate(ranks):
        model = zotune.replay(_mlp(5), os.path.join(out, f"fsdp{rank}.zot"))  # global shapes and names
        _assert_params_equal(_params(model), r["fsdp"]["params"], rtol=0, atol=0)


def test_column_sharded_dtensor_is_refused(ranks):
    for r in ranks:
        assert "Shard(0)" in r["shard1"] and "Shard(dim=1)" in r["shard1"]


@pytest.mark.parametrize(
    "case, words",
    [
        ("bad_seed", ["seed", "rank 0: 3", "rank 1: 4"]),
        ("bad_step", ["step", "rank 0: 0", "rank 1: 1"]),
        ("bad_params", ["parameter set"]),
        ("bad_values", ["parameter values"]),
        ("bad_variant", ["variant", "n_perturbations"]),
    ],
)
def test_disagreeing_ranks_stop_with_a_clear_error_on_every_rank(ranks, case, words):
    for r in ranks:
        assert "disagree" in r[case]
        for word in words:
            assert word in r[case], r[case]


def test_without_a_process_group_the_helpers_are_no_ops():
    model = _mlp(5)
    opt = _optimizer(model)
    zd.check_consistent(opt)
    closure = lambda: torch.tensor(1.0)  # noqa: E731
    assert zd.all_reduce_closure(closure) is closure
    assert zd.gather_lists([1.5, 2.0]) == [[1.5, 2.0]] and zd.rank() == 0
    # GRZO with data_parallel in one process: GRZO (rows may then be left out)
    a, b = _mlp(5), _mlp(5)
    x, y = _data()
    for m, dp in ((a, False), (b, True)):
        zotune.GRZO(m, lr=1e-6, data_parallel=dp).step(lambda m=m: (m(x) - y).pow(2).mean(-1))
    _assert_params_equal(_params(a), _params(b), rtol=0, atol=0)


def test_local_shard_of_a_plain_tensor_is_itself_at_offset_0():
    t = torch.zeros(3, 4)
    local, offset = zotune.optim.functional.local_shard(t)
    assert local is t and offset == 0


# -- gradient accumulation -------------------------------------------------------------------------
@pytest.mark.parametrize("sizes", [[4, 4, 4], [8, 3, 1]])
def test_accumulated_micro_batches_equal_one_big_batch(sizes):
    want = _single(5)
    model = _mlp(5)
    x, y = _data()
    bounds = [sum(sizes[:i]) for i in range(len(sizes) + 1)]
    micro = [(x[a:b], y[a:b]) for a, b in zip(bounds, bounds[1:])]
    calls = []

    def closure_for(xb, yb):
        def closure():
            calls.append(len(xb))
            return _loss(model, xb, yb)

        return closure

    got = _run(model, _optimizer(model), accumulate([closure_for(*b) for b in micro], weights=sizes))
    assert len(calls) == 2 * len(sizes) * STEPS  # every micro-batch at +eps and at -eps
    _assert_matches_single(got, want)


def test_accumulate_rejects_bad_weights():
    with pytest.raises(ValueError, match="at least one"):
        accumulate([])
    with pytest.raises(ValueError, match="weights"):
        accumulate([lambda: 1.0], [1.0, 2.0])
    with pytest.raises(ValueError, match="positive"):
        accumulate([lambda: 1.0], [0.0])
