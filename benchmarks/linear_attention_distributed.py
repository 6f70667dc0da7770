"""Context-parallel linear attention (kxops.distributed.linear_attention) over gloo processes on CPU:

    python -m benchmarks.linear_attention_distributed [--quick] [--no-save]

1. bytes: what each rank hands to collectives per training step (forward + backward), for the GPU
   benchmark shape B2 H16 D128 (fp32, elu1, normalised, causal) at T 16384 split over 1, 2, 4 and 8
   ranks, and at 4 ranks for T 4096 .. 32768: the volume must not grow with the sequence length.
2. time: the wall time of a training step (forward + backward) at B2 T16384 H16 D128 with 2 ranks of
   one thread each, against 1 rank of one thread (the same work on half the cores) and 1 rank of two
   threads (the same cores in one process): medians of --reps steps, timed on rank 0 between barriers.

Rows go to benchmarks/results/<cpu>-<threads>t/linear_attention_distributed.csv (appended), and a
table is printed.
"""
from __future__ import annotations

import argparse
import csv
import datetime
import os
import statistics
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
B, H, D = 2, 16, 128


def _rank_main(rank, world, threads, T, reps, init_file, out_file):
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    import torch
    import torch.distributed as dist
    torch.set_num_threads(threads)
    import kxops

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=600))
    lengths = [T // world + (1 if r < T % world else 0) for r in range(world)]
    g = torch.Generator().manual_seed(rank)
    q, k, v = (torch.randn(B, lengths[rank], H, D, generator=g, requires_grad=True) for _ in range(3))
    gout = torch.randn(B, lengths[rank], H, D, generator=g)
    la = kxops.distributed.linear_attention
    fwd_ms, step_ms, stats = [], [], None
    for i in range(reps + 1):  # the first step warms up (allocator, OpenMP pool)
        dist.barrier()
        t0 = time.perf_counter()
        kxops.distributed.communication_stats(reset=True)
        out = la(q, k, v)
        dist.barrier()
        t1 = time.perf_counter()
        fwd = kxops.distributed.communication_stats(reset=True)
        out.backward(gout)
        dist.barrier()
        t2 = time.perf_counter()
        bwd = kxops.distributed.communication_stats(reset=True)
        q.grad = k.grad = v.grad = None
        if i:
            fwd_ms.append(1e3 * (t1 - t0))
            step_ms.append(1e3 * (t2 - t0))
        stats = (fwd, bwd)
    if rank == 0:
        fwd, bwd = stats
        with open(out_file, "w") as f:
            f.write(",".join(str(x) for x in (
                fwd["collectives"], fwd["sent_bytes"], fwd["received_bytes"], bwd["collectives"], bwd["sent_bytes"],
                bwd["received_bytes"], statistics.median(fwd_ms), statistics.median(step_ms))))
    dist.barrier()
    dist.destroy_process_group()


def run(world, threads, T, reps):
    import torch.multiprocessing as mp
    with tempfile.TemporaryDirectory() as tmp:
        out_file = os.path.join(tmp, "result")
        mp.start_processes(_rank_main, args=(world, threads, T, reps, os.path.join(tmp, "init"), out_file),
                           nprocs=world, start_method="spawn")
        vals = open(out_file).read().split(",")
    keys = ("fwd_collectives", "fwd_sent_bytes", "fwd_received_bytes", "bwd_collectives", "bwd_sent_bytes",
            "bwd_received_bytes", "fwd_ms", "fwd_bwd_ms")
    row = dict(zip(keys, (float(x) if "ms" in k else int(x) for k, x in zip(keys, vals))))
    row.update(world=world, threads_per_rank=threads, B=B, T=T, H=H, D=D, T_per_rank=-(-T // world))
    return row


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="T 2048 / 4096 and 2 steps: a smoke run")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--no-save", action="store_true")
    args = ap.parse_args(argv)
    sys.path.insert(0, REPO)
    import torch

    from benchmarks import timing

    T_main = 4096 if args.quick else 16384
    reps = 1 if args.quick else args.reps
    plan = [("bytes", W, 1, T_main) for W in (1, 2, 4, 8)]
    plan += [("bytes", 4, 1, T) for T in ((1024, 2048) if args.quick else (4096, 8192, 32768))]
    plan += [("time", 1, 1, T_main), ("time", 2, 1, T_main), ("time", 1, 2, T_main)]
    rows = []
    for kind, W, threads, T in plan:
        row = run(W, threads, T, reps)
        row["kind"] = kind
        rows.append(row)
        step_mb = (row["fwd_sent_bytes"] + row["bwd_sent_bytes"]) / 1e6
        print(f"{kind:5s} W={W} threads/rank={threads} T={T:6d}: sent per rank per step {step_mb:.3f} MB "
              f"(fwd {row['fwd_sent_bytes']} B in {row['fwd_collectives']} collectives, bwd {row['bwd_sent_bytes']} "
              f"B in {row['bwd_collectives']}), received {(row['fwd_received_bytes'] + row['bwd_received_bytes']) / 1e6:.3f}"
              f" MB; fwd {row['fwd_ms']:.0f} ms, fwd+bwd {row['fwd_bwd_ms']:.0f} ms", flush=True)
    base = {r["threads_per_rank"]: r["fwd_bwd_ms"] for r in rows if r["kind"] == "time" and r["world"] == 1}
    two = next(r for r in rows if r["kind"] == "time" and r["world"] == 2)
    print(f"2 ranks x 1 thread vs 1 rank x 1 thread: {base[1] / two['fwd_bwd_ms']:.2f}x; vs 1 rank x 2 threads: "
          f"{base[2] / two['fwd_bwd_ms']:.2f}x (fwd+bwd, T {T_main})")
    if not args.no_save:
        torch.set_num_threads(2)
        env = timing.environment("cpu")
        out_dir = os.path.join(REPO, "benchmarks", "results", timing.device_slug("cpu"))
        os.makedirs(out_dir, exist_ok=True)
        path = os.path.join(out_dir, "linear_attention_distributed.csv")
        fields = ["date", "git_sha", "torch", "device_name", "kind", "world", "threads_per_rank", "B", "T", "H", "D",
                  "T_per_rank", "fwd_collectives", "fwd_sent_bytes", "fwd_received_bytes", "bwd_collectives",
                  "bwd_sent_bytes", "bwd_received_bytes", "fwd_ms", "fwd_bwd_ms"]
        new = not os.path.exists(path)
        with open(path, "a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=fields)
            if new:
                w.writeheader()
            for r in rows:
                w.writerow({**{k: env[k] for k in ("date", "git_sha", "torch", "device_name")}, **r})
        print(f"rows appended to {os.path.relpath(path)}")


if __name__ == "__main__":
    main()
