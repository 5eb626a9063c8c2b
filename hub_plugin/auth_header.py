"""Log in users from a header set by a trusted front end, e.g. a Shibboleth SP (see
docs/shibboleth.md).

The front end (Apache/nginx with the Shibboleth SP module) authenticates the browser and
forwards each request with the identity in a header (``REMOTE_USER``, ``X-Remote-User``, or the
eppn attribute). :class:`RemoteUserAuthenticator` believes that header only when the request
comes from an address in ``trusted_proxies``, maps the value to a JupyterHub user name with
``identity_regex`` (``alice@uni.example`` -> ``alice``; values that do not match are refused),
and logs the user in at ``/hub/login`` without a form.

Source address: JupyterHub runs behind configurable-http-proxy, which appends the address it
received the connection from to ``X-Forwarded-For``. The source is therefore the **last**
``X-Forwarded-For`` entry (earlier entries and ``X-Real-Ip`` are client-controlled and ignored)
- or the hub's direct TCP peer when the header is absent - and the hub's direct peer must be
trusted too (``trusted_hub_peers``, default loopback: CHP). Keep the hub's own port unreachable
from anything but the proxy (``c.JupyterHub.hub_ip = "127.0.0.1"``).

The tunnel broker also connects to the hub, from ``broker_addresses`` (loopback by default), to
carry the notebooks' hub-API calls. A request arriving that way has the broker as its source, so
the authenticator refuses to start when ``trusted_proxies`` covers any of ``broker_addresses``
(unless ``allow_broker_in_trusted_proxies`` is set): otherwise any code in a notebook could log in
as anyone. (The broker's relay passes only ``/hub/api/`` and strips identity headers too.)

    c.JupyterHub.authenticator_class = "hub_plugin.auth_header.RemoteUserAuthenticator"
    c.RemoteUserAuthenticator.header_name = "X-Remote-User"
    c.RemoteUserAuthenticator.trusted_proxies = ["10.0.0.5/32"]      # the SP host(s)
    c.RemoteUserAuthenticator.identity_regex = r"(?P<username>[a-z0-9._-]+)@uni\\.example"
"""

from __future__ import annotations

import ipaddress
import re
from typing import Any

from jupyterhub.auth import Authenticator
from jupyterhub.handlers import BaseHandler
from tornado import web
from traitlets import Bool, List, Unicode, default, validate

MAX_HEADER_LEN = 256

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def _networks(values: list[str], name: str) -> list[Network]:
    out: list[Network] = []
    for v in values:
        try:
            out.append(ipaddress.ip_network(v, strict=False))
        except ValueError as e:
            raise ValueError(f"RemoteUserAuthenticator.{name}: {v!r} is not an address or CIDR network ({e})") from None
    return out


def _covers(nets: list[Network], addr: str) -> bool:
    """Whether *nets* contain *addr*, also in its IPv4-mapped IPv6 form (``::ffff:a.b.c.d``)."""
    ip = ipaddress.ip_address(addr)
    forms = [ip]
    if ip.version == 4:
        forms.append(ipaddress.ip_address(f"::ffff:{ip}"))
    elif ip.ipv4_mapped is not None:
        forms.append(ip.ipv4_mapped)
    return any(f in n for f in forms for n in nets if f.version == n.version)


def _in(addr: str, nets: list[Network]) -> bool:
    try:
        ip = ipaddress.ip_address(addr.strip().strip("[]"))
    except ValueError:
        return False
    if ip.version == 6 and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return any(ip in n for n in nets)


class AddressList(List[str]):
    """A configurable list of IP addresses or, with ``networks=True``, of addresses and CIDR
    networks. An entry that is neither fails the configuration with a message naming the option."""

    def __init__(self, default_value: list[str] | None = None, *, networks: bool = False, help: str):
        super().__init__(Unicode(), [] if default_value is None else default_value, help=help)
        self.networks = networks
        self.tag(config=True)

    def validate(self, obj: Any, value: Any) -> list[str] | None:
        value = super().validate(obj, value)
        if self.networks:
            _networks(value or [], str(self.name))
            return value
        for v in value or []:
            try:
                ipaddress.ip_address(v)
            except ValueError:
                raise ValueError(f"RemoteUserAuthenticator.{self.name}: {v!r} is not an IP address") from None
        return value


class RemoteUserLoginHandler(BaseHandler):
    """``GET /hub/login``: log in from the header, then go to ``next`` (or the user's home)."""

    async def get(self):
        user = await self.login_user()
        if user is None:  # authenticate() raised for the clear cases; this is e.g. not allowed
            raise web.HTTPError(403, "user is not allowed to use this hub")
        self.redirect(self.get_next_url(user))

    post = get


class RemoteUserAuthenticator(Authenticator):
    """Trust a user-name header from configured front-end addresses (Shibboleth SP, ...)."""

    header_name = Unicode(
        "REMOTE_USER",
        help="Request header that carries the authenticated identity. With Apache + mod_shib, "
        "forward it with `RequestHeader set X-Remote-User %{REMOTE_USER}e` (and use "
        "'X-Remote-User' here); never let a client-supplied copy through.",
    ).tag(config=True)

    trusted_proxies = AddressList(
        networks=True,
        help="Addresses/CIDR networks of the front ends allowed to assert the header (the host "
        "running the Shibboleth SP). Requests from anywhere else are refused (403), header or not. "
        "Required; must not cover broker_addresses.",
    )

    broker_addresses = AddressList(
        ["127.0.0.1", "::1"],
        help="Addresses the tunnel broker's hub-API connections come from, as the hub sees them "
        "(loopback when the broker runs on the hub host). Notebooks' requests reach the hub from "
        "there, so the authenticator refuses to start if trusted_proxies covers one of them.",
    )

    allow_broker_in_trusted_proxies = Bool(
        False,
        help="Start even though trusted_proxies covers one of broker_addresses. Anything that "
        "reaches the hub through the broker then counts as coming from the front end; only the "
        "broker's hub-API filter (/hub/api/ only, identity headers stripped) stands in the way.",
    ).tag(config=True)

    trusted_hub_peers = AddressList(
        ["127.0.0.1/32", "::1/128"],
        networks=True,
        help="Addresses that may connect to the hub itself (configurable-http-proxy).",
    )

    identity_regex = Unicode(
        r"(?P<username>.+)",
        help="Regular expression that must match the WHOLE header value; its group "
        "'username' is the JupyterHub user name. E.g. r'(?P<username>[a-z0-9._-]+)@uni\\.example' "
        "maps the eppn 'alice@uni.example' to 'alice' and refuses other scopes. The default "
        "keeps the value unchanged.",
    ).tag(config=True)

    @validate("identity_regex")
    def _check_regex(self, proposal):
        try:
            rx = re.compile(proposal.value)
        except re.error as e:
            raise ValueError(f"RemoteUserAuthenticator.identity_regex: not a valid regular expression ({e})") from None
        if "username" not in rx.groupindex:
            raise ValueError(
                "RemoteUserAuthenticator.identity_regex: needs a group named "
                "'username', e.g. (?P<username>[^@]+)@uni\\.example"
            )
        return proposal.value

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.check_trusted_sources()

    def check_trusted_sources(self) -> None:
        """Refuse a configuration in which the broker's hub-API connections count as the front end."""
        if not self.trusted_proxies:
            raise ValueError(
                "RemoteUserAuthenticator.trusted_proxies: not set; list the address(es) "
                "of the single sign-on front end (the Shibboleth SP host), e.g. "
                "['10.0.0.5/32']"
            )
        if self.allow_broker_in_trusted_proxies:
            return
        nets = _networks(self.trusted_proxies, "trusted_proxies")
        for addr in self.broker_addresses:
            if _covers(nets, addr):
                raise ValueError(
                    f"RemoteUserAuthenticator.trusted_proxies covers {addr}, one of "
                    "RemoteUserAuthenticator.broker_addresses (where the tunnel broker's hub-API "
                    "connections come from): code in any notebook would count as the single "
                    "sign-on front end. List only the SP host(s) in trusted_proxies; if the broker "
                    "connects from elsewhere, set broker_addresses; to accept the risk, set "
                    "RemoteUserAuthenticator.allow_broker_in_trusted_proxies = True."
                )

    @default("auto_login")
    def _auto_login_default(self):
        return True

    def source_address(self, handler) -> tuple[str, str]:
        """(hub's direct TCP peer, the address that sent the request to the proxy)."""
        req = handler.request
        peer = getattr(req.connection.context, "_orig_remote_ip", None) or req.remote_ip or ""
        xff = req.headers.get("X-Forwarded-For", "")
        source = xff.split(",")[-1].strip() if xff.strip() else peer
        return peer, source

    def identity_from(self, handler) -> str:
        """Check the source and the header; return the mapped user name or raise HTTPError."""
        peer, source = self.source_address(handler)
        if not _in(peer, _networks(self.trusted_hub_peers, "trusted_hub_peers")):
            self.log.warning("remote-user login refused: hub peer %.64r is not trusted", peer)
            raise web.HTTPError(403, "request did not come through the trusted proxy")
        if not _in(source, _networks(self.trusted_proxies, "trusted_proxies")):
            self.log.warning("remote-user login refused: source %.64r is not in trusted_proxies", source)
            raise web.HTTPError(403, "login is only possible through the institution's single sign-on front end")
        value = handler.request.headers.get(self.header_name, "")
        if not value:
            raise web.HTTPError(
                401, f"no identity from the single sign-on front end (header {self.header_name} missing)"
            )
        if len(value) > MAX_HEADER_LEN or any(ord(c) < 0x20 or ord(c) == 0x7F for c in value):
            self.log.warning("remote-user login refused: malformed %s header", self.header_name)
            raise web.HTTPError(403, "malformed identity header")
        m = re.fullmatch(self.identity_regex, value)
        if not m or not m.group("username"):
            self.log.warning("remote-user login refused: %.64r does not match identity_regex", value)
            raise web.HTTPError(403, "this identity is not accepted here")
        return m.group("username")

    async def authenticate(self, handler, data=None):
        return self.identity_from(handler)

    def get_handlers(self, app):
        return [("/login", RemoteUserLoginHandler)]
