# distserve: routers, engine agents (sidecars of lmdeploy engines) and distserve-ctl. No torch, no
# dlslime: none of these imports them.
#   docker build -f deploy/images/distserve.Dockerfile -t REGISTRY/distserve:0.1.0 .
# An optimised CPython (the official image is built with PGO and LTO): the router's CPU per request depends on
# the interpreter's build (docs/deploy.md, "Images").
FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY discovery ./discovery
COPY distserve ./distserve
RUN pip install . && rm -rf /src
RUN useradd --system --uid 10001 --no-create-home distserve
USER 10001
WORKDIR /
ENTRYPOINT ["distserve"]
CMD ["--help"]
