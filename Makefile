# Quick start: `make serve` (demo model + 2D and 3D demo adapters), `make test` (whole suite).
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
ARGS ?=
PYTEST_ARGS ?=
# torch first, pinned: an unpinned torch would pull whatever build is newest. On Linux, PyPI's
# torch 2.13.0 is the CUDA build (several GB, runs on CPU too); constraints.txt pins what it needs.
TORCH := torch==2.13.0
CONSTRAINTS := -c constraints.txt
# The install check replays the pip commands below with every pip config and variable ignored,
# as on a fresh machine that has only PyPI (no local wheels, no index or constraint settings).
PIP_FRESH := env PIP_CONFIG_FILE=/dev/null python3 -m pip --isolated install --dry-run \
	--ignore-installed --quiet --report -

.PHONY: install install-dev serve test check-install clean

$(PY):
	python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip

$(VENV)/.installed: $(PY) pyproject.toml constraints.txt
	@echo "loramux: installing $(TORCH) into $(VENV) (on Linux the CUDA build: a few GB, once)"
	$(PIP) install --progress-bar on $(CONSTRAINTS) $(TORCH)
	@echo "loramux: installing loramux and its dependencies (transformers, fastapi, triton, ...)"
	$(PIP) install -q $(CONSTRAINTS) -e .
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed
	@echo "loramux: installing the test tools (pytest, peft, openai, ...)"
	$(PIP) install -q $(CONSTRAINTS) -e '.[dev]'
	touch $@

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

serve: install
	$(VENV)/bin/loramux serve $(ARGS)

test: install-dev
	$(PY) -m pytest -q $(PYTEST_ARGS)

# Resolves each install step above against PyPI alone and prints what it would install, and
# the optional Ray Serve extra (`pip install -e '.[ray]'`, for loramux.ray_serve).
check-install:
	$(PIP_FRESH) $(CONSTRAINTS) $(TORCH) | python3 .ci/summarize_report.py torch
	$(PIP_FRESH) $(CONSTRAINTS) $(TORCH) -e '.[dev]' | python3 .ci/summarize_report.py project
	$(PIP_FRESH) $(CONSTRAINTS) $(TORCH) -e '.[dev,ray]' | python3 .ci/summarize_report.py ray

clean:
	rm -rf $(VENV) build *.egg-info
