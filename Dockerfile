# syntax=docker/dockerfile:1
# The visionpipe project image: the KFP components' base_image and the KServe serving runtime.
#   docker build -t ghcr.io/visionpipe/visionpipe:0.1.0 .          (users: base python:3.11-slim, BuildKit)
#   make image                                                      (here: buildah on a local Debian base,
#                                                                    containers/build.sh)
# It installs exactly what uv.lock pins for the runtime (no dev extra), hash-checked: `uv sync --frozen` with uv
# itself at the version the lock pins. PyTorch is PyPI's build (CUDA, about 5.5 GB), as in the lock; there is no
# TORCH_INDEX_URL any more: another index would install versions that differ from the lock.
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    VISIONPIPE_RECIPE_DIR=/opt/visionpipe/recipes \
    OMP_WAIT_POLICY=PASSIVE

# Where uv keeps its cache during the build: a BuildKit/buildah cache mount by default; `make image` mounts the
# host's uv cache instead (-v ...:/var/cache/host-uv --build-arg UV_CACHE_DIR=/var/cache/host-uv), so a rebuild
# does not download the 5.5 GB of torch/CUDA wheels again.
ARG UV_CACHE_DIR=/root/.cache/uv

# The non-root user both KFP and KServe run as (no useradd needed: works on slim and minbase alike).
RUN echo 'visionpipe:x:10001:10001:visionpipe:/home/visionpipe:/bin/sh' >> /etc/passwd \
    && echo 'visionpipe:x:10001:' >> /etc/group \
    && mkdir -p /home/visionpipe /opt/visionpipe \
    && chown 10001:10001 /home/visionpipe

# uv at the version uv.lock pins, hash-checked, in a throw-away venv under /tmp (removed in the same step, so
# neither uv nor pip is in the image). python3 -m venv --without-pip: /opt/venv holds only what the lock pins.
# The optional build secret ca-bundle is a CA file for TLS during the build (a proxy's CA); it is not kept.
COPY pyproject.toml uv.lock /opt/visionpipe/build/
RUN --mount=type=cache,target=/root/.cache/uv,sharing=locked \
    --mount=type=cache,target=/root/.cache/pip,sharing=locked \
    --mount=type=secret,id=ca-bundle \
    set -eu; \
    if [ -s /run/secrets/ca-bundle ]; then export SSL_CERT_FILE=/run/secrets/ca-bundle PIP_CERT=/run/secrets/ca-bundle; fi; \
    cd /opt/visionpipe/build; \
    python3 -c "import tomllib; p = next(p for p in tomllib.load(open('uv.lock', 'rb'))['package'] if p['name'] == 'uv'); print('uv==' + p['version'], *('--hash=' + w['hash'] for w in p['wheels']))" > /tmp/uv-requirement.txt; \
    python3 -m venv /tmp/uv; \
    /tmp/uv/bin/pip install --quiet --require-hashes --no-deps -r /tmp/uv-requirement.txt; \
    python3 -m venv --without-pip /opt/venv; \
    UV_CACHE_DIR="$UV_CACHE_DIR" UV_LINK_MODE=copy UV_PYTHON_DOWNLOADS=never UV_PROJECT_ENVIRONMENT=/opt/venv \
      /tmp/uv/bin/uv sync --frozen --no-dev --no-install-project --compile-bytecode --python /opt/venv/bin/python; \
    rm -rf /tmp/uv /tmp/uv-requirement.txt /opt/visionpipe/build

# The project itself (a code-only change rebuilds from here): built without isolation with the setuptools the
# lock pins (already in /opt/venv), installed without dependencies. The sources come in with COPY, not a RUN bind
# mount: the layer cache of Debian bookworm's buildah (1.28) never invalidates a `RUN --mount=type=bind` step when
# the mounted files change (containers/buildah issue #5400; PR #5691, later, adds the files' checksum to the
# cache key), which would leave old code in the image.
COPY recipes /opt/visionpipe/recipes
COPY pyproject.toml uv.lock README.md /tmp/src/
COPY visionpipe /tmp/src/visionpipe
RUN --mount=type=cache,target=/root/.cache/pip,sharing=locked \
    --mount=type=secret,id=ca-bundle \
    set -eu; \
    if [ -s /run/secrets/ca-bundle ]; then export SSL_CERT_FILE=/run/secrets/ca-bundle PIP_CERT=/run/secrets/ca-bundle; fi; \
    cd /tmp/src; \
    python3 -c "import tomllib; p = next(p for p in tomllib.load(open('uv.lock', 'rb'))['package'] if p['name'] == 'uv'); print('uv==' + p['version'], *('--hash=' + w['hash'] for w in p['wheels']))" > /tmp/uv-requirement.txt; \
    python3 -m venv /tmp/uv; \
    /tmp/uv/bin/pip install --quiet --require-hashes --no-deps -r /tmp/uv-requirement.txt; \
    UV_NO_CACHE=1 UV_PYTHON_DOWNLOADS=never \
      /tmp/uv/bin/uv pip install --python /opt/venv/bin/python --no-deps --no-build-isolation --compile-bytecode .; \
    cd /; rm -rf /tmp/uv /tmp/uv-requirement.txt /tmp/src; \
    /opt/venv/bin/python -c "import visionpipe.serving.server, kfp.dsl.executor_main"

# HOME only now: during the build pip and uv keep their caches in root's (cache mounts), never in this home.
ENV HOME=/home/visionpipe
USER 10001:10001
WORKDIR /home/visionpipe

EXPOSE 8080
# KServe's ServingRuntime overrides these arguments (see manifests/common/serving-runtime.yaml);
# KFP components override the command entirely (`sh -ec ... python3 -m kfp.dsl.executor_main ...`).
CMD ["python", "-m", "visionpipe.serving.server", "--model_name=model", "--model_dir=/mnt/models", "--http_port=8080", "--host=0.0.0.0"]
