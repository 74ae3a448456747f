# `make demo` and `make test` bootstrap .venv on a fresh machine (python3 >= 3.11 needed), then do their job.
# They install exactly what uv.lock pins (`uv sync --frozen`); the install is skipped while .venv is current
# with uv.lock. `make upgrade PACKAGE=kfp` (or PACKAGE=all) moves the lock, reinstalls and recompiles the IR.

VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.visionpipe-installed
PYTEST_ARGS ?=
PACKAGE ?=
# uv itself is pinned in uv.lock (dev extra), so the bootstrap installs that same version.
UV_VERSION := $(shell awk '/^name = "uv"$$/ {getline; gsub(/"/, "", $$3); print $$3; exit}' uv.lock)
UV := $(VENV)/bin/uv
export UV_PROJECT_ENVIRONMENT := $(abspath $(VENV))
# `make image`: the project image, built here with buildah (containers/build.sh; base image from Debian packages).
IMAGE ?= localhost/visionpipe:dev

.PHONY: demo test lint typecheck unit install upgrade clean image test-image test-long

$(STAMP): uv.lock pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	@# uv sync removes pip (it is not in the lock); ensurepip brings it back when uv itself must change.
	if [ "$$($(UV) --version 2>/dev/null | cut -d' ' -f2)" != "$(UV_VERSION)" ]; then \
	  $(PY) -m pip --version >/dev/null 2>&1 || $(PY) -m ensurepip --default-pip >/dev/null; \
	  $(PY) -m pip install --quiet --disable-pip-version-check "uv==$(UV_VERSION)"; fi
	$(UV) sync --frozen --extra dev --python $(PY) --quiet
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/visionpipe demo

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck: $(STAMP)
	$(VENV)/bin/mypy visionpipe

unit: $(STAMP)
	$(VENV)/bin/pytest $(PYTEST_ARGS)

test: lint typecheck unit

# One command to move a dependency: re-resolve the lock, install it, recompile the checked-in IR (the SDK
# version is written into it), then run `make test` and commit uv.lock with visionpipe/kfp/compiled/.
upgrade: $(STAMP)
	@test -n "$(PACKAGE)" || { echo "usage: make upgrade PACKAGE=<name>   (or PACKAGE=all)"; exit 2; }
	if [ "$(PACKAGE)" = all ]; then $(UV) lock --upgrade; else $(UV) lock --upgrade-package "$(PACKAGE)"; fi
	$(UV) sync --frozen --extra dev --python $(PY) --quiet
	touch $(STAMP)
	$(VENV)/bin/visionpipe compile

# The project image from the Dockerfile with buildah on a local Debian base (built first when missing); installs
# exactly uv.lock's runtime pins; prints the image id, size and build time. Needs root, buildah, podman,
# mmdebstrap (apt-get install -y buildah podman runc mmdebstrap). Does not need .venv.
image:
	containers/build.sh $(IMAGE)

# The long end-to-end runs (the roadwork pipeline on real photos, served; two monthly retrains; the failed quality
# gate); .ci/run runs it after `make test`, which leaves them out to stay within 15 minutes.
test-long: $(STAMP)
	$(VENV)/bin/pytest -m long $(PYTEST_ARGS)

# The image's tests (hygiene, an IR executor, the training pipeline under kfp.local.DockerRunner, the serving
# runtime with tritonclient); builds the image first. .ci/run runs it after `make test`.
test-image: $(STAMP)
	$(VENV)/bin/pytest -m image tests/test_image.py $(PYTEST_ARGS)

clean:
	rm -rf runs bundles .pytest_cache .mypy_cache .ruff_cache
