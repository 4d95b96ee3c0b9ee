#!/usr/bin/env bash
# Rebuild the parity references of the in-project ImageReward and HPSv3 scorers with the authors' packages.
#
#   bash tests/parity/regenerate.sh [VENV_DIR]
#
# Needs PyPI (no model download: the models are the tiny seeded ones of flow_grpo.testing.preference_models).
# Each package gets a virtual environment of its own under VENV_DIR (default .cache/parity-venvs), since
# neither runs with this project's transformers 5 and they disagree with each other (timm 0.6.13 vs >= 0.9):
# - image-reward 1.5 with transformers 4.45.2; its BLIP scorer modules also import `clip` (openai-clip),
#   which imports pkg_resources (setuptools < 81), and its ReFL module imports diffusers (0.31 works with
#   transformers 4.45).
# - hpsv3 1.0.0 with its pinned transformers 4.45.2; it imports matplotlib and tensorboard without
#   declaring them.
# PROJECT_PYTHON (default: python) is this project's interpreter, which writes the tiny models and inputs.
# Then tests/test_preference_parity.py compares the in-project scorers against the JSON files written here.
set -euo pipefail
cd "$(dirname "$0")/../.."
VENVS=${1:-.cache/parity-venvs}
PROJECT_PYTHON=${PROJECT_PYTHON:-python}
TORCH=("torch==2.14.1" "torchvision==0.29.1")

if [ ! -x "$VENVS/imagereward/bin/python" ]; then
    python3 -m venv "$VENVS/imagereward"
    "$VENVS/imagereward/bin/pip" install --quiet "${TORCH[@]}" image-reward==1.5 transformers==4.45.2 \
        diffusers==0.31.0 openai-clip==1.0.1 "setuptools>=77.0.3,<81"
fi
if [ ! -x "$VENVS/hpsv3/bin/python" ]; then
    python3 -m venv "$VENVS/hpsv3"
    "$VENVS/hpsv3/bin/pip" install --quiet "${TORCH[@]}" hpsv3==1.0.0 matplotlib tensorboard
fi

INPUTS=$(mktemp -d)
trap 'rm -rf "$INPUTS"' EXIT
PYTHONPATH=$PWD "$PROJECT_PYTHON" -c \
    "import sys; from flow_grpo.testing.preference_models import save_parity_inputs; save_parity_inputs(sys.argv[1])" \
    "$INPUTS"
"$VENVS/imagereward/bin/python" tests/parity/reference_imagereward.py "$INPUTS" tests/parity/imagereward_reference.json
"$VENVS/hpsv3/bin/python" tests/parity/reference_hpsv3.py "$INPUTS" tests/parity/hpsv3_reference.json
echo "wrote tests/parity/imagereward_reference.json and tests/parity/hpsv3_reference.json"
