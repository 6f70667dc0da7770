#!/usr/bin/env bash
# Downloads the benchmark's anchor libraries as wheels for the lent GPU machine (Python 3.12, no
# network) into .whl/ (git-ignored). Name .whl in the device call's `carry`; `make bench` installs them
# from there with --no-deps (their torch/triton requirements are already met on that machine).
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
for spec in liger-kernel==0.8.5 fla-core==0.6.0 rotary-embedding-torch==0.9.1 einops==0.8.2; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform any -d .whl "$spec"
done
ls -l .whl
