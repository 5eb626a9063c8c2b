"""The wire contract between the hub side (``broker``) and the node side (``node_agent``).

Everything both ends of the agent's SSH connection must agree on lives here, defined once:
constants and message shapes (``wire.contract``, standard library only) and the few asyncssh-only
pieces both sides run. ``node_agent`` imports nothing from ``broker`` or ``hub_plugin``: a compute
node carries only ``node_agent``, ``wire`` and asyncssh.
"""
