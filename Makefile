# gptfl-ray developer entry points. Every target is safe to re-run.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
# Real data lives beside the checkout in ../shared/data when present; GPTFL_DATA_DIR overrides.
export GPTFL_DATA_DIR ?= $(if $(wildcard ../shared/data),$(abspath ../shared/data),)
PYTEST_ARGS ?=

.PHONY: setup system-deps test lint demo clean

setup: system-deps $(STAMP)

# Debian packages the offline speech generators need (real TTS engines). Skipped when present.
system-deps:
	@command -v espeak-ng >/dev/null && command -v flite >/dev/null || { \
	  echo "installing espeak-ng and flite"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get install -y -q espeak-ng flite >/dev/null 2>&1 || \
	  { $$SUDO apt-get update -q >/dev/null && $$SUDO apt-get install -y -q espeak-ng flite >/dev/null; }; }

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

test: setup
	$(PY) -m pytest $(PYTEST_ARGS)

lint: setup
	$(VENV)/bin/ruff check gptfl_ray tests bench
	$(VENV)/bin/ruff format --check gptfl_ray tests bench

demo: setup
	$(VENV)/bin/gptfl run configs/mnist-glyphs-quick.yaml

clean:
	rm -rf $(VENV) .pytest_cache
