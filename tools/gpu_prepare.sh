#!/usr/bin/env bash
# What a lent GPU machine needs beside the working tree, prepared here for the device tool's
# `carry` (both folders git-ignored through .git/info/exclude):
#   .whl/      wheels its image lacks (it has torch, transformers 5.17, peft, accelerate, but not
#              diffusers, pydantic or datasets), at the versions the tests run with here;
#   .release/  the authors' release's code (../shared/reference/spo-release: spo/, configs/,
#              train_scripts/; MIT), which benchmarks/release_side_by_side.py runs; the
#              ../shared beside the checkout does not travel.
# On the device, before anything else:
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
#       --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:src
# benchmarks/gpu_issue25.sh does that itself. Versions: the ones the tests run with here.
set -euo pipefail
cd "$(dirname "$0")/.."
for folder in /.whl/ /.release/; do
    grep -qx "$folder" .git/info/exclude 2>/dev/null || { mkdir -p .git/info; echo "$folder" >> .git/info/exclude; }
done
release=../shared/reference/spo-release/spo_training_and_inference
rm -rf .release && mkdir -p .release/spo-release/spo_training_and_inference
cp -r "$release/spo" "$release/configs" "$release/train_scripts" .release/spo-release/spo_training_and_inference/
rm -rf .whl && mkdir .whl
version() { .venv/bin/python -c "import importlib.metadata as m; print(m.version('$1'))"; }
platforms=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
           --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
# not transformers: 5.25 needs huggingface-hub >= 2.4, the image has 1.33 with transformers 5.17,
# which our code supports (>= 4.57); diffusers 0.42.1 needs hub >= 1.32
for name in diffusers pydantic pydantic_core annotated-types typing-inspection typing_extensions datasets dill \
            multiprocess; do
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        "${platforms[@]}" -d .whl "$name==$(version "$name")"
done
du -sh .whl .release
