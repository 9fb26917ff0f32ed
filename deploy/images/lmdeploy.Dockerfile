# A stock lmdeploy PyTorch engine with DLSlime for KV migration (lmdeploy's --migration-backend DLSlime).
# Pick the lmdeploy image that matches your CUDA driver; lmdeploy >= 0.17 speaks the protocol distserve
# uses (docs/deploy.md).
#   docker build -f deploy/images/lmdeploy.Dockerfile -t REGISTRY/distserve-lmdeploy:0.18.0 .
ARG LMDEPLOY_IMAGE=openmmlab/lmdeploy:v0.18.0-cu12
FROM ${LMDEPLOY_IMAGE}
RUN pip install --no-cache-dir "dlslime==0.1.23"
ENTRYPOINT []
CMD ["lmdeploy", "serve", "api_server", "--help"]
