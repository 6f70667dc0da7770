"""kxops.distributed.linear_attention (context parallelism) in 2, 3 and 4 gloo processes on CPU.

One process group per world size runs every case (tests/distributed_worker.py, in a subprocess with a
deadline, so that a hang fails the tests instead of stalling CI); each test reads its case's result on
every rank. Under pytest-xdist the workers share the runs: the first to need a world size runs it under
a file lock, the others read its results."""
from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys

import pytest

import distributed_worker as worker

HERE = os.path.dirname(os.path.abspath(__file__))
WORLDS = (2, 3, 4)
DEADLINE = 600  # seconds for one world size's whole run (about 15 s here)
_RUNS: dict = {}


def _run(world: int, root: str) -> tuple:
    """(results by rank, the subprocess's output): the worker's run for this world size, once per test run."""
    if world in _RUNS:
        return _RUNS[world]
    out_dir = os.path.join(root, f"world{world}")
    os.makedirs(root, exist_ok=True)
    with open(os.path.join(root, f"world{world}.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        done = os.path.join(root, f"world{world}.log")
        if not os.path.exists(done):
            try:
                proc = subprocess.run([sys.executable, "-X", "faulthandler",
                                       os.path.join(HERE, "distributed_worker.py"), str(world), out_dir],
                                      capture_output=True, text=True, timeout=DEADLINE)
                log = f"exit code {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
            except subprocess.TimeoutExpired as e:
                log = f"no result after {DEADLINE} s (a hang)\n{e.stdout!r}\n{e.stderr!r}"
            with open(done, "w") as f:
                f.write(log)
        log = open(done).read()
    ranks = []
    for r in range(world):
        path = os.path.join(out_dir, f"rank{r}.json")
        ranks.append(json.load(open(path)) if os.path.exists(path) else {})
    _RUNS[world] = (ranks, log)
    return _RUNS[world]


@pytest.fixture(scope="session")
def tmp_root(tmp_path_factory):
    """A directory every xdist worker of this run shares (and no other run)."""
    uid = os.environ.get("PYTEST_XDIST_TESTRUNUID")
    base = tmp_path_factory.getbasetemp()
    return str(base.parent / f"distributed-{uid}") if uid else str(base / "distributed")


@pytest.mark.parametrize("case", worker.ALL)
@pytest.mark.parametrize("world", WORLDS)
def test_linear_attention_distributed(world, case, tmp_root):
    ranks, log = _run(world, tmp_root)
    for r, results in enumerate(ranks):
        got = results.get(case)
        if got is None:
            pytest.fail(f"rank {r} of {world} has no result for {case}:\n{log}")
        if got.startswith("skip:"):
            pytest.skip(got[5:].strip())
        assert got == "ok", f"rank {r} of {world}:\n{got}"


# ----------------------------------------------------------------------------------------------
# One rank in this process: gloo on CPU here, NCCL on a GPU (where the header and the states travel
# as CUDA tensors; one GPU admits one NCCL rank).

@pytest.mark.parametrize("pg_backend,device", [("gloo", "cpu"), ("nccl", "cuda")])
def test_single_rank_in_process(pg_backend, device, tmp_path):
    import torch
    import torch.distributed as dist

    import kxops
    from testing import assert_close_to_ref

    if device == "cuda" and not (torch.cuda.is_available() and dist.is_nccl_available()):
        pytest.skip("needs a GPU and NCCL")
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group(pg_backend, store=store, rank=0, world_size=1)
    try:
        g = torch.Generator().manual_seed(3)
        q, k, v = (torch.randn(2, 37, 3, d, generator=g).to(device) for d in (8, 8, 6))
        S0, z0 = torch.randn(2, 3, 8, 6, generator=g).to(device), torch.rand(2, 3, 8, generator=g).to(device)
        gout = torch.randn(2, 37, 3, 6, generator=g).to(device)
        for causal in (True, False):
            leaves = [t.detach().clone().requires_grad_() for t in (q, k, v, S0, z0)]
            out, (S, z) = kxops.distributed.linear_attention(*leaves[:3], initial_state=tuple(leaves[3:]),
                                                             output_final_state=True, rope=True, causal=causal)
            ((out * gout).sum() + S.sum() + z.sum()).backward()
            mine = (out, S, z, *(t.grad for t in leaves))
            ref64 = []
            for dt in (torch.float64, torch.float32):
                leaves = [t.detach().to(dt).clone().requires_grad_() for t in (q, k, v, S0, z0)]
                out, (S, z) = kxops.linear_attention(*leaves[:3], initial_state=tuple(leaves[3:]),
                                                     output_final_state=True, rope=True, causal=causal,
                                                     backend="reference")
                ((out * gout.to(dt)).sum() + S.sum() + z.sum()).backward()
                ref64.append((out, S, z, *(t.grad for t in leaves)))
            for i, (d, r64, rlp) in enumerate(zip(mine, *ref64)):
                assert d is not None, f"causal={causal} [{i}]: no gradient"
                assert d.device.type == device
                assert_close_to_ref(d, r64, rlp, f"causal={causal} [{i}]")
    finally:
        dist.destroy_process_group()
