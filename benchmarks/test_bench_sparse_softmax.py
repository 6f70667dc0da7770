"""pytest-benchmark suite for the sparse softmaxes: the harness's cases at small sizes through every provider
this machine can run, each checked against the reference (float32 state) before it is timed; kxops
backends whose kernels are not built yet skip.

    pytest benchmarks/test_bench_sparse_softmax.py -q --benchmark-disable
"""
from __future__ import annotations

import pytest
import torch

from benchmarks import runner
from benchmarks import sparse_softmax as bench

OP = bench.OP
COMPILE_CASES = {"sparsemax-R8-N300-fp32", "sparsemax-R64-N1000-bf16"}


@pytest.mark.parametrize("case,provider,mode", runner.provider_params(OP, COMPILE_CASES, ("fwd",)))
def test_sparse_softmax_provider(benchmark, case, provider, mode):
    runner.provider_test(OP, benchmark, case, provider, mode)


def test_cases_and_targets_are_consistent():
    """Every target names a declared case and provider; the GPU and CPU target cases are the issue's shapes."""
    names = {c.name for d in ("cpu", "cuda") for c in OP.cases(d)}
    providers = {p.name for p in OP.providers}
    for t in OP.targets:
        assert t.case in names, t.case
        for p in (t.provider,) if isinstance(t.provider, str) else t.provider:
            assert p in providers, p
        for group in t.faster_than:
            for p in (group,) if isinstance(group, str) else group:
                assert p in providers, p
    gpu = {(c["fn"], c["R"], c["N"], c.dtype) for c in bench.gpu_target_cases()}
    assert gpu == {(f, 4096, 32768, dt) for f in ("sparsemax", "entmax15") for dt in (torch.bfloat16, torch.float32)}
    cpu = {(c["fn"], c["R"], c["N"], c.dtype) for c in bench.cpu_target_cases()}
    assert cpu == {(f, 256, 32768, torch.float32) for f in ("sparsemax", "entmax15")}


def test_reference_in_float32_matches_the_spec_in_float64():
    """The reference provider (the spec evaluated in float32, returned in x's dtype) against the spec in float64."""
    ref = bench._ref()
    for case in OP.small_cases("cpu"):
        inputs = OP.make_inputs(case, 0)
        out = bench.setup_reference(case, inputs)()
        assert out.dtype == case.dtype and out.shape == inputs.x.shape
        x = inputs.x.detach().double()
        fn = case["fn"]
        if fn == "entmax_bisect":
            want = ref.entmax_bisect(x, inputs.alpha.detach().double(), -1, bench.N_ITER)
        elif fn == "topk_softmax":
            want = ref.topk_softmax(x, bench.TOPK, -1)
        else:
            want = getattr(ref, fn)(x, -1)
        assert bench.rel_rms_error(want.to(case.dtype), out) <= OP.tolerance(case.dtype) / 10, case.name
