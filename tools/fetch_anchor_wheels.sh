#!/usr/bin/env bash
# Downloads the benchmark's anchor libraries as wheels for the lent GPU machine (Python 3.12, no
# network) into .whl/ (git-ignored). Name .whl in the device call's `carry`; `make bench` installs them
# from there with --no-deps (their torch/triton requirements are already met on that machine).
#
# FlashInfer: flashinfer-python is a 59 MiB wheel (420 MiB unpacked), nearly all of it kernel sources for
# its other ops, while the whole carried tree may hold 64 MiB. Its RoPE kernels are JIT-compiled from
# data/csrc/rope.cu and flashinfer_rope_binding.cu with the headers of data/include and data/cccl, so
# the copy kept here drops data/cutlass and the other .cu sources of data/csrc (about 22 MiB remain).
# apache-tvm-ffi (its binding layer, a compiled wheel) is the one dependency the GPU image lacks for it;
# the rest of its Requires-Dist there is either present (requests, nvidia-ml-py, filelock, ...) or used
# only by its other ops (cuda-tile, nvidia-cutlass-dsl, nvidia-cudnn-frontend, nccl4py, ...).
# quack-kernels (0.7 MiB, pure Python: the Gumbel-softmax benchmark's tuned-softmax yardstick) imports
# only with nvidia-cutlass-dsl (compiled wheels, not fetched here): where that is missing, its provider
# reports the import error and is skipped.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
for spec in liger-kernel==0.8.5 fla-core==0.6.0 rotary-embedding-torch==0.9.1 einops==0.8.2 \
            flashinfer-python==0.7.2.post1 apache-tvm-ffi==0.1.15.post2 entmax==1.3 adasplash==0.2.2 \
            quack-kernels==0.6.5; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform any -d .whl "$spec"
done

python3 - .whl/flashinfer_python-*.whl <<'EOF'
"""Rewrites the FlashInfer wheel without the kernel sources its RoPE does not compile (RECORD to match)."""
import os
import sys
import zipfile

KEEP_CU = {"rope.cu", "flashinfer_rope_binding.cu"}


def dropped(name):
    if name.startswith("flashinfer/data/cutlass/"):
        return True
    if name.startswith("flashinfer/data/csrc/"):
        rest = name[len("flashinfer/data/csrc/"):]
        return "/" in rest or (rest.endswith(".cu") and rest not in KEEP_CU)
    return False


for path in sys.argv[1:]:
    with zipfile.ZipFile(path) as src:
        infos = src.infolist()
        gone = {i.filename for i in infos if dropped(i.filename)}
        if not gone:
            continue
        tmp = path + ".tmp"
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as dst:
            for i in infos:
                if i.filename in gone:
                    continue
                data = src.read(i)
                if i.filename.endswith(".dist-info/RECORD"):
                    lines = data.decode().splitlines(keepends=True)
                    data = "".join(l for l in lines if l.split(",", 1)[0] not in gone).encode()
                dst.writestr(i, data)
    os.replace(tmp, path)
    print(f"{os.path.basename(path)}: dropped {len(gone)} files not needed by its RoPE kernels")
EOF
ls -l .whl
du -sh .whl
