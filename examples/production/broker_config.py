# /etc/jupyterhub-hpc-broker/broker_config.py — the broker of a production site.
# Read by jupyterhub-broker.service (`broker serve --config-file=THIS_FILE`) and by `broker status`
# and `broker accounting` run by an admin anywhere on the hub host (the standard location).
# Tokens come from the environment (/etc/jupyterhub-hpc-broker/secrets.env, 0600), never this file.
# Every option: `broker generate-config`. tests/test_production.py runs this file.
c = get_config()  # noqa: F821  (provided by the broker when it loads this file)

# The session database, the SSH host key and runtime.json (for `broker status`): the unit's
# StateDirectory, 0700, owned by the broker's account. Back it up (docs/deploy.md, Backup).
c.BrokerApp.state_dir = "/var/lib/jupyterhub-hpc-broker/broker"

# The agents' SSH server: the ONE port compute nodes connect to (inbound from the compute
# network only; docs/deploy.md, Ports). All interfaces, or the hub's address on that network.
c.BrokerApp.ssh_host = "0.0.0.0"
c.BrokerApp.ssh_port = 8022
# The name the jobs connect to (the hub host as the compute nodes resolve it).
c.BrokerApp.ssh_public_host = "hub.cluster.example"

# The REST API for the hub and for `broker status`: loopback only (token: BROKER_API_TOKEN).
c.BrokerApp.api_host = "127.0.0.1"
c.BrokerApp.api_port = 8091

# CHP's REST API (token: CONFIGPROXY_AUTH_TOKEN) and the hub's API that agents may reach.
c.BrokerApp.proxy_api_url = "http://127.0.0.1:8001"
c.BrokerApp.hub_api_url = "http://127.0.0.1:8081/hub/api"

# JSON lines on stdout: journald keeps them (`journalctl -u jupyterhub-broker -o cat | jq`).
c.BrokerApp.log_json = True
c.BrokerApp.log_level = "INFO"

# How often the published routes are compared with CHP's (and a restarted CHP refilled).
c.RoutePublisher.reconcile_interval = 10.0
