#!/usr/bin/env bash
# Build JupyterLab's time-left extension (labextension/) into labextension/built/, the directory
# the wheel's data files come from (pyproject.toml [tool.setuptools.data-files]); `make labextension`.
#
#   scripts/build-labextension.sh
#
# node_modules live OUTSIDE the checkout, in $LABEXT_CACHE (default
# $XDG_CACHE_HOME/jupyterhub-hpc-broker/labextension-node), installed with `npm ci` from
# package-lock.json, again only when package.json or the lock file changes;
# labextension/node_modules is a symlink to it. Needs node/npm on PATH and a Python with
# JupyterLab 4 ($PYTHON, default: the checkout's .venv/bin/python) for the build
# (jupyter-builder, or `jupyter labextension build` before JupyterLab 4.6).
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
PYTHON=${PYTHON:-$REPO/.venv/bin/python}
CACHE=${LABEXT_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/jupyterhub-hpc-broker/labextension-node}
NAME=jupyterhub-hpc-timeleft

command -v npm >/dev/null || { echo "build-labextension: npm not found on PATH (Debian: apt-get install npm, or node from .node)" >&2; exit 3; }
"$PYTHON" -c 'import jupyterlab' 2>/dev/null || { echo "build-labextension: $PYTHON has no jupyterlab (make venv first, or set PYTHON)" >&2; exit 3; }

mkdir -p "$CACHE"
if ! cmp -s labextension/package.json "$CACHE/package.json" || ! cmp -s labextension/package-lock.json "$CACHE/package-lock.json" \
        || [ ! -d "$CACHE/node_modules" ]; then
    cp labextension/package.json labextension/package-lock.json "$CACHE/"
    (cd "$CACHE" && npm ci --no-audit --no-fund --loglevel=error)  # exactly the versions of the lock file
fi
ln -sfn "$CACHE/node_modules" labextension/node_modules

cd labextension
rm -rf lib built tsconfig.tsbuildinfo
node_modules/.bin/tsc
# shared packages aligned with the JupyterLab that builds it (its staging package.json; no network)
CORE=$("$PYTHON" -c 'import jupyterlab, os; print(os.path.join(os.path.dirname(jupyterlab.__file__), "staging", "package.json"))')
export PATH="$(dirname "$PYTHON"):$PATH"
if command -v jupyter-builder >/dev/null; then
    jupyter-builder build --core-package-file="$CORE" . >/dev/null
else  # JupyterLab < 4.6
    "$PYTHON" -m jupyterlab.labextensions build --core-path "$(dirname "$CORE")" . >/dev/null
fi
test -f built/package.json && ls built/static/remoteEntry.*.js >/dev/null
echo "build-labextension: built labextension/built/ ($(du -sk built | cut -f1) KiB)"

