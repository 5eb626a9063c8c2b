"""The development stack: JupyterHub + configurable-http-proxy + broker on one machine.

Not shipped: the wheel holds ``broker``, ``node_agent`` and ``hub_plugin`` only, and none of
them imports this package. :mod:`devstack.stack` is the stack itself (also what the end-to-end
tests and the benchmarks run); :mod:`devstack.demo` is ``make demo`` (``python -m devstack``).
"""

from .stack import Stack, free_port, wait_http

__all__ = ["Stack", "free_port", "wait_http"]
