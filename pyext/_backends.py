"""Which kxops backends this machine can run."""
from __future__ import annotations

import functools
import importlib.util
import os

import torch


def _has_kernel(op: str, key: str) -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key(op, key)


def has_cpu_kernels() -> bool:
    return _has_kernel("kxops::rope", "CPU")


def has_cuda_kernels() -> bool:
    """The extension was built with its CUDA sources (a CPU-only build leaves them out)."""
    return _has_kernel("kxops::rope", "CUDA")


@functools.cache
def triton_importable() -> bool:
    return importlib.util.find_spec("triton") is not None


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def backends() -> list[str]:
    """Backends usable here: 'reference' always; 'cpu' when the C++ extension is loaded; 'cuda' when it
    carries CUDA kernels and a GPU is visible; 'triton' when Triton is installed and a GPU is visible
    (or TRITON_INTERPRET=1 runs it on CPU tensors, for tests)."""
    out = ["reference"]
    if has_cpu_kernels():
        out.append("cpu")
    gpu = torch.cuda.is_available()
    if gpu and has_cuda_kernels():
        out.append("cuda")
    if triton_importable() and (gpu or triton_interpreting()):
        out.append("triton")
    return out
