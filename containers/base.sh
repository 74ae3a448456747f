#!/usr/bin/env bash
# The local base image for `make image` on a machine that cannot pull from a registry: Debian bookworm built
# from Debian packages with mmdebstrap, imported into podman's store as localhost/visionpipe-base:bookworm.
# bookworm's python3 is 3.11 (pyproject.toml requires >= 3.11; uv.lock's markers select the `< 3.12` wheels,
# as on the host). Users build on the Dockerfile's default base (python:3.11-slim) instead.
#
#   containers/base.sh            build it unless it exists (about 2 minutes, needs root, mmdebstrap, podman)
#   BASE_IMAGE=... MMDEBSTRAP_MIRROR=... containers/base.sh
set -euo pipefail

BASE_IMAGE=${BASE_IMAGE:-localhost/visionpipe-base:bookworm}
SUITE=${SUITE:-bookworm}
STATE_DIR=${VISIONPIPE_CONTAINERS_DIR:-/var/tmp/visionpipe-containers}
MIRROR=${MMDEBSTRAP_MIRROR:-}

if podman image exists "$BASE_IMAGE"; then
  echo "base image $BASE_IMAGE exists ($(podman image inspect --format '{{.Id}}' "$BASE_IMAGE" | cut -c1-12))"
  exit 0
fi
for tool in mmdebstrap podman; do
  command -v "$tool" >/dev/null || {
    echo "base.sh: $tool not found; install it: apt-get install -y buildah podman runc mmdebstrap" >&2; exit 2; }
done

mkdir -p "$STATE_DIR"
tar="$STATE_DIR/base-$SUITE.tar"
trap 'rm -f "$tar"' EXIT
start=$(date +%s)
# minbase: essential packages + apt; python3-venv brings ensurepip (the build bootstraps uv with it);
# ca-certificates for TLS to PyPI during the build.
mmdebstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
  --aptopt='APT::Install-Recommends "false"' \
  --customize-hook='rm -rf "$1"/var/cache/apt/archives/*.deb "$1"/var/lib/apt/lists/*' \
  "$SUITE" "$tar" ${MIRROR:+"$MIRROR"}
podman import --change 'CMD ["/bin/bash"]' --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
  "$tar" "$BASE_IMAGE" >/dev/null
echo "base image $BASE_IMAGE built in $(( $(date +%s) - start )) s," \
  "$(podman image inspect --format '{{.Size}}' "$BASE_IMAGE") bytes"
