#!/usr/bin/env bash
# Run SSFL on a local Flower deployment: a SuperLink and N SuperNodes as separate processes on
# 127.0.0.1, one `flwr run`, then every process stopped (also on Ctrl-C / SIGTERM).
#
#   scripts/flower_local.sh                                   # 3 SuperNodes, the app's quickstart
#   scripts/flower_local.sh --supernodes 4 configs/quickstart.toml federation.num_clients=4 \
#       federation.clients_per_round=2
#   scripts/flower_local.sh --help
#
# All the work (process groups, clean-up, collecting the run folder) is in ssfl.flower.local;
# `exec` hands it this shell's signals directly.
set -euo pipefail
# Never let a SuperLink/SuperNode pip-install the app's dependencies (a CUDA torch).
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1
# The active Python, else the repository's .venv.
PY="${PYTHON:-python}"
if ! "$PY" -c "import ssfl.flower" 2>/dev/null; then
    PY="$(cd "$(dirname "$0")/.." && pwd)/.venv/bin/python"
fi
exec "$PY" -m ssfl.flower.local "$@"
