#!/usr/bin/env bash
# The wheels benchmarks/gpu_check.sh needs on the GPU machine that its image lacks (it has
# torch, numpy, scipy, threadpoolctl, Lightning, pytest, scikit-learn, statsmodels, but not
# fastlmmclib, and reaches no package index): downloaded here, into .whl/ (ignored by git), for
# Python 3.12 on x86-64. Pass `carry: [".whl"]` to the device tool's run; gpu_check.sh installs
# whatever .whl/ holds before its first stage.
set -euo pipefail
PY=${PY:-python3}
"$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
    -d .whl "fastlmmclib==0.0.8"
ls -l .whl
