"""ShardedMemory across 2 and 4 gloo processes on this machine equals one process's retrieve.

One spawn of 4 processes runs every case (processes start slowly), on the whole group and on a
subgroup of ranks 0 and 1; each rank writes what it measured to a JSON file and the test asserts
on it here.
"""

from __future__ import annotations

import json
import os
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

# (similarity, separation, alpha, steps, tol, candidates, score_mask): every separation, steps > 1
# with and without tol, a candidate buffer of 4 so that sparse rows take the Newton passes, and
# per-query score masks (each rank's shard gathered by columns, hen_fast.masked).
CASES = [
    ("dot", "softmax", 1.5, 1, None, None, False),
    ("l2", "softmax", 1.5, 3, None, None, False),
    ("dot", "sparsemax", 1.5, 1, None, None, False),
    ("l2", "sparsemax", 1.5, 3, 1e-6, None, False),
    ("manhattan", "entmax", 1.25, 1, None, None, False),
    ("dot", "entmax", 1.5, 2, None, None, False),
    ("l2", "entmax", 1.8, 1, None, 4, False),
    ("dot", "sparsemax", 1.5, 1, None, 4, False),
    ("dot", "polynomial", 1.5, 2, None, None, False),
    ("l2", "softmax", 1.5, 2, None, None, True),
    ("manhattan", "sparsemax", 1.5, 1, None, 4, True),
    ("dot", "entmax", 1.5, 1, None, None, True),
]
BETA = {"dot": 0.7, "l2": 0.25, "manhattan": 0.3}


WORLD_SIZE = 4
GROUP_SIZES = (2, 4)


def _worker(rank, init_file, out_dir, seed):
    sys.path.insert(0, os.path.dirname(__file__))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=WORLD_SIZE)  # fmt: skip
    try:
        pair = dist.new_group([0, 1])  # collective: every rank takes part in creating it
        report = {}
        for size in GROUP_SIZES:
            if rank < size:
                group = None if size == WORLD_SIZE else pair
                report[size] = _run_cases(rank, size, group, seed + size)
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as file:
            json.dump(report, file)
    finally:
        dist.destroy_process_group()


def _run_cases(rank, world_size, group, seed):
    import hen_fast
    from hen_fast import oracle
    from hen_fast.distributed import ShardedMemory

    from helpers import rel_err

    gen = torch.Generator().manual_seed(seed)
    dim, value_dim, num_queries = 11, 6, 5
    # Uneven shards: rank r holds 23 + 7 r memories.
    sizes = [23 + 7 * r for r in range(world_size)]
    keys = torch.randn(sum(sizes), dim, generator=gen)
    values = torch.randn(sum(sizes), value_dim, generator=gen)
    queries = keys[:num_queries] + 0.5 * torch.randn(num_queries, dim, generator=gen)
    start = sum(sizes[:rank])
    local = slice(start, start + sizes[rank])
    results = []
    # Two queries share a mask, one has none: the masked cases make three calls per rank.
    score_mask = torch.rand(num_queries, dim, generator=gen) < 0.6
    score_mask[1], score_mask[2] = score_mask[0], False
    for similarity, separation, alpha, steps, tol, candidates, masked in CASES:
        hetero = steps == 1
        kwargs = dict(beta=BETA[similarity], similarity=similarity, separation=separation,
                      alpha=alpha, steps=steps, tol=tol)  # fmt: skip
        if masked:
            kwargs["score_mask"] = score_mask
        shard = ShardedMemory(keys[local], values[local] if hetero else None, group=group,
                              candidates=candidates)  # fmt: skip
        out, info = shard.retrieve(queries, return_info=True, **kwargs)
        whole = hen_fast.retrieve(queries, keys, values if hetero else None, return_info=True,
                                  **kwargs)  # fmt: skip
        exact = oracle.naive_retrieve(queries, keys, values if hetero else None, **kwargs)
        same_on_all = all(torch.equal(out, other) for other in shard.gatherer.gather(out))
        results.append(
            dict(
                case=[similarity, separation, alpha, steps, tol, candidates, masked],
                vs_one_process=rel_err(out, whole[0]),
                vs_float64=rel_err(out, exact),
                one_process_vs_float64=rel_err(whole[0], exact),
                argmax_equal=bool(torch.equal(info.argmax, whole[1].argmax)),
                steps_equal=bool(torch.equal(info.steps, whole[1].steps)),
                support_gap=int((info.support - whole[1].support).abs().max()),
                lse_error=rel_err(info.lse, whole[1].lse, floor=1.0),
                same_on_all_ranks=same_on_all,
            )
        )
    # A NaN in one rank's shard: every rank raises (none is left waiting in a collective).
    poisoned = keys[local].clone()
    if rank == world_size - 1:
        poisoned[0, 0] = float("nan")
    try:
        ShardedMemory(poisoned, group=group).retrieve(queries)
        raised = ""
    except ValueError as error:
        raised = str(error)
    return dict(results=results, nan_error=raised)


@pytest.mark.slow  # four fresh Python processes importing torch: ~10 s of CPU time
def test_sharded_retrieve_on_2_and_4_processes_equals_one_process(tmp_path, gen):
    seed = int(torch.randint(0, 2**30, (1,), generator=gen))
    mp.spawn(_worker, args=(str(tmp_path / "init"), str(tmp_path), seed), nprocs=WORLD_SIZE,
             join=True)  # fmt: skip
    reports = {size: [] for size in GROUP_SIZES}
    for rank in range(WORLD_SIZE):
        with open(tmp_path / f"rank{rank}.json") as file:
            for size, report in json.load(file).items():
                reports[int(size)].append(report)
    assert [len(reports[size]) for size in GROUP_SIZES] == list(GROUP_SIZES)
    for world_size in GROUP_SIZES:
        _check_reports(world_size, reports[world_size])


def _check_reports(world_size, reports):
    for rank, report in enumerate(reports):
        assert len(report["results"]) == len(CASES)
        for result in report["results"]:
            where = (world_size, rank, result["case"])
            steps = result["case"][3]
            assert result["same_on_all_ranks"], where
            # Within 1e-5 of one process; several updates amplify float32 rounding differently
            # for every summation order, so there the bound is the accuracy rule against float64.
            if steps == 1:
                assert result["vs_one_process"] < 1e-5, (where, result)
            assert result["vs_float64"] < (1e-5 if steps == 1 else 1e-4), (where, result)
            assert result["argmax_equal"] and result["steps_equal"], (where, result)
            assert result["support_gap"] <= 2, (where, result)
            assert result["lse_error"] < 1e-5 * steps, (where, result)
        assert f"rank(s) [{world_size - 1}]" in report["nan_error"], report["nan_error"]


def test_sharded_memory_needs_an_initialised_group():
    from hen_fast.distributed import ShardedMemory

    if dist.is_initialized():
        pytest.skip("a default process group exists in this process")
    with pytest.raises(ValueError, match="init_process_group"):
        ShardedMemory(torch.randn(3, 2))
