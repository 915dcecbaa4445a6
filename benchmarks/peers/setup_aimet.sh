#!/usr/bin/env bash
# Create benchmarks/peers/.venv-aimet: a venv that reuses the system torch (--system-site-packages) and adds Qualcomm
# AIMET for PyTorch, aimet-torch==2.42.0 (the peer library of benchmarks/peers/aimet_resnet20.py; not a dependency of
# lit_mpq). Idempotent: a venv that already has that version is left as it is. The venv helper, setup_peer_venv, is
# the one of setup_mct.sh (sourced here), so torch and torchvision are pinned to the installed versions the same way.
#
# Why this version: 2.42.0 is the version issue 13 used and the newest on PyPI. From 2.x on, aimet-torch is a pure
# Python wheel (aimet_torch-2.42.0-py310-none-any.whl: no C++ libpymo, no CUDA build), so it installs for this Python
# 3.11 and imports with torch 2.14.1; its requirements name torch and torchvision without a version, so pip keeps
# the system ones (no --no-deps needed). What pip adds to the venv: cvxpy with clarabel/osqp/scs/highspy (used by
# some AIMET features, not by AMP), bokeh<=3.6.3, holoviews, hvplot, panel (AMP's HTML plots), pandas 3, psutil,
# pybind11, setuptools and their small dependencies; onnx, onnx_ir, onnxscript, numpy, scipy, scikit-learn,
# matplotlib, safetensors, tensorboard and jsonschema come from the system.
set -euo pipefail

# shellcheck source=benchmarks/peers/setup_mct.sh
source "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/setup_mct.sh"
setup_peer_venv setup_aimet.sh .venv-aimet aimet-torch 2.42.0 \
    "import aimet_torch, torch; print('aimet-torch', aimet_torch.__version__, 'torch', torch.__version__)"
