#!/usr/bin/env bash
# Builds the separate virtual environment in which the authors' release (the test oracle at
# ../shared/reference/spo-release) runs: its time-conditioned CLIP needs transformers 4.x, the
# project runs 5.x. Used by tools/release_parity/make_spm_fixtures.py; nothing in CI needs it.
#
#   bash tools/release_parity/build_release_venv.sh          # -> .release-venv/ (git-ignored)
#
# What it installs, from the package registry (pip works offline here against its mirror):
#   - torch 2.13.0: this machine's local CPU wheel. The release pins torch 2.3.0
#     (spo_training_and_inference/environment.yaml), whose Linux wheel is a multi-GB CUDA build;
#     the modules we run (CLIP, F.interpolate, the criterion) are plain torch ops.
#   - transformers 4.40.1 + tokenizers 0.19.1 + huggingface_hub 0.23.0 under
#     .release-venv/tf-4.40.1: the SPO side's pin (environment.yaml), used for scoring
#     (spo/preference_models/models/step_aware_preference_model.py).
#   - transformers 4.27.3 + tokenizers 0.13.3 + huggingface_hub 0.23.0 under
#     .release-venv/tf-4.27.3: the SPM trainer's pin (step_aware_preference_model/requirements.txt),
#     which built and saved the released SPM checkpoints (its CLIP keeps position_ids buffers).
#   Each transformers lives in its own --target folder; make_spm_fixtures.py puts one of them
#   first on sys.path per phase. numpy < 2 as in the release's era.
# torchvision is NOT installed: PyPI's torchvision does not import beside the local torch wheel
# (/work/.library/env/machines/python.md); make_spm_fixtures.py provides a stand-in for the two
# transforms the release uses (CenterCrop, Normalize), with torchvision's semantics.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
VENV="${RELEASE_VENV:-$ROOT/.release-venv}"
PYTHON="${PYTHON:-python3}"

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip install --disable-pip-version-check -q)
"${PIP[@]}" torch==2.13.0
"${PIP[@]}" "numpy<2" pillow "safetensors>=0.4.1" regex pyyaml requests packaging filelock tqdm fsspec typing_extensions

install_target() {  # $1 = folder name, rest = requirements
    local target="$VENV/$1"; shift
    if [ ! -f "$target/.complete" ]; then
        rm -rf "$target"
        "${PIP[@]}" --no-deps --target "$target" "$@"
        touch "$target/.complete"
    fi
}
install_target tf-4.40.1 transformers==4.40.1 tokenizers==0.19.1 huggingface_hub==0.23.0
install_target tf-4.27.3 transformers==4.27.3 tokenizers==0.13.3 huggingface_hub==0.23.0
echo "release venv ready: $VENV"
