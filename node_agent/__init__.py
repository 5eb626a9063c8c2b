"""The compute-side node agent: launched in each batch job, it connects out to the broker,
supervises jupyterhub-singleuser and carries its traffic through one SSH connection.

Only the standard library and asyncssh may be imported from this package.
"""

__version__ = "0.1.0"
