# JupyterHub behind a Shibboleth SP (Apache + mod_shib), see docs/shibboleth.md.
#
#   browser --https--> Apache (mod_shib, SP) --http--> configurable-http-proxy --> JupyterHub
#
# Apache authenticates the browser with the institution's IdP and forwards every request with
# the user's eppn in the X-Remote-User header; JupyterHub believes that header only from the
# Apache host and maps "alice@uni.example" to the JupyterHub user "alice".

c = get_config()  # noqa: F821

c.JupyterHub.authenticator_class = "hub_plugin.auth_header.RemoteUserAuthenticator"

# The header Apache sets (RequestHeader set X-Remote-User %{REMOTE_USER}e).
c.RemoteUserAuthenticator.header_name = "X-Remote-User"

# Address(es) of the SP host(s): only requests that reached the proxy from there may assert an
# identity (configurable-http-proxy records the address of whoever connected to it in
# X-Forwarded-For). Here Apache runs on its own host, 10.0.0.5.
# Never trust loopback (or whatever address the tunnel broker connects to the hub from): the
# broker carries code running in notebooks to the hub API, so its connections would count as the
# SP. The authenticator refuses to start if trusted_proxies covers
# RemoteUserAuthenticator.broker_addresses (default: 127.0.0.1 and ::1). With Apache on the hub
# host itself, give its proxy connections their own source address (nginx: proxy_bind 127.0.0.2)
# and trust only that one.
c.RemoteUserAuthenticator.trusted_proxies = ["10.0.0.5/32"]

# Who may connect to the hub itself: the proxy. Keep the hub on loopback.
c.RemoteUserAuthenticator.trusted_hub_peers = ["127.0.0.1/32", "::1/128"]
c.JupyterHub.hub_ip = "127.0.0.1"

# eppn -> user name. Must match the whole value: other scopes (alice@other.example) are refused,
# so two institutions' "alice" can never become the same JupyterHub user.
c.RemoteUserAuthenticator.identity_regex = r"(?P<username>[a-z0-9][a-z0-9._-]{0,63})@uni\.example"

# Everyone the IdP lets through may use the hub; or restrict with allowed_users / groups.
c.Authenticator.allow_all = True
# c.Authenticator.admin_users = {"alice"}

# Public URL is Apache's. The proxy listens on the hub host's address the SP reaches (10.0.0.6
# here); firewall it to the SP host. Anyone else who connects to it directly is refused at
# /hub/login, because their address is not the SP's.
c.JupyterHub.bind_url = "http://10.0.0.6:8000/"

# Logging out of JupyterHub does not end the Shibboleth session (the next request logs the user
# in again); link users to the SP's /Shibboleth.sso/Logout for that (docs/shibboleth.md).
