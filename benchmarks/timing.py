"""Timing, the copy-bandwidth yardstick, peak memory and the environment stamp of a run.

Device timing (the default). GPU: CUDA-event timing through triton.testing.do_bench (it flushes L2
before every call and reports quantiles). CPU: torch.utils.benchmark.Timer.blocked_autorange with the
process's thread count (the Timer's own default is one thread).
Host timing (time_host): the wall clock of back-to-back calls, for calls whose host-side cost exceeds
their kernel time; CUDA events then time the gaps the L2 flush leaves, not what a user waits for."""
from __future__ import annotations

import contextlib
import datetime
import gc
import os
import platform
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch

from .core import Inputs

QUANTILES = (0.5, 0.2, 0.8)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclass
class Timing:
    median_ms: float
    p20_ms: float
    p80_ms: float


@dataclass
class Budget:
    """How long each measurement runs: GPU warmup / rep in ms (do_bench); CPU: blocked_autorange's
    min_run_time in s, topped up to at least cpu_min_samples blocks; host timing: host_blocks blocks of
    back-to-back calls, each at least host_block_s long."""
    gpu_warmup_ms: int = 25
    gpu_rep_ms: int = 100
    cpu_min_run_s: float = 0.5
    cpu_min_samples: int = 5
    host_block_s: float = 0.02
    host_blocks: int = 15

    @classmethod
    def quick(cls) -> "Budget":
        return cls(gpu_warmup_ms=10, gpu_rep_ms=40, cpu_min_run_s=0.15, cpu_min_samples=3, host_block_s=0.01,
                   host_blocks=7)


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_fn(fn: Callable[[], Any], device: str, budget: Budget, how: str = "device") -> Timing:
    if how == "host":
        return time_host(fn, device, budget)
    if device == "cuda":
        import triton.testing
        q = triton.testing.do_bench(fn, warmup=budget.gpu_warmup_ms, rep=budget.gpu_rep_ms,
                                    quantiles=list(QUANTILES))
        return Timing(*q)
    from torch.utils import benchmark as tb
    fn()  # warm-up: first-touch page faults, lazily built autograd graphs, allocator growth
    timer = tb.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    m = timer.blocked_autorange(min_run_time=budget.cpu_min_run_s)
    times = list(m.times)  # per-call time of each block, s
    while len(times) < budget.cpu_min_samples:  # slow calls: a few blocks more, for the quantiles
        times += timer.timeit(m.number_per_run).times
    return _quantiles(times)


def _quantiles(times_s: list) -> Timing:
    import numpy as np
    t = np.asarray(times_s) * 1e3
    return Timing(float(np.median(t)), float(np.percentile(t, 20)), float(np.percentile(t, 80)))


def time_host(fn: Callable[[], Any], device: str, budget: Budget) -> Timing:
    """Per-call time of eager calls as a user waits for them: n back-to-back calls between two device
    synchronisations, by the wall clock, divided by n (n large enough that a block lasts host_block_s, so
    the synchronisation is amortised); host_blocks such blocks give the quantiles."""
    def block(n: int) -> float:
        synchronize(device)
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        synchronize(device)
        return time.perf_counter() - t0

    gc_was_enabled = gc.isenabled()
    gc.disable()  # as timeit does: a collection inside a block is noise, not the call's cost
    try:
        n, t = 1, block(1)  # the first blocks also warm up (allocator, lazily built state)
        while t < budget.host_block_s and n < 2**20:
            n = min(2**20, max(2 * n, int(1.2 * n * budget.host_block_s / max(t, 1e-9))))
            t = block(n)
        return _quantiles([block(n) / n for _ in range(budget.host_blocks)])
    finally:
        if gc_was_enabled:
            gc.enable()


def cuda_graph(fn: Callable[[], Any]) -> Callable[[], Any]:
    """fn captured in a torch.cuda.CUDAGraph: returns the replay, which returns the captured call's output
    (static buffers, rewritten by every replay). fn must not synchronise with the host (capture forbids
    it) and is called a few times on a side stream first, as torch.cuda.graphs asks: Triton compiles and
    the caching allocator settles outside the capture."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()

    def replay():
        graph.replay()
        return out
    return replay


def peak_memory_mib(fn: Callable[[], Any], device: str) -> Optional[float]:
    """Peak memory one call allocates above what is already live (inputs, saved tensors), in MiB.
    CUDA: the caching allocator's max_memory_allocated. CPU: see cpu_peak_bytes."""
    if device != "cuda":
        peak = cpu_peak_bytes(fn)
        return None if peak is None else peak / 2**20
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    del out
    return peak / 2**20


def cpu_peak_bytes(fn: Callable[[], Any]) -> Optional[int]:
    """Peak bytes held by torch's CPU allocator during one call, above what was held before it: the running
    sum, in time order, of the allocation (+) and free (-) events torch.profiler records with
    profile_memory=True (the allocator reports every block it hands out or takes back, on every thread).
    It counts tensors, as max_memory_allocated does on CUDA: memory a library allocates past torch's
    allocator (a std::vector inside a C++ kernel, oneDNN scratchpads) is not seen, and a block allocated
    before the call and freed during it is not subtracted (an overestimate). None when the profiler
    records no memory events. The profiler's start/stop lines on stderr are silenced."""
    from torch.profiler import ProfilerActivity, profile
    gc.collect()
    with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn()
        del out
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    if not events:
        return None
    held = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        held += e.nbytes()
        peak = max(peak, held)
    return peak


@contextlib.contextmanager
def _quiet_stderr():
    """File descriptor 2 sent to /dev/null for the duration (Kineto logs each profiler start and stop there)."""
    sys.stderr.flush()
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    os.close(devnull)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def make_step(fn: Callable[[], Any], inputs: Inputs, mode: str, outputs: Callable[[Any], list],
              seed: int) -> Callable[[], Any]:
    """The callable a mode times. fwd: the forward of a training step (inputs require grad, as in
    Liger-Kernel's benchmarks). bwd: the backward alone, over a graph built once and retained.
    fwd_bwd: both. Output gradients are random (seeded) and made once, outside the timed region."""
    if mode == "fwd":
        return fn
    leaves = inputs.grad_leaves()
    if not leaves:
        raise RuntimeError("mode needs a gradient but the case has no input that requires grad")
    outs = [o for o in outputs(fn()) if o.requires_grad]
    if not outs:
        raise RuntimeError("no output requires grad")
    gen = torch.Generator(device=outs[0].device).manual_seed(seed + 1)
    grads = [torch.randn(o.shape, dtype=o.dtype, device=o.device, generator=gen) for o in outs]
    if mode == "bwd":
        return lambda: torch.autograd.grad(outs, leaves, grads, retain_graph=True, allow_unused=True)
    if mode == "fwd_bwd":
        def step():
            o = [t for t in outputs(fn()) if t.requires_grad]
            return torch.autograd.grad(o, leaves, grads, allow_unused=True)
        return step
    raise ValueError(f"unknown mode {mode!r}")


def copy_bandwidth_gbps(device: str, budget: Budget, nbytes: Optional[int] = None) -> float:
    """The device's copy bandwidth: a large tensor copy, counting read + write bytes. Sized well past
    the last-level cache (1 GiB on GPU, 256 MiB on CPU)."""
    nbytes = nbytes or (2**30 if device == "cuda" else 2**28)
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.zeros_like(src)  # touched now: first-touch page faults would otherwise be timed
    t = time_fn(lambda: dst.copy_(src), device, budget)
    del src, dst
    if device == "cuda":
        torch.cuda.empty_cache()
    return 2 * nbytes / (t.median_ms * 1e-3) / 1e9


# ----------------------------------------------------------------------------------------------
# The environment stamp of a run.

def slugify(s: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", s.lower()).strip("-") or "unknown"


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    return f"{cpu_model()} ({torch.get_num_threads()} threads)"


def device_slug(device: str) -> str:
    if device == "cuda":
        return slugify(torch.cuda.get_device_name())
    return f"{slugify(cpu_model())}-{torch.get_num_threads()}t"


def git_sha() -> str:
    def git(*args):
        return subprocess.run(["git", "-C", REPO, *args], capture_output=True, text=True, timeout=10)
    try:
        r = git("rev-parse", "--short=12", "HEAD")
        if r.returncode != 0:
            return "nogit"
        sha = r.stdout.strip()
        dirty = git("status", "--porcelain", "--untracked-files=no").stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "nogit"


def triton_version() -> str:
    try:
        import triton
        return triton.__version__
    except Exception:  # noqa: BLE001  (a broken triton install must not stop a CPU run)
        return ""


def environment(device: str) -> dict:
    return {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "device": device,
        "device_name": device_name(device),
        "num_threads": torch.get_num_threads() if device == "cpu" else "",
        "torch": torch.__version__,
        "triton": triton_version(),
        "python": platform.python_version(),
        "git_sha": git_sha(),
    }


def release(device: str) -> None:
    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def stderr_isatty() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False
