# /etc/jupyterhub-hpc-broker/jupyterhub_config.py — the hub of a production site.
# Read by jupyterhub.service (`jupyterhub -f THIS_FILE`). Secrets come from the environment that
# systemd loads from /etc/jupyterhub-hpc-broker/secrets.env (0600); none is written here.
# tests/test_production.py runs this very file (with paths, addresses and ports substituted).
import os

c = get_config()  # noqa: F821  (provided by JupyterHub when it loads this file)

# -- where the hub listens and keeps its state -------------------------------------------------
# The public side is CHP on loopback; nginx in front of it terminates TLS (docs/deploy.md, TLS).
c.JupyterHub.bind_url = "http://127.0.0.1:8000/"
# The hub's own API: the broker relays the jobs' hub-API calls here, so loopback is enough.
c.JupyterHub.hub_ip = "127.0.0.1"
c.JupyterHub.hub_port = 8081
# The hub's database and cookie secret, in its StateDirectory (see jupyterhub.service).
c.JupyterHub.db_url = "sqlite:////var/lib/jupyterhub-hpc-broker/hub/jupyterhub.sqlite"
c.JupyterHub.cookie_secret_file = "/var/lib/jupyterhub-hpc-broker/hub/jupyterhub_cookie_secret"

# -- the proxy runs as its own service (configurable-http-proxy.service) ------------------------
# The hub must not start or stop CHP: restarting the hub then keeps every route (and so every
# running notebook) reachable.
c.ConfigurableHTTPProxy.should_start = False
# CHP's REST API; its token comes from CONFIGPROXY_AUTH_TOKEN in the environment.
c.ConfigurableHTTPProxy.api_url = "http://127.0.0.1:8001"

# -- a hub restart must not end the notebooks ---------------------------------------------------
# The default (True) stops every server when the hub stops: every notebook job would be cancelled
# at each restart or upgrade. With False, the restarted hub picks each job up again (its job id
# and broker session are in the hub's database) and the broker keeps the tunnels meanwhile.
c.JupyterHub.cleanup_servers = False

# -- who may log in ------------------------------------------------------------------------------
# The default PAM authenticator: the cluster's Unix accounts, which per-user submission needs.
# Replace it with your site's (OAuth, Shibboleth: docs/shibboleth.md), mapping to account names.
c.JupyterHub.authenticator_class = "pam"
# Who may log in: members of the same group the sudoers rule names (examples/production/sudoers).
c.PAMAuthenticator.allowed_groups = {"jupyterhub-users"}
# An API token for your own scripts (monitoring, backups), from the environment file. Remove the
# two lines below if you have none.
c.JupyterHub.services = [{"name": "ops", "api_token": os.environ["JUPYTERHUB_OPS_TOKEN"]}]
c.JupyterHub.load_roles = [{"name": "admin", "services": ["ops"]}]

# -- notebooks as Slurm jobs, through the broker ----------------------------------------------
c.JupyterHub.spawner_class = "hub_plugin.slurm.SlurmBrokerSpawner"
# The broker's REST API (jupyterhub-broker.service); its token is BROKER_API_TOKEN in the environment.
c.BrokerSpawnerMixin.broker_url = "http://127.0.0.1:8091"
# Submit on the cluster's login node over ONE pooled SSH connection, host key verified.
c.SlurmBrokerSpawner.login_node_host = "login.cluster.example"
c.SlurmBrokerSpawner.login_node_port = 22
# The login-node account the hub logs in as; it may only run sbatch/scancel as the users (sudoers).
c.SlurmBrokerSpawner.login_node_user = "jupyterhub"
# Its private key (0600, owned by the hub's account) and the login node's host key.
c.SlurmBrokerSpawner.login_node_key_file = "/etc/jupyterhub-hpc-broker/login_ed25519"
c.SlurmBrokerSpawner.login_node_known_hosts = "/etc/jupyterhub-hpc-broker/login_known_hosts"
# Each job runs as the user's own account: sudo -n -u USER -- sbatch on the login node.
c.SlurmBrokerSpawner.submit_as = "sudo"
# Where node-agent and jupyterhub-singleuser are installed on the compute nodes (docs/deploy.md).
c.SlurmBrokerSpawner.req_path = "/opt/jupyterhub-hpc-broker/bin"
# The job runs `node-agent launch`, which reads the HPC config (images, homes, overlays) and
# starts the server in its container; the server command follows the `--`.
c.SlurmBrokerSpawner.agent_command = "node-agent launch --config /etc/node-agent/hpc-config.toml --"
c.Spawner.cmd = ["jupyterhub-singleuser"]
# Job output files: in each user's home (the default) keeps them private to the user.
# c.SlurmBrokerSpawner.req_output_dir = "/scratch/jupyter-logs"
# Your partition, account and limits, e.g.:
# c.SlurmBrokerSpawner.req_partition = "interactive"
# c.SlurmBrokerSpawner.req_runtime = "8:00:00"
# One squeue for all jobs every this many seconds (the hub polls every spawner against it).
c.SlurmBrokerSpawner.slurm_poll_interval = 10

# -- waiting in the queue --------------------------------------------------------------------------
# JupyterHub gives up on a spawn after start_timeout seconds and the job is cancelled. A job may
# wait in the queue for hours: size this for the longest queue wait you accept. While it waits,
# the progress page shows the job id, Slurm's reason (Priority, Resources, JobHeldUser...) and the
# estimated start time, and the user can cancel the request.
c.Spawner.start_timeout = 4 * 3600
# Once the job runs, its server must be ready within this many seconds, else the spawn fails and
# the job is cancelled (a hung job does not hold the node for start_timeout).
c.BrokerSpawnerMixin.ready_timeout = 600
# After the job starts, the server must answer within this many seconds.
c.Spawner.http_timeout = 300
# How often the hub polls each running server (the poll is answered by the one shared squeue).
c.Spawner.poll_interval = 30
