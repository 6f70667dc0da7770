"""Builds kxops: the C++ CPU extension always, the CUDA sources when torch is a CUDA build and nvcc
is found (or FORCE_CUDA=1). The package source lives in pyext/ (imported as `kxops`) and the Triton
kernels in triton_kernels/ (imported as `kxops.triton_kernels`, never as a top-level
`triton_kernels`, which Triton itself ships)."""
import glob
import os
import shutil

from setuptools import setup
import torch
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

debug = os.environ.get("KXOPS_DEBUG", "0") == "1"
opt = ["-O0", "-g"] if debug else ["-O3", "-g0"]  # setuptools' default -g doubles compile time
cxx = opt + ["-fopenmp", "-std=c++20"]             # without -fopenmp at::parallel_for is serial

sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
cuda_sources = sorted(glob.glob("csrc/cuda/*.cu"))
nvcc = shutil.which("nvcc") or (CUDA_HOME and os.path.join(CUDA_HOME, "bin", "nvcc"))
with_cuda = os.environ.get("FORCE_CUDA", "0") == "1" or (
    torch.version.cuda is not None and nvcc is not None and os.path.exists(nvcc))

kw = dict(extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"])
if with_cuda:
    # Hopper by default (the target machines); TORCH_CUDA_ARCH_LIST overrides it.
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0a")
    kw["extra_compile_args"]["nvcc"] = opt[:1] + ["-std=c++20", "--expt-relaxed-constexpr", "-lineinfo"]
    ext = CUDAExtension("kxops._C", sources + cuda_sources, **kw)
else:
    ext = CppExtension("kxops._C", sources, **kw)

setup(
    name="kxops",
    version="0.1.0",
    description="Fused PyTorch operators for the techniques of kexue.fm (RoPE, linear attention, ...)",
    packages=["kxops", "kxops.reference", "kxops.integrations", "kxops.triton_kernels"],
    package_dir={"kxops": "pyext", "kxops.triton_kernels": "triton_kernels"},
    ext_modules=[ext],
    cmdclass={"build_ext": BuildExtension},
    python_requires=">=3.10",
)
