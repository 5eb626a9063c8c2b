"""JupyterHub spawners (built on batchspawner) that start notebooks through the broker."""
