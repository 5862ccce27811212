"""Distributed MeZO on 2 CPU processes (gloo): data parallel with scalars, FSDP2 shards, checks.

One spawn runs every multi-process scenario (starting processes is the slow part); the tests
then compare what the ranks saved with single-process runs on the whole batch.
"""

from __future__ import annotations

import os
import socket

import pytest
import torch

import zotune
from zotune import distributed as zd
from zotune.optim.accumulate import accumulate

WORLD = 2
STEPS = 4
# A mean of shard means differs from the whole-batch mean by float32 rounding (~1e-7), which the
# projected gradient (L+ - L-) / 2 eps amplifies by 1 / eps: parameters agree to ~1e-5, not bitwise.
TOL = dict(rtol=1e-4, atol=1e-4)


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


def _optimizer(model, seed: int = 3, **kwargs):
    return zotune.MeZO(model.named_parameters(), lr=0.003, eps=1e-3, seed=seed, **kwargs)


def _single(hidden: int, steps: int = STEPS) -> dict[str, torch.Tensor]:
    """The reference: one process, the whole batch."""
    model = _mlp(hidden)
    x, y = _data()
    opt = _optimizer(model)
    for _ in range(steps):
        opt.step(lambda: _loss(model, x, y))
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _error(fn) -> str:
    try:
        fn()
    except (RuntimeError, ValueError) as e:
        return str(e)
    return ""


def _worker(rank: int, world: int, port: int, out: str) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
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
        for _ in range(STEPS):
            opt.step(zd.all_reduce_closure(lambda m=model: _loss(m, xs, ys)))
        result[f"dp{hidden}"] = {n: p.detach().clone() for n, p in model.named_parameters()}
        result[f"bytes{hidden}"] = zd.comm_stats().bytes / STEPS

    # 1b. unequal shards, weighted by their sizes (rank 0: 8 rows, rank 1: 4 rows)
    cut = 8
    xw, yw = (x[:cut], y[:cut]) if rank == 0 else (x[cut:], y[cut:])
    model = _mlp(5)
    opt = _optimizer(model)
    for _ in range(STEPS):
        opt.step(zd.all_reduce_closure(lambda: _loss(model, xw, yw), weight=len(xw)))
    result["weighted"] = {n: p.detach().clone() for n, p in model.named_parameters()}

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
    for _ in range(STEPS):
        opt.step(zd.all_reduce_closure(lambda: _loss(model, xs, ys)))
    result["fsdp"] = {n: p.full_tensor().detach().clone() for n, p in model.named_parameters()}

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
    dist.destroy_process_group()


def _optimizer_of(params):
    return zotune.MeZO(params, lr=0.05, seed=3)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    import torch.multiprocessing as mp

    out = str(tmp_path_factory.mktemp("ranks"))
    mp.spawn(_worker, args=(WORLD, _free_port(), out), nprocs=WORLD, join=True)
    return [torch.load(os.path.join(out, f"rank{r}.pt")) for r in range(WORLD)]


def _assert_params_equal(got: dict, want: dict, **tol) -> None:
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], **tol, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("hidden", [5, 256])
def test_data_parallel_matches_one_process_on_the_whole_batch(ranks, hidden):
    want = _single(hidden)
    for r in ranks:
        _assert_params_equal(r[f"dp{hidden}"], want, **TOL)
    _assert_params_equal(ranks[1][f"dp{hidden}"], ranks[0][f"dp{hidden}"], rtol=0, atol=0)  # identical


def test_data_parallel_communicates_a_few_bytes_per_step_whatever_the_model_size(ranks):
    for r in ranks:
        assert r["bytes5"] == r["bytes256"] == 16  # two all-reduces of one float64
    n_small = sum(p.numel() for p in _mlp(5).parameters())
    n_large = sum(p.numel() for p in _mlp(256).parameters())
    assert n_large > 30 * n_small


def test_unequal_shards_weighted_by_size_match_the_whole_batch(ranks):
    want = _single(5)
    for r in ranks:
        _assert_params_equal(r["weighted"], want, **TOL)


def test_fsdp2_sharded_training_matches_unsharded(ranks):
    assert [r["local_rows"] for r in ranks] == [3, 2]  # uneven shards of 5 rows
    want = _single(5)
    for r in ranks:
        _assert_params_equal(r["fsdp"], want, **TOL)
    _assert_params_equal(ranks[0]["fsdp"], ranks[0]["dp5"], rtol=0, atol=0)  # same as data parallel, bit for bit


def test_a_sharded_run_replays_onto_the_unsharded_model(ranks):
    out = os.path.dirname(ranks[0]["out"])
    for rank, r in enumerate(ranks):
        model = zotune.replay(_mlp(5), os.path.join(out, f"fsdp{rank}.zot"))  # global shapes and names
        _assert_params_equal({n: p.detach() for n, p in model.named_parameters()}, r["fsdp"], rtol=0, atol=0)


def test_column_sharded_dtensor_is_refused(ranks):
    for r in ranks:
        assert "Shard(0)" in r["shard1"] and "Shard(dim=1)" in r["shard1"]


@pytest.mark.parametrize("case, words", [
    ("bad_seed", ["seed", "rank 0: 3", "rank 1: 4"]),
    ("bad_step", ["step", "rank 0: 0", "rank 1: 1"]),
    ("bad_params", ["parameter set"]),
    ("bad_values", ["parameter values"]),
    ("bad_variant", ["variant", "n_perturbations"]),
])
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

    opt = _optimizer(model)
    for _ in range(STEPS):
        opt.step(accumulate([closure_for(*b) for b in micro], weights=sizes))
    assert len(calls) == 2 * len(sizes) * STEPS  # every micro-batch at +eps and at -eps
    _assert_params_equal({n: p.detach() for n, p in model.named_parameters()}, want, **TOL)


def test_accumulate_rejects_bad_weights():
    with pytest.raises(ValueError, match="at least one"):
        accumulate([])
    with pytest.raises(ValueError, match="weights"):
        accumulate([lambda: 1.0], [1.0, 2.0])
    with pytest.raises(ValueError, match="positive"):
        accumulate([lambda: 1.0], [0.0])
