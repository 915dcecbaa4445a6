#!/usr/bin/env bash
# Create benchmarks/peers/.venv-brevitas: a venv that reuses the system torch (--system-site-packages) and adds
# brevitas==0.13.4 (the peer library of benchmarks/peers/brevitas_resnet20.py; not a dependency of lit_mpq).
# Idempotent: a venv that already has that version is left as it is.
set -euo pipefail

BREVITAS_VERSION="0.13.4"
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VENV="${HERE}/.venv-brevitas"
PY="${PYTHON:-python3}"

if [[ -x "${VENV}/bin/python" ]] \
    && "${VENV}/bin/python" -c "import importlib.metadata as m, sys; sys.exit(m.version('brevitas') != '${BREVITAS_VERSION}')" \
        2>/dev/null; then
    echo "brevitas ${BREVITAS_VERSION} already in ${VENV}"
    exit 0
fi

if [[ ! -x "${VENV}/bin/python" ]]; then
    "${PY}" -m venv --system-site-packages "${VENV}"
fi
"${VENV}/bin/python" -c "import torch" 2>/dev/null \
    || { echo "setup_brevitas.sh: torch is not importable from ${VENV} (install torch system-wide first)" >&2; exit 1; }

# Brevitas' own requirements, minus torch (the system one is reused: pip keeps it, as it satisfies torch>=1.13).
LOG="$(mktemp)"
trap 'rm -f "${LOG}"' EXIT
if ! "${VENV}/bin/python" -m pip install --disable-pip-version-check -q "brevitas==${BREVITAS_VERSION}" >"${LOG}" 2>&1; then
    if grep -qiE "connection|resolve|network|timed out|proxy|No matching distribution" "${LOG}"; then
        echo "setup_brevitas.sh: pip could not reach the package registry to install brevitas==${BREVITAS_VERSION}" >&2
    else
        echo "setup_brevitas.sh: pip install brevitas==${BREVITAS_VERSION} failed: $(tail -n 1 "${LOG}")" >&2
    fi
    exit 1
fi
"${VENV}/bin/python" -c "import brevitas, torch; print(f'brevitas {brevitas.__version__}, torch {torch.__version__}')"
echo "ready: ${VENV}/bin/python"
