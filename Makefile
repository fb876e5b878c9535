# Two commands for a fresh machine:
#   make serve   start the service on the committed model (serving dependencies only, no TensorFlow)
#   make test    install everything (training extras, dev tools, the data set) and run every check
PYTHON ?= python3
VENV ?= .venv
SERVE_VENV ?= .venv-serve
DATA_DIR ?= /usr/share/datasets/fashion-mnist
PYTEST_ARGS ?=

.PHONY: serve test lint typecheck pytest data browser bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -e '.[train,dev]'
	touch $@

$(SERVE_VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(SERVE_VENV)
	$(SERVE_VENV)/bin/pip install --quiet --upgrade pip
	$(SERVE_VENV)/bin/pip install --quiet -e .
	touch $@

serve: $(SERVE_VENV)/.installed
	$(SERVE_VENV)/bin/python -m service

# Debian's package holds the real Fashion-MNIST IDX files; tests never download.
data:
	@if [ ! -f $(DATA_DIR)/t10k-images-idx3-ubyte.gz ] && [ -z "$$FASHION_MNIST_DIR" ]; then \
		echo "installing Debian's dataset-fashion-mnist"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist; \
	fi

# Debian's Chromium for the web page's browser test (never a browser downloaded by a test tool).
browser:
	@command -v chromium >/dev/null || { \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; }

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck: $(VENV)/.installed
	$(VENV)/bin/mypy service training bench scoring

pytest: $(VENV)/.installed data browser
	$(VENV)/bin/python -m pytest $(PYTEST_ARGS)

test: lint typecheck pytest

bench: $(SERVE_VENV)/.installed $(VENV)/.installed
	$(VENV)/bin/python -m bench --repeat 3

clean:
	rm -rf $(VENV) $(SERVE_VENV) .pytest_cache .mypy_cache .ruff_cache
