# distserve: routers, engine agents (sidecars of lmdeploy engines) and distserve-ctl. No torch, no
# dlslime: none of these imports them.
#   docker build -f deploy/images/distserve.Dockerfile -t REGISTRY/distserve:0.1.0 .
# An optimised CPython (the official image is built with PGO and LTO): the router's CPU per request depends on
# the interpreter's build (docs/deploy.md, "Images").

# The wheel is built where a C compiler is (the full image of the same Python): it carries the router's C modules
# (distserve/router/compiled.py lists them), which the slim image could not compile; the build fails without them.
FROM python:3.11 AS build
WORKDIR /src
COPY pyproject.toml setup.py README.md ./
COPY discovery ./discovery
COPY distserve ./distserve
RUN pip wheel --no-deps -w /wheels . \
 && python -c "import glob, sys, zipfile; w = zipfile.ZipFile(glob.glob('/wheels/distserve-*.whl')[0]); names = w.namelist(); missing = [m for m in ('_heads', '_shortlist', '_ring_ops') if not any('/' + m + '.' in n and n.endswith('.so') for n in names)]; sys.exit('C modules not built: ' + ', '.join(missing) if missing else 0)"

FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
COPY --from=build /wheels /wheels
RUN pip install /wheels/distserve-*.whl && rm -rf /wheels \
 && python -c "from distserve.router import compiled; assert compiled.summary() == 'c', compiled.summary()"
RUN useradd --system --uid 10001 --no-create-home distserve
USER 10001
WORKDIR /
ENTRYPOINT ["distserve"]
CMD ["--help"]
