# The two commands: `make demo` and `make test`. Everything else is a step they call.
PYTHON ?= python3
VENV   ?= .venv
NODE_PREFIX ?= .node
CHP    := $(NODE_PREFIX)/node_modules/.bin/configurable-http-proxy
PY     := $(VENV)/bin/python
PYTEST_ARGS ?=
# JupyterLab's time-left extension (see `labextension` below)
LABEXT_SRC := labextension/package.json labextension/package-lock.json labextension/tsconfig.json labextension/jupyterhub-hpc-timeleft.json $(wildcard labextension/src/*.ts labextension/style/*)
LABEXT_BUILT := labextension/built/package.json
LABEXT_IN_VENV := $(VENV)/share/jupyter/labextensions/jupyterhub-hpc-timeleft

.PHONY: demo test check lint venv chp sysdeps bench clean images labextension

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e '.[hub,singleuser,test]'
	touch $@

venv: $(VENV)/.installed

$(CHP):
	npm install --silent --no-audit --no-fund --prefix $(NODE_PREFIX) configurable-http-proxy@5

chp: $(CHP)

## System packages the tests need (Debian): sshd, Slurm, munge, ...
sysdeps:
	bash scripts/install-sysdeps.sh

## Local demo: hub + CHP + broker + node agent + real notebook on http://127.0.0.1:8000
## (BACKEND=slurm: the same on the project's single-node Slurm, started by scripts/slurm.sh;
##  PROXY=traefik: Traefik and jupyterhub-traefik-proxy instead of CHP;
##  BACKEND=sge: on the single-host Grid Engine cell, started by scripts/sge.sh)
BACKEND ?= local
PROXY ?= chp
demo: venv chp labextension
	BACKEND=$(BACKEND) PROXY=$(PROXY) PATH="$(abspath $(VENV))/bin:$(abspath $(NODE_PREFIX))/node_modules/.bin:$$PATH" $(PY) -m devstack

## The gate (no root, no services, under 2 minutes): lint, format, types, unit tests
CHECK_MARKERS := not e2e and not slurm and not apptainer and not site and not component
check: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy
	$(PY) -m pytest -q -m "$(CHECK_MARKERS)" -p no:cacheprovider $(CHECK_ARGS)

## Full test suite against real components
test: venv chp sysdeps
	PATH="$(abspath $(VENV))/bin:$(abspath $(NODE_PREFIX))/node_modules/.bin:$$PATH" $(PY) -m pytest $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) $(NODE_PREFIX) demo-state labextension/built labextension/lib labextension/node_modules

## Benchmarks: tunnel vs OpenSSH vs direct (each also behind CHP), spawn-to-ready (local; Slurm vs batchspawner), squeue load, scale 10k (docs/benchmarks.md)
BENCH_ARGS ?=
bench: venv chp
	PATH="$(abspath $(VENV))/bin:$(abspath $(NODE_PREFIX))/node_modules/.bin:$$PATH" $(PY) -m bench $(BENCH_ARGS)

## Apptainer images for the node side from singularity/*.def: singularity/cpu.sif (GPU=1: also gpu.sif).
## Stages are cached outside the checkout (singularity/README.md); IMAGES_REFRESH=1 rebuilds them.
GPU ?=
images: $(LABEXT_BUILT)
	$(PYTHON) scripts/build_images.py cpu $(if $(filter 1 yes true,$(GPU)),gpu)

## JupyterLab's time-left extension: labextension/ built into labextension/built/ (the wheel's data
## files; node_modules cached outside the checkout, LABEXT_CACHE); `make labextension` also installs
## it into the venv (what installing the wheel does), for `make demo` on the editable install
$(LABEXT_BUILT): $(LABEXT_SRC) | $(VENV)/.installed
	PATH="$(abspath $(NODE_PREFIX))/node_modules/.bin:$$PATH" PYTHON="$(abspath $(PY))" bash scripts/build-labextension.sh

$(LABEXT_IN_VENV)/package.json: $(LABEXT_BUILT)
	rm -rf $(LABEXT_IN_VENV)
	mkdir -p $(LABEXT_IN_VENV) $(VENV)/etc/jupyter/jupyter_server_config.d
	cp -r labextension/built/. $(LABEXT_IN_VENV)/
	cp labextension/jupyterhub-hpc-timeleft.json $(VENV)/etc/jupyter/jupyter_server_config.d/

labextension: $(LABEXT_IN_VENV)/package.json
