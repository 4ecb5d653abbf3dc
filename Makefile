# Two commands a newcomer needs: `make serve` and `make test`. Both build the virtualenv
# from nothing the first time.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# Test/CI environments pin torch so pip takes the local CPU wheel (cheap, no CUDA download).
# On a GPU machine, `make serve TORCH_SPEC=torch` (or any CUDA build you already use) keeps
# the normal install; pyproject itself only asks for torch>=2.4.
TORCH_SPEC ?= torch==2.13.0
# Loopback by default; `make serve HOST=0.0.0.0` listens beyond this machine (set an API key).
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: install test serve lint clean docker-test

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade --quiet pip
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[dev,eval]"
	$(PY) -m pip install --quiet --no-deps "basic-pitch==0.4.0"  # see the eval extra
	touch $@

install: $(VENV)/.installed

test: $(VENV)/.installed
	$(PY) -m pytest -q

serve: $(VENV)/.installed
	HOST=$(HOST) PORT=$(PORT) $(PY) -m server

# Build the server image on this CPU machine from a locally bootstrapped Debian base and serve
# from it (root, docker.io, debootstrap; see DEVELOPERS.md). Not part of `make test`.
docker-test: $(VENV)/.installed
	PY=$(PY) bash docker/test.sh

lint: $(VENV)/.installed
	$(PY) -m ruff check .

clean:
	rm -rf $(VENV) .pytest_cache
