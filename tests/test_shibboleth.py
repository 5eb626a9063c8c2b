"""Shibboleth-style header login (``hub_plugin.auth_header.RemoteUserAuthenticator``) on a real
JupyterHub behind a real configurable-http-proxy (the :class:`Stack`).

The "SP" is a client connecting to CHP from 127.0.0.2 (the only trusted front-end address); an
ordinary client connects from 127.0.0.1. Checks: the SP's header logs in the mapped user (cookie
set; ``/hub/api/user`` with that cookie names the user); no header, an untrusted source, a forged
``X-Forwarded-For``/``X-Real-Ip`` and a foreign eppn scope are refused with no cookie.
"""

from __future__ import annotations

import http.client
import json
from http.cookies import SimpleCookie

import pytest

from harness import running_stack, tool_path

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180)]

SP_ADDR = "127.0.0.2"
HEADER = "X-Remote-User"


@pytest.fixture(scope="module")
def shib_stack(tmp_path_factory):
    work = tmp_path_factory.mktemp("shib")
    with running_stack(
        str(work / "stack"),
        path=tool_path(),
        extra_hub_config=(
            "c.JupyterHub.authenticator_class = 'hub_plugin.auth_header.RemoteUserAuthenticator'\n"
            f"c.RemoteUserAuthenticator.header_name = {HEADER!r}\n"
            f"c.RemoteUserAuthenticator.trusted_proxies = ['{SP_ADDR}/32']\n"
            "c.RemoteUserAuthenticator.identity_regex = r'(?P<username>[a-z0-9][a-z0-9._-]*)@uni\\.example'\n"
        ),
    ) as s:
        yield s


def get(stack, path, headers=None, source=None, cookies=None):
    conn = http.client.HTTPConnection(
        "127.0.0.1", stack.public_port, timeout=30, source_address=(source, 0) if source else None
    )
    h = dict(headers or {})
    if cookies:
        h["Cookie"] = "; ".join(f"{k}={v}" for k, v in cookies.items())
    conn.request("GET", path, headers=h)
    r = conn.getresponse()
    body = r.read().decode(errors="replace")
    jar = SimpleCookie()
    for v in r.headers.get_all("Set-Cookie") or []:
        jar.load(v)
    conn.close()
    return r.status, r.headers, body, {k: m.value for k, m in jar.items()}


def login(stack, value=None, source=SP_ADDR, extra=None):
    headers = dict(extra or {})
    if value is not None:
        headers[HEADER] = value
    return get(stack, "/hub/login?next=/hub/api/user", headers, source)


@pytest.mark.parametrize("eppn, user", [("alice@uni.example", "alice"), ("bob.smith@uni.example", "bob.smith")])
def test_header_from_sp_logs_in_mapped_user(shib_stack, eppn, user):
    status, headers, body, cookies = login(shib_stack, eppn)
    assert status == 302, (status, body[:500])
    assert "jupyterhub-hub-login" in cookies, cookies
    # the cookie alone (no header, ordinary client) identifies the user
    st, _, text, _ = get(
        shib_stack,
        "/hub/api/user",
        source="127.0.0.1",
        cookies={"jupyterhub-hub-login": cookies["jupyterhub-hub-login"]},
    )
    assert st == 200, (st, text[:500])

    assert json.loads(text)["name"] == user


@pytest.mark.parametrize(
    "case, value, source, extra, code",
    [
        ("no header", None, SP_ADDR, None, 401),
        ("untrusted source", "alice@uni.example", "127.0.0.1", None, 403),
        (
            "forged forwarding headers",
            "alice@uni.example",
            "127.0.0.1",
            {"X-Forwarded-For": SP_ADDR, "X-Real-Ip": SP_ADDR},
            403,
        ),
        ("foreign scope", "alice@evil.example", SP_ADDR, None, 403),
        ("no scope", "alice", SP_ADDR, None, 403),
        ("multi-valued attribute", "alice@uni.example;bob@uni.example", SP_ADDR, None, 403),
        ("overlong", "a" * 300 + "@uni.example", SP_ADDR, None, 403),
        # CHP (node's HTTP parser) already rejects control characters in header values
        ("control characters", "alice@uni.example\x01", SP_ADDR, None, (400, 403)),
    ],
)
def test_refused(shib_stack, case, value, source, extra, code):
    status, _, body, cookies = login(shib_stack, value, source, extra)
    assert status in (code if isinstance(code, tuple) else (code,)), (case, status, body[:300])
    assert "jupyterhub-hub-login" not in cookies, (case, cookies)


def test_api_without_cookie_is_refused(shib_stack):
    status, _, _, _ = get(shib_stack, "/hub/api/user", headers={HEADER: "alice@uni.example"}, source=SP_ADDR)
    assert status == 403  # the header logs in only at /hub/login; the API wants a token/cookie


@pytest.mark.parametrize(
    "kw, msg",
    [
        ({"identity_regex": r"[^@]+@uni\.example"}, "needs a group named 'username'"),
        ({"identity_regex": r"(?P<username>"}, "not a valid regular expression"),
        ({"trusted_proxies": ["10.0.0.300/32"]}, "not an address or CIDR network"),
    ],
)
def test_bad_configuration_names_the_option(kw, msg):
    from traitlets import TraitError

    from hub_plugin.auth_header import RemoteUserAuthenticator

    with pytest.raises((TraitError, ValueError), match=msg):
        RemoteUserAuthenticator(**kw)
