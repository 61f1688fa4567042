#!/usr/bin/env bash
# The prepared GPU check (benchmarks/gpu_check.py): one command on a machine with one NVIDIA
# GPU (an H100 or H200), at most 10 minutes, writing benchmarks/results/gpu_check.md and .json
# (or --out PATH). It needs a CUDA build of torch (PyPI's Linux wheel is one) and safetensors;
# specedge runs from this checkout's src/. PYTHON picks the interpreter (default: .venv's, else
# python3). Arguments go to gpu_check.py, e.g. --tiny (tiny models on the CPU, seconds).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-.venv/bin/python}"
[ -x "$PYTHON" ] || PYTHON=python3
export PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}"
exec timeout 600 "$PYTHON" benchmarks/gpu_check.py "$@"
