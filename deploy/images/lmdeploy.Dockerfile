# An lmdeploy PyTorch engine for PD disaggregation: lmdeploy with DLSlime (--migration-backend DLSlime) and
# distserve's launcher (python3 -m distserve.lmdeploy_ext.serve api_server ...), which fixes lmdeploy
# 0.17/0.18 defects PD routing depends on. Pick the lmdeploy image that matches your CUDA driver; the
# launcher accepts lmdeploy >=0.17,<0.19 (docs/deploy.md).
#   docker build -f deploy/images/lmdeploy.Dockerfile -t REGISTRY/distserve-lmdeploy:0.18.0 .
ARG LMDEPLOY_IMAGE=openmmlab/lmdeploy:v0.18.0-cu12
FROM ${LMDEPLOY_IMAGE}
WORKDIR /src
COPY pyproject.toml README.md ./
COPY discovery ./discovery
COPY distserve ./distserve
# The image's own lmdeploy (and its torch) stay: the extra's range admits it, so pip installs only what is missing.
RUN pip install --no-cache-dir ".[lmdeploy]" && rm -rf /src
WORKDIR /
ENTRYPOINT []
CMD ["python3", "-m", "distserve.lmdeploy_ext.serve", "--help"]
