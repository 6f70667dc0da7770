"""pytest-benchmark suite for the front's per-call host cost: every family's smallest call through every
provider this machine runs, checked against the reference before it is timed.

    pytest benchmarks/test_bench_front.py -q --benchmark-disable
"""
from __future__ import annotations

import pytest

from benchmarks import front as bench
from benchmarks import runner

OP = bench.OP


@pytest.mark.parametrize("case,provider,mode", runner.provider_params(OP, set()))
def test_front_provider(benchmark, case, provider, mode):
    runner.provider_test(OP, benchmark, case, provider, mode)
