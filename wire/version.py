"""The project's version, defined once.

``pyproject.toml`` reads it (``[tool.setuptools.dynamic]``), ``broker --version`` and
``node-agent --version`` print it, and the session store records the version that last wrote a
database (:mod:`broker.store`). Standard library only: the node side imports it too.
"""

__version__ = "0.2.0"
