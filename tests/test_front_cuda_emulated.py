"""csrc/cuda/front_cuda.cu, the CUDA build's graph-capture probe, run on the host through
tools/cuda_emulate.py (tests/cuda/front_cuda_probe.cu puts it behind one op): it installs itself into the
fronts' hook at load, reports capture (active or invalidated) of the current stream, and when the runtime
call fails (no CUDA context yet) it says "not capturing" and clears the error it caused, so that the next
kernel launch check does not fail on it. On a GPU the real probe is exercised by the CUDA graph tests."""
import os
import sys

import pytest
import torch

from testing import HAS_CUDA

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools"))
import cuda_emulate  # noqa: E402

pytestmark = [
    pytest.mark.skipif(HAS_CUDA, reason="a GPU is visible: the real probe runs in the CUDA graph tests"),
    pytest.mark.skipif(cuda_emulate.cuda_include_dir() is None, reason="CUDA headers not found (set CUDA_HOME)"),
]

PROBE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cuda", "front_cuda_probe.cu")
CUDA_SUCCESS = 0


@pytest.fixture(scope="module")
def probe():
    return cuda_emulate.load(PROBE).probe


@pytest.mark.parametrize("mode, capturing", [("none", False), ("active", True), ("invalidated", True),
                                             ("no-context", False)])
def test_probe_reports_capture(probe, monkeypatch, mode, capturing):
    monkeypatch.setenv("KXOPS_EMU_STREAM_CAPTURE", mode)
    installed, got, last_error = probe(torch.empty(1))
    assert installed, "front_cuda.cu did not install its probe at load"
    assert got == capturing
    assert last_error == CUDA_SUCCESS, f"the probe left the runtime error {last_error} behind"
