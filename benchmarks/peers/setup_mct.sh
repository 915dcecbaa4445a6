#!/usr/bin/env bash
# Create benchmarks/peers/.venv-mct: a venv that reuses the system torch (--system-site-packages) and adds Sony's
# Model Compression Toolkit, model-compression-toolkit==2.6.1 (the peer library of benchmarks/peers/mct_resnet20.py;
# not a dependency of lit_mpq). Idempotent: a venv that already has that version is left as it is.
#
# Torch is never replaced: pip runs with a constraints file that pins torch and torchvision to the versions already
# installed, so a requirement on another torch makes the install fail instead of downloading one. MCT 2.6.1 itself
# does not name torch; its requirement edge-mdt-cl~=1.1.0 (Sony's custom layers) pins torch==2.6.* only in its
# "torch" extra, which MCT does not ask for, so a plain install is enough (no --no-deps needed). What pip adds to the
# venv, shadowing the newer system copies only inside it: matplotlib<3.10, networkx<3.6 and pydantic<2.12 (MCT's upper
# bounds), PuLP (the integer-program solver of MCT's mixed-precision search, with its bundled CBC binary),
# scikit-image, mct-quantizers 1.7.x and edge-mdt-cl 1.1.x.
#
# benchmarks/peers/setup_aimet.sh sources this file for setup_peer_venv; run directly, it sets up MCT.
set -euo pipefail

PEERS_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

# setup_peer_venv SCRIPT VENV_NAME DIST VERSION CHECK: make PEERS_DIR/VENV_NAME with DIST==VERSION and run the python
# code CHECK in it; SCRIPT names the caller in messages. The venv gets a ".gitignore" of "*", so git never lists it.
setup_peer_venv() {
    local script="$1" venv="${PEERS_DIR}/$2" dist="$3" version="$4" check="$5"
    local py="${PYTHON:-python3}"
    if [[ -x "${venv}/bin/python" ]] && "${venv}/bin/python" -c \
        "import importlib.metadata as m, sys; sys.exit(m.version('${dist}') != '${version}')" 2>/dev/null; then
        echo "${dist} ${version} already in ${venv}"
        return 0
    fi
    [[ -x "${venv}/bin/python" ]] || "${py}" -m venv --system-site-packages "${venv}"
    echo "*" >"${venv}/.gitignore"
    if ! "${venv}/bin/python" -c "import torch" 2>/dev/null; then
        echo "${script}: torch is not importable from ${venv} (install torch system-wide first)" >&2
        return 1
    fi
    local log pins
    log="$(mktemp)"
    pins="$(mktemp)"
    "${venv}/bin/python" -c \
        "import importlib.metadata as m; print('\n'.join(f'{p}=={m.version(p)}' for p in ('torch', 'torchvision')))" \
        >"${pins}"
    local status=0
    "${venv}/bin/python" -m pip install --disable-pip-version-check -q -c "${pins}" "${dist}==${version}" \
        >"${log}" 2>&1 || status=$?
    if ((status != 0)); then
        case "$(cat "${log}")" in
            *[Cc]onnection* | *[Nn]etwork* | *"timed out"* | *[Pp]roxy* | *"No matching distribution"*)
                echo "${script}: pip could not reach the package registry to install ${dist}==${version}" >&2 ;;
            *) echo "${script}: pip install ${dist}==${version} failed: $(tail -n 1 "${log}")" >&2 ;;
        esac
    fi
    rm -f "${log}" "${pins}"
    ((status == 0)) || return 1
    "${venv}/bin/python" -c "${check}"
    echo "ready: ${venv}/bin/python"
}

if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then
    setup_peer_venv setup_mct.sh .venv-mct model-compression-toolkit 2.6.1 "import model_compression_toolkit as mct, \
torch; print('model-compression-toolkit', mct.__version__, 'torch', torch.__version__)"
fi
