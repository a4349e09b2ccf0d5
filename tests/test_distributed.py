"""errwrap._distributed: one-process answers, and sums/gathers over two gloo processes."""

import ast
import os
import tempfile
from pathlib import Path

import pytest
import torch

from errwrap import _distributed as D


def test_one_process_answers():
    assert D.is_initialized() is False
    assert (D.rank(), D.world_size(), D.rank_and_world()) == (0, 1, (0, 1))
    assert D.communication_device("cpu") == torch.device("cpu")
    assert D.gather_objects({"a": [1, 2]}) == [{"a": [1, 2]}]
    assert D.barrier() is None


def test_one_process_reductions_leave_values_unchanged():
    t = torch.tensor([1.5, -2.0, 3.25])
    out = D.all_reduce_sum(t)
    assert out is t and torch.equal(t, torch.tensor([1.5, -2.0, 3.25]))
    summed = D.sum_over_processes([3, 0.1, 2.5])
    assert summed == [3.0, 0.1, 2.5] and all(type(v) is float for v in summed)


def _worker(rank, world_size, init_file, results):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        t = torch.arange(3, dtype=torch.float32) + 10 * rank
        same = D.all_reduce_sum(t)
        D.barrier()
        results[rank] = {
            "initialized": D.is_initialized(),
            "rank_world": D.rank_and_world(),
            "device": str(D.communication_device("cpu")),
            "sum": t.tolist(),
            "in_place": same is t,
            "floats": D.sum_over_processes([1.0, rank + 0.5]),
            "gathered": D.gather_objects(("rank", rank)),
        }
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_processes_sum_and_gather_in_rank_order():
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        results = mp.Manager().dict()
        mp.spawn(_worker, args=(2, os.path.join(tmp, "init"), results), nprocs=2, join=True)
        for rank in range(2):
            got = results[rank]
            assert got["initialized"] and got["rank_world"] == (rank, 2) and got["device"] == "cpu"
            assert got["sum"] == [10.0, 12.0, 14.0] and got["in_place"]  # [0, 1, 2] + [10, 11, 12]
            assert got["floats"] == [2.0, 2.0]  # 1 + 1, 0.5 + 1.5
            assert got["gathered"] == [("rank", 0), ("rank", 1)]


def test_only_distributed_module_imports_torch_distributed():
    src = Path(__file__).resolve().parents[1] / "src" / "errwrap"
    found = []
    for path in src.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            if any(n == "torch.distributed" or n.startswith("torch.distributed.") for n in names):
                found.append(str(path.relative_to(src)))
    assert found == ["_distributed.py"]
