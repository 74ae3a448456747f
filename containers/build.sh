#!/usr/bin/env bash
# `make image`: build the project image from the Dockerfile with buildah, here (no Docker engine, no registry).
#   containers/build.sh [IMAGE]        default IMAGE=localhost/visionpipe:dev
# - the base: localhost/visionpipe-base:bookworm, built from Debian packages by containers/base.sh when missing
#   (set BASE_IMAGE=python:3.11-slim on a machine that can pull);
# - the host's uv cache ($VISIONPIPE_UV_CACHE, else $UV_CACHE_DIR, else ~/.cache/uv) is mounted into the RUN
#   steps, so a rebuild reuses the torch / CUDA wheels instead of downloading 5.5 GB again;
# - the host's CA bundle goes in as the build secret `ca-bundle` (TLS through a proxy), never into the image;
# - --layers: a code-only change rebuilds only the project step; the previous image of the tag is removed
#   when nothing else uses it (at most one old image is kept: none).
# Prints the image id, its size and the build time.
set -euo pipefail
cd "$(dirname "$0")/.."

IMAGE=${1:-${IMAGE:-localhost/visionpipe:dev}}
BASE_IMAGE=${BASE_IMAGE:-localhost/visionpipe-base:bookworm}
UV_CACHE_HOST=${VISIONPIPE_UV_CACHE:-${UV_CACHE_DIR:-$HOME/.cache/uv}}
CA_BUNDLE=${VISIONPIPE_CA_BUNDLE:-${SSL_CERT_FILE:-/etc/ssl/certs/ca-certificates.crt}}

for tool in buildah podman; do
  command -v "$tool" >/dev/null || {
    echo "build.sh: $tool not found; install it: apt-get install -y buildah podman runc mmdebstrap" >&2; exit 2; }
done
case "$BASE_IMAGE" in
  localhost/visionpipe-base:*) BASE_IMAGE="$BASE_IMAGE" containers/base.sh ;;
esac

mkdir -p "$UV_CACHE_HOST"
args=(bud --isolation chroot --layers --force-rm -t "$IMAGE" --build-arg "BASE_IMAGE=$BASE_IMAGE"
      --build-arg UV_CACHE_DIR=/var/cache/host-uv -v "$UV_CACHE_HOST:/var/cache/host-uv")
if [ -s "$CA_BUNDLE" ]; then args+=(--secret "id=ca-bundle,src=$CA_BUNDLE"); fi

old=$(podman image inspect --format '{{.Id}}' "$IMAGE" 2>/dev/null || true)
start=$(date +%s)
buildah "${args[@]}" .
seconds=$(( $(date +%s) - start ))
id=$(podman image inspect --format '{{.Id}}' "$IMAGE")
if [ -n "$old" ] && [ "$old" != "$id" ]; then
  podman rmi "$old" >/dev/null 2>&1 || true   # still used by a container or as a layer parent: kept
fi
size=$(podman image inspect --format '{{.Size}}' "$IMAGE")
echo "image $IMAGE id ${id:0:12} size $size bytes ($(( size / 1000000 )) MB) built in $seconds s"
