"""RemoteUserAuthenticator never counts the tunnel broker as the single sign-on front end.

The broker's hub-API connections come from ``broker_addresses`` (loopback by default); if
``trusted_proxies`` covered one of them, code in any notebook could log in as anyone through the
relay (see tests/test_hubapi_relay.py for that attack against a real hub). The authenticator
refuses such a configuration at start, naming the options; ``allow_broker_in_trusted_proxies``
overrides. A real ``jupyterhub`` process given such a configuration exits with that message, and
``examples/shibboleth/jupyterhub_config.py`` passes the check.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from traitlets.config import PyFileConfigLoader

from devstack.stack import free_port
from hub_plugin.auth_header import RemoteUserAuthenticator

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize(
    "trusted, brokers",
    [
        (["127.0.0.1/32"], None),
        (["127.0.0.0/8"], None),
        (["::1/128"], None),
        (["0.0.0.0/0"], None),
        (["::ffff:127.0.0.1/128"], None),  # the IPv4-mapped form of the broker's address
        (["10.0.0.0/8"], ["10.1.2.3"]),  # a broker on another host
    ],
)
def test_refuses_to_trust_the_broker(trusted, brokers):
    kw = {"trusted_proxies": trusted}
    if brokers is not None:
        kw["broker_addresses"] = brokers
    with pytest.raises(ValueError) as e:
        RemoteUserAuthenticator(**kw)
    assert "RemoteUserAuthenticator.trusted_proxies" in str(e.value)
    assert "RemoteUserAuthenticator.allow_broker_in_trusted_proxies" in str(e.value)


def test_unset_trusted_proxies_is_refused():
    with pytest.raises(ValueError, match="RemoteUserAuthenticator.trusted_proxies: not set"):
        RemoteUserAuthenticator()


def test_the_sp_address_or_an_explicit_override_is_accepted():
    assert RemoteUserAuthenticator(trusted_proxies=["127.0.0.2/32"]).trusted_proxies == ["127.0.0.2/32"]
    RemoteUserAuthenticator(trusted_proxies=["10.0.0.5/32"], broker_addresses=["10.0.0.6"])
    RemoteUserAuthenticator(trusted_proxies=["127.0.0.1/32"], allow_broker_in_trusted_proxies=True)
    with pytest.raises(ValueError, match="RemoteUserAuthenticator.broker_addresses"):
        RemoteUserAuthenticator(trusted_proxies=["10.0.0.5/32"], broker_addresses=["not-an-address"])


def test_shibboleth_example_passes_the_check():
    path = os.path.join(REPO, "examples", "shibboleth", "jupyterhub_config.py")
    loader = PyFileConfigLoader(os.path.basename(path), os.path.dirname(path))
    config = loader.load_config()
    auth = RemoteUserAuthenticator(config=config)
    assert auth.trusted_proxies and auth.allow_broker_in_trusted_proxies is False
    assert config.RemoteUserAuthenticator.trusted_proxies == auth.trusted_proxies


@pytest.mark.timeout(120)
def test_a_real_hub_refuses_to_start_when_it_would_trust_the_broker(tmp_path):
    (tmp_path / "jupyterhub_config.py").write_text(
        "c = get_config()  # noqa\n"
        f"c.JupyterHub.bind_url = 'http://127.0.0.1:{free_port()}/'\n"
        f"c.JupyterHub.hub_port = {free_port()}\n"
        f"c.ConfigurableHTTPProxy.api_url = 'http://127.0.0.1:{free_port()}'\n"
        "c.ConfigurableHTTPProxy.should_start = False\n"
        "c.ConfigurableHTTPProxy.auth_token = 'x' * 32\n"
        f"c.JupyterHub.db_url = 'sqlite:///{tmp_path}/hub.sqlite'\n"
        f"c.JupyterHub.cookie_secret_file = '{tmp_path}/cookie_secret'\n"
        "c.JupyterHub.authenticator_class = 'hub_plugin.auth_header.RemoteUserAuthenticator'\n"
        "c.RemoteUserAuthenticator.trusted_proxies = ['127.0.0.1/32']  # where CHP and the broker connect from\n"
        "c.Authenticator.allow_all = True\n"
    )
    r = subprocess.run(
        [sys.executable, "-m", "jupyterhub", "-f", str(tmp_path / "jupyterhub_config.py")],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )
    assert r.returncode != 0
    out = r.stdout + r.stderr
    assert "RemoteUserAuthenticator.trusted_proxies covers 127.0.0.1" in out, out[-3000:]
    assert "allow_broker_in_trusted_proxies" in out
