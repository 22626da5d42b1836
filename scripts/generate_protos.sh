#!/usr/bin/env bash
# Regenerates peerd/v1/*_pb2*.py from protos/ (tests/test_protos.py checks they are current).
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-.venv/bin/python}
"$python" -m grpc_tools.protoc -Iprotos --python_out=. --pyi_out=. --grpc_python_out=. \
    protos/peerd/v1/peer.proto
