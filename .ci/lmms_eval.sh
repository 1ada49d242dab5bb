#!/usr/bin/env bash
# CI for the lmms-eval integration: its own venv, installed from the project's files with the README's two
# commands, then the end-to-end tests in tests_lmms_eval/ (not part of the core suite; about 10 minutes).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv-lmms
. .venv-lmms/bin/activate
pip install -q --upgrade pip
pip install -q torch==2.13.0                       # the local CPU wheel, before anything can pull a CUDA build
pip install -q -e ".[test,lmms-eval]"
pip install -q --no-deps lmms-eval==0.7.3          # --no-deps: its own list pulls CUDA torch and torchvision
OMP_NUM_THREADS=1 python -m pytest tests_lmms_eval
