#!/usr/bin/env bash
# Wheels of what normbench needs beyond torch, into .whl/ (ignored by git), for
# scripts/gpu_check.py on a GPU machine that has PyTorch but cannot reach PyPI.
#
# Written for a Python 3.12 image that has torch, torchvision, tensorboard, rich, joblib, PyYAML,
# packaging, pytest and pytest-xdist, but not hydra-core, omegaconf, antlr4-python3-runtime or
# hydra-joblib-launcher, and nothing can be fetched there. So pip downloads them here for
# CPython 3.12 on manylinux x86-64 with --no-deps (pip cannot resolve for another
# interpreter), each dependency named, at the versions the test suite runs with.
# antlr4-python3-runtime 4.9.3, the only 4.9 that omegaconf 2.3 and hydra 1.3 accept, is
# published as source only: pip builds its pure-Python wheel here.
#
#   scripts/gpu_wheels.sh                 # once, in the checkout (PYTHON=... picks the pip)
#
# Then copy the checkout with .whl/ to the GPU machine and run there, in the checkout (the
# check's steps take at most 465 s, the install a few):
#
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site || exit; python3 scripts/gpu_check.py results/gpu_check
#
# gpu_check.py adds the checkout to its steps' PYTHONPATH (normbench is not installed there;
# the steps call `python -m normbench`). results/gpu_check then holds summary.md,
# figures.json, log.txt and runs.tar.gz. To rerun some steps, add e.g.
# `--only sweep,torchrun`.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}

rm -rf .whl
mkdir -p .whl
# pure-Python wheels; the manylinux x86-64 tags let the same command fetch a compiled
# package too, if one is ever added here
"$PYTHON" -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  --platform manylinux1_x86_64 -d .whl \
  hydra-core==1.3.8 omegaconf==2.3.1 hydra-joblib-launcher==1.2.0
"$PYTHON" -m pip wheel --no-deps --no-binary=:all: -w .whl antlr4-python3-runtime==4.9.3
ls -l .whl
