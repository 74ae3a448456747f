# The visionpipe project image: the KFP components' base_image and the KServe serving runtime.
#   docker build -t ghcr.io/visionpipe/visionpipe:0.1.0 .
# CPU wheels of torch by default (small image); for CUDA pass --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu126
FROM python:3.11-slim

ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HOME=/home/visionpipe \
    VISIONPIPE_RECIPE_DIR=/opt/visionpipe/recipes \
    OMP_WAIT_POLICY=PASSIVE

WORKDIR /opt/visionpipe

# Dependencies first (cached while only the code changes), then the project itself.
COPY pyproject.toml README.md ./
COPY visionpipe ./visionpipe
COPY recipes ./recipes
RUN pip install --extra-index-url "${TORCH_INDEX_URL}" . \
    && useradd --create-home --home-dir /home/visionpipe --uid 10001 --user-group visionpipe

USER 10001:10001

EXPOSE 8080
# KServe's ServingRuntime overrides these arguments (see manifests/common/serving-runtime.yaml);
# KFP components override the command entirely.
CMD ["python", "-m", "visionpipe.serving.server", "--model_name=model", "--model_dir=/mnt/models", "--http_port=8080", "--host=0.0.0.0"]
