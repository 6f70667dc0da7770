"""pytest-benchmark suite for the GlobalPointer loss: the harness's cases at small sizes through every
provider this machine can run, each checked against the reference before it is timed.

    pytest benchmarks/test_bench_global_pointer.py -q --benchmark-disable
"""
from __future__ import annotations

import pytest

from benchmarks import global_pointer as bench
from benchmarks import runner

OP = bench.OP
COMPILE_CASES = {"loss-B2-H3-L23-d16-fp32", "loss-B2-H3-L64-d32-bf16"}


@pytest.mark.parametrize("case,provider,mode", runner.provider_params(OP, COMPILE_CASES, ("fwd",)))
def test_global_pointer_provider(benchmark, case, provider, mode):
    runner.provider_test(OP, benchmark, case, provider, mode)


def test_expected_matches_the_reference_call():
    """`expected` (one batch row at a time) is the reference's mean loss over the whole batch."""
    import torch
    case = OP.small_cases("cpu")[0]
    inputs = OP.make_inputs(case, 0)
    whole = bench._ref().global_pointer_loss(inputs.q.detach(), inputs.k.detach(), inputs.spans, inputs.mask)
    torch.testing.assert_close(bench.expected(case, inputs), whole)
