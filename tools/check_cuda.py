"""Compiles every csrc/**/*.cu (and the test-only tests/cuda/*.cu, which tools/cuda_emulate.py runs
on the host) with nvcc the way BuildExtension would, for sm_80 and sm_90a, into a temporary
directory: a compile check that needs neither a GPU nor a CUDA build of torch.

    python tools/check_cuda.py                 # all .cu files, both archs
    python tools/check_cuda.py --ptxas-v       # also print ptxas register / spill usage
    python tools/check_cuda.py -- -lineinfo    # extra nvcc arguments after --

Exits non-zero, with the compiler output, when any compile fails.
"""
import argparse
import concurrent.futures as cf
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ARCHS = {  # arch group -> its -gencode
    "sm_80": "arch=compute_80,code=sm_80",
    "sm_90a": "arch=compute_90a,code=sm_90a",
}


def find_nvcc():
    candidates = []
    if os.environ.get("CUDA_HOME"):
        candidates.append(Path(os.environ["CUDA_HOME"]) / "bin" / "nvcc")
    candidates.append(Path("/usr/local/cuda/bin/nvcc"))
    on_path = shutil.which("nvcc")
    if on_path:
        candidates.append(Path(on_path))
    for c in candidates:
        if c.is_file() and os.access(c, os.X_OK):
            return str(c)
    return None


def base_flags():
    import torch
    from torch.utils.cpp_extension import COMMON_NVCC_FLAGS, include_paths

    flags = ["-c", "-std=c++20", "-O3", "-Xcompiler", "-fPIC"]
    # BuildExtension's defines (no half/bf16 operators or implicit conversions) and the extension's.
    flags += list(COMMON_NVCC_FLAGS)
    for f in ("-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
              "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__",
              "--expt-relaxed-constexpr"):
        if f not in flags:
            flags.append(f)
    flags += ["-DTORCH_EXTENSION_NAME=_C", "-DTORCH_API_INCLUDE_EXTENSION_H",
              f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"]
    if torch.version.cuda is None:
        # A CPU torch ships the c10/cuda headers but not the cmake-generated cuda_cmake_macros.h.
        flags.append("-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE")
    for inc in include_paths() + [sysconfig.get_paths()["include"]]:
        flags += ["-I", inc]
    return flags


def compile_one(nvcc, flags, src, archs, outdir):
    """One nvcc call for every arch of a file, as BuildExtension makes it: the host side (torch's headers,
    most of a small file's time) is compiled once, not once per arch."""
    rel = src.relative_to(ROOT) if src.is_relative_to(ROOT) else Path(src.name)
    obj = Path(outdir) / f"{'__'.join(rel.with_suffix('').parts)}.o"  # unique per path
    gencodes = [g for a in archs for g in ("-gencode", ARCHS[a])]
    cmd = [nvcc, *flags, *gencodes, str(src), "-o", str(obj)]
    arch = ",".join(archs)
    t0 = time.monotonic()
    proc = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return src, arch, proc.returncode, time.monotonic() - t0, proc.stdout, cmd


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ptxas-v", action="store_true", help="print ptxas resource usage (-Xptxas -v)")
    ap.add_argument("--arch", action="append", choices=sorted(ARCHS), help="only these arch groups")
    ap.add_argument("files", nargs="*", help="only these .cu files (default: csrc/**/*.cu, tests/cuda/*.cu)")
    argv = sys.argv[1:]
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    args = ap.parse_args(argv[:len(argv) - len(extra) - (1 if "--" in argv else 0)])

    nvcc = find_nvcc()
    if nvcc is None:
        sys.exit("check_cuda: nvcc not found ($CUDA_HOME/bin, /usr/local/cuda/bin or PATH)")
    sources = [Path(f).resolve() for f in args.files] or sorted((ROOT / "csrc").rglob("*.cu")) + sorted(
        (ROOT / "tests" / "cuda").glob("*.cu"))
    if not sources:
        print("check_cuda: no .cu files under csrc/")
        return 0
    flags = base_flags() + (["-Xptxas", "-v"] if args.ptxas_v else []) + extra
    archs = args.arch or list(ARCHS)

    failed = []
    t_all = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="kxops-cuda-check-") as outdir, \
            cf.ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        jobs = [pool.submit(compile_one, nvcc, flags, s, archs, outdir) for s in sources]
        for job in cf.as_completed(jobs):
            src, arch, rc, dt, output, cmd = job.result()
            rel = src.relative_to(ROOT) if src.is_relative_to(ROOT) else src
            print(f"{'ok  ' if rc == 0 else 'FAIL'} {rel} [{arch}] {dt:.1f}s", flush=True)
            if rc != 0:
                failed.append((rel, arch, output, cmd))
            elif output.strip():  # warnings, or ptxas -v
                print(output.rstrip(), flush=True)
    for rel, arch, output, cmd in failed:
        print(f"\n==== {rel} [{arch}] failed:\n{' '.join(cmd)}\n{output.rstrip()}", file=sys.stderr)
    n = len(sources)
    print(f"check_cuda: {n - len(failed)}/{n} files compiled for {', '.join(archs)} with {os.path.basename(nvcc)} "
          f"({nvcc}) in {time.monotonic() - t_all:.1f}s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
