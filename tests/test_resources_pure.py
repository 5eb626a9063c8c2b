"""hub_plugin.resources (partition and request parsing, the checks) stays free of JupyterHub,
batchspawner, traitlets and tornado, so its rules are testable on their own (tests/test_options.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_resources_imports_only_the_standard_library():
    code = (
        "import sys, hub_plugin.resources\n"
        "third = sorted({m.split('.')[0] for m in sys.modules} & {'jupyterhub', 'batchspawner', 'traitlets', 'tornado', 'jinja2'})\n"
        "print(','.join(third))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", out.stdout
