"""Unit cases of the hub-API filter (wire/hubapi.py): pure byte-in, byte-out, no network.

What the filter forwards is compared byte for byte; refusals by status, by what was forwarded
before them (nothing of the refused request), and by the answer written to the client.
The real relays (broker channel, agent relay, real JupyterHub) are in tests/test_hubapi_relay.py.
"""

from __future__ import annotations

import pytest

from wire.hubapi import (
    DEFAULT_STRIP_HEADERS,
    HubApiExchange,
    HubApiPolicy,
    SessionRates,
    TokenBucket,
    api_prefix_of,
    target_problem,
)

POLICY = HubApiPolicy(max_body=1000, rate=0)


def req(
    target: str = "/hub/api/user", method: str = "GET", headers: str = "", body: bytes = b"", version: str = "HTTP/1.1"
) -> bytes:
    return f"{method} {target} {version}\r\nHost: hub\r\n{headers}\r\n".encode() + body


def run(data: bytes | list[bytes], policy: HubApiPolicy = POLICY, bucket: TokenBucket | None = None):
    ex = HubApiExchange(policy, bucket)
    pieces = [data] if isinstance(data, bytes) else data
    out = b"".join(ex.from_client(p) for p in pieces)
    return ex, out


def status_of(ex: HubApiExchange) -> int | None:
    return ex.denial.status if ex.denial else None


# -- paths ----------------------------------------------------------------------------------
ALLOWED = [
    "/hub/api",
    "/hub/api/",
    "/hub/api/user",
    "/hub/api/users/alice/activity",
    "/hub/api/oauth2/token",
    "/hub/api/users?state=active&offset=0",
    "/hub/api/users/%C3%A9l%C3%A8ve",
    "/hub/api/users/a%2Fb",
    "/hub/api/users/alice/tokens/a.b",
    "/hub/api/users/..alice",
]

DENIED = [
    "/hub/login",
    "/hub/login?next=/hub/admin",
    "/hub/admin",
    "/hub/home",
    "/",
    "/hub/",
    "/hub/apix",
    "/hub/api;/../login",
    "/user/alice/api",
    "/hub/ap%69/user",
    "/HUB/API/user",
    # traversal, raw and encoded (any case, double encoded, mixed), ;-parameters
    "/hub/api/../login",
    "/hub/api/./../login",
    "/hub/api/..",
    "/hub/api/%2e%2e/login",
    "/hub/api/%2E%2E/login",
    "/hub/api/.%2e/login",
    "/hub/api/%2e./login",
    "/hub/api/%252e%252e/login",
    "/hub/api/%25252e%25252e/login",
    "/hub/api/..%2flogin",
    "/hub/api/..%2Flogin",
    "/hub/api/%2e%2e%2flogin",
    "/hub/api/..;/login",
    "/hub/api/%2e%2e;x/login",
    "/hub/api/.",
    "/hub/api/users/.",
    # empty segments
    "//hub/api/user",
    "/hub//api/user",
    "/hub/api//user",
    "/hub/api/%2f%2fx",
    "/hub/api%2f..%2flogin",
    # backslashes
    "/hub/api/..\\login",
    "/hub/api\\..\\login",
    "/hub/api/%5c..%5clogin",
    "/hub/api/%5C",
    # not origin-form
    "http://127.0.0.1:8081/hub/api/user",
    "https://hub/hub/api/",
    "hub:8081",
    "*",
    "hub/api/user",
    # escapes and characters
    "/hub/api/%zz",
    "/hub/api/%",
    "/hub/api/%2",
    "/hub/api/%00",
    "/hub/api/%0d%0aX-Remote-User:%20a",
    "/hub/api/a%09b",
    "/hub/api/<x>",
    "/hub/api/{x}",
    "/hub/api/\xe9",
    "/hub/api/user#frag",
    "/hub/api/%2525252e",
    "/hub/api/" + "%25" * 3 + "2e",
]


@pytest.mark.parametrize("target", ALLOWED)
def test_api_paths_pass_unchanged(target):
    data = req(target)
    ex, out = run(data)
    assert ex.denial is None and out == data


@pytest.mark.parametrize("target", DENIED)
def test_everything_else_is_refused_and_nothing_forwarded(target):
    data = req(target)
    ex, out = run(data)
    assert status_of(ex) in (400, 403), (target, ex.denial)
    assert out == b""
    answer = ex.answer()
    assert answer.startswith(f"HTTP/1.1 {ex.denial.status} ".encode()) and b"Connection: close" in answer
    head, _, body = answer.partition(b"\r\n\r\n")
    assert f"Content-Length: {len(body)}".encode() in head
    assert target.encode() not in body  # the answer never echoes the client's input


@pytest.mark.parametrize(
    "target", ["/hub/login", "/hub/admin", "/hub/home", "/hub/api/../login", "http://127.0.0.1:8081/hub/api/user"]
)
def test_policy_refusals_are_403(target):
    ex, out = run(req(target))
    assert status_of(ex) == 403 and out == b""


def test_base_url_is_honoured():
    policy = HubApiPolicy(api_prefix="/jh/hub/api/", rate=0)
    assert run(req("/jh/hub/api/user"), policy)[0].denial is None
    assert run(req("/jh/hub/api"), policy)[0].denial is None
    for target in ("/hub/api/user", "/jh/hub/login", "/jh/hub/api/../login", "/jh/../hub/api/user", "/jhx/hub/api/"):
        assert status_of(run(req(target), policy)[0]) == 403, target


def test_target_problem_matches_the_contract():
    assert target_problem(b"/hub/api/user?x=../../login", "/hub/api/") is None  # the query is not a path
    assert target_problem(b"/hub/api/../login", "/hub/api/") == "dot segment in the path"
    assert target_problem(b"/hub/login", "/hub/api/") == "path outside the hub API"


def test_api_prefix_of_the_hub_api_url():
    assert api_prefix_of("http://127.0.0.1:8081/hub/api") == "/hub/api/"
    assert api_prefix_of("http://hub:8081/jh/hub/api/") == "/jh/hub/api/"
    for bad in ("http://hub:8081", "http://hub:8081/", "http://hub:8081/hub/", "http://hub:8081/hub/api/users"):
        with pytest.raises(ValueError, match="/hub/api"):
            api_prefix_of(bad)
    for bad in ("/hub/", "hub/api/", "/x/../hub/api/", "//hub/api/"):
        with pytest.raises(ValueError):
            HubApiPolicy(api_prefix=bad)


# -- methods, upgrades ----------------------------------------------------------------------
@pytest.mark.parametrize("method", ["CONNECT", "TRACE", "PRI", "PROPFIND", "FOO"])
def test_other_methods_are_refused(method):
    target = "hub:8081" if method == "CONNECT" else "/hub/api/user"
    ex, out = run(req(target, method))
    assert status_of(ex) == 405 and out == b""


@pytest.mark.parametrize("method", ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"])
def test_api_methods_pass(method):
    ex, out = run(req("/hub/api/users/a", method))
    assert ex.denial is None and out == req("/hub/api/users/a", method)


@pytest.mark.parametrize(
    "headers",
    [
        "Upgrade: websocket\r\nConnection: Upgrade\r\n",
        "Upgrade: h2c\r\n",
        "Connection: keep-alive, Upgrade\r\n",
        "HTTP2-Settings: AAMAAABkAAQAAP__\r\n",
    ],
)
def test_protocol_upgrades_are_refused(headers):
    ex, out = run(req("/hub/api/user", headers=headers))
    assert status_of(ex) == 403 and out == b""


# -- headers ---------------------------------------------------------------------------------
FORGED = (
    "X-Forwarded-For: 127.0.0.2\r\nx-forwarded-proto: https\r\nX-FORWARDED-HOST: evil\r\n"
    "X_Forwarded_For: 127.0.0.2\r\nForwarded: for=127.0.0.2\r\nX-Real-Ip: 127.0.0.2\r\nX-Real_IP: 127.0.0.2\r\n"
    "X-Scheme: https\r\nTrue-Client-IP: 127.0.0.2\r\nX-Client-Ip: 1.2.3.4\r\nClient-Ip: 1.2.3.4\r\n"
    "X-Cluster-Client-Ip: 1.2.3.4\r\n"
    "X-Remote-User: admin@uni.example\r\nx_remote_user: admin\r\nREMOTE_USER: admin\r\nRemote-User: admin\r\n"
    "remote_user: admin\r\neppn: admin@uni.example\r\nEPPN: admin@uni.example\r\nX-Eppn: admin\r\n"
)
KEPT = "Authorization: token abc\r\nAccept: application/json\r\nX-Custom_Thing:  keep me \r\nCookie: a=b\r\n"


def test_forwarding_and_identity_headers_are_stripped_others_kept_byte_for_byte():
    ex, out = run(req("/hub/api/user", headers=FORGED + KEPT))
    assert ex.denial is None
    assert out == req("/hub/api/user", headers=KEPT)


def test_stripped_identity_headers_are_configurable():
    policy = HubApiPolicy(strip_headers=("X-Shib-Principal",), rate=0)
    ex, out = run(
        req("/hub/api/user", headers="x_shib_principal: admin\r\nX-Remote-User: kept\r\nX-Real-Ip: 1.1.1.1\r\n"), policy
    )
    assert ex.denial is None and out == req(
        "/hub/api/user", headers="X-Remote-User: kept\r\n"
    )  # forwarding headers: always
    assert {"X-Remote-User", "REMOTE_USER", "eppn"} <= set(DEFAULT_STRIP_HEADERS)
    with pytest.raises(ValueError):
        HubApiPolicy(strip_headers=("bad name",))


# -- framing, keep-alive, pipelining ---------------------------------------------------------
def test_keep_alive_requests_are_each_parsed():
    a, b = req("/hub/api/user"), req("/hub/api/users/alice/activity", "POST", "Content-Length: 2\r\n", b"{}")
    ex, out = run(a + b + req("/hub/login"))
    assert out == a + b and ex.requests == 2 and status_of(ex) == 403


def test_chunked_body_is_delimited_and_the_next_request_parsed():
    body = b"5;ext=1\r\nhello\r\n1A\r\n" + b"x" * 26 + b"\r\n0\r\n\r\n"
    a = req("/hub/api/users/a/activity", "POST", "Transfer-Encoding: chunked\r\n", body)
    ex, out = run(a + req("/hub/api/user"))
    assert ex.denial is None and out == a + req("/hub/api/user") and ex.requests == 2
    ex, out = run(a + req("/hub/admin"))
    assert out == a and status_of(ex) == 403


def test_a_request_hidden_in_a_body_is_data_and_the_one_after_it_is_checked():
    hidden = req("/hub/login", headers="X-Remote-User: admin\r\n")
    smuggle_cl = req("/hub/api/user", "POST", f"Content-Length: {len(hidden)}\r\n", hidden)
    ex, out = run(smuggle_cl + hidden)
    assert out == smuggle_cl and status_of(ex) == 403  # the body passes as data; the real request is refused
    chunk = f"{len(hidden):x}\r\n".encode() + hidden + b"\r\n0\r\n\r\n"
    smuggle_te = req("/hub/api/user", "POST", "Transfer-Encoding: chunked\r\n", chunk)
    ex, out = run(smuggle_te + hidden)
    assert out == smuggle_te and status_of(ex) == 403


def test_bodies_may_contain_anything():
    body = b'{\n  "a": "\r\n\r\nGET /hub/login HTTP/1.1\n\n",\n  "b": "\x00\xff"\n}\n'
    a = req("/hub/api/users", "POST", f"Content-Length: {len(body)}\r\n", body)
    chunked = req(
        "/hub/api/users",
        "POST",
        "Transfer-Encoding: chunked\r\n",
        f"{len(body):x}\r\n".encode() + body + b"\r\n0\r\n\r\n",
    )
    ex, out = run(a + chunked + req("/hub/api/user"))
    assert ex.denial is None and out == a + chunked + req("/hub/api/user") and ex.requests == 3


@pytest.mark.parametrize("size", [1, 2, 3, 7, 64])
def test_split_packets_give_the_same_result(size):
    body = b"3\r\nabc\r\n0\r\n\r\n"
    stream = (
        b"\r\n"
        + req("/hub/api/user", headers=FORGED)
        + req("/hub/api/x", "POST", "Transfer-Encoding: chunked\r\n", body)
        + req("/hub/api/y", "PUT", "Content-Length: 5\r\n", b"12345")
        + req("/hub/home")
    )
    whole_ex, whole = run(stream)
    pieces = [stream[i : i + size] for i in range(0, len(stream), size)]
    split_ex, split = run(pieces)
    assert split == whole and split_ex.denial == whole_ex.denial and whole_ex.requests == 3
    assert status_of(split_ex) == 403 and b"X-Forwarded-For" not in split


def test_after_a_refusal_nothing_more_is_forwarded():
    ex, out = run([req("/hub/login"), req("/hub/api/user")])
    assert out == b"" and status_of(ex) == 403


# -- body cap --------------------------------------------------------------------------------
def test_content_length_over_the_cap_is_413_before_anything_is_forwarded():
    ex, out = run(req("/hub/api/user", "POST", "Content-Length: 1001\r\n"))
    assert status_of(ex) == 413 and out == b"" and not ex.denial.abort
    ok = req("/hub/api/user", "POST", "Content-Length: 1000\r\n", b"x" * 1000)
    assert run(ok)[1] == ok


def test_chunked_body_over_the_cap_is_413_and_aborts():
    head = req("/hub/api/user", "POST", "Transfer-Encoding: chunked\r\n")
    ex, out = run([head, b"3e8\r\n" + b"x" * 1000 + b"\r\n", b"1\r\ny\r\n0\r\n\r\n"])
    assert status_of(ex) == 413 and ex.denial.abort
    assert out == head + b"3e8\r\n" + b"x" * 1000 + b"\r\n"  # never more than the cap
    assert (
        HubApiExchange(HubApiPolicy(max_body=0, rate=0))
        .from_client(req("/hub/api/user", "POST", "Content-Length: 99999999\r\n"))
        .startswith(b"POST")
    )  # 0: no cap


# -- rate cap --------------------------------------------------------------------------------
class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def test_rate_cap_is_a_token_bucket_shared_by_the_sessions_channels():
    clock = Clock()
    rates = SessionRates(rate=2.0, burst=3, clock=clock)
    policy = HubApiPolicy(rate=2.0, burst=3)
    ex1, out1 = run(req() * 2, policy, rates.bucket("s1"))
    ex2, out2 = run(req(), policy, rates.bucket("s1"))  # another channel of the same session
    assert ex1.denial is None and ex2.denial is None and out1 == req() * 2 and out2 == req()
    ex3, out3 = run(req(), policy, rates.bucket("s1"))
    assert status_of(ex3) == 429 and out3 == b""
    assert b"Retry-After: 1\r\n" in ex3.answer()
    assert run(req(), policy, rates.bucket("s2"))[0].denial is None  # another session: its own bucket
    clock.now += 0.5  # one token back
    assert run(req(), policy, rates.bucket("s1"))[0].denial is None
    assert status_of(run(req(), policy, rates.bucket("s1"))[0]) == 429


def test_refused_requests_cost_a_token_too():
    clock = Clock()
    bucket = TokenBucket(1.0, 2, clock)
    policy = HubApiPolicy(rate=1.0, burst=2)
    assert status_of(run(req("/hub/login"), policy, bucket)[0]) == 403
    assert status_of(run(req("/hub/login"), policy, bucket)[0]) == 403
    assert status_of(run(req("/hub/api/user"), policy, bucket)[0]) == 429


def test_full_buckets_are_forgotten_when_the_table_grows():
    clock = Clock()
    rates = SessionRates(rate=10.0, burst=5, clock=clock, prune_at=100)
    for i in range(100):
        rates.bucket(f"s{i}").take()
    busy = rates.bucket("s0")
    for _ in range(4):
        busy.take()
    clock.now += 0.3  # the others refilled (1 token at 10/s); s0 (4 more taken) did not
    rates.bucket("new")
    assert len(rates) == 2 and rates.bucket("s0") is busy
    assert SessionRates(rate=0, burst=1).bucket("x") is None  # 0: no cap


# -- malformed input -------------------------------------------------------------------------
MALFORMED = {
    "not http": (b"ping\r\n\r\n", 400),
    "binary": (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n", 400),
    "bare LF": (b"GET /hub/api/user HTTP/1.1\nHost: hub\n\n", 400),
    "bare LF in a header": (b"GET /hub/api/user HTTP/1.1\r\nHost: hub\nX-Remote-User: a\r\n\r\n", 400),
    "bare CR": (b"GET /hub/api/user HTTP/1.1\r\nHost: hub\rX-Remote-User: a\r\n\r\n", 400),
    "obs-fold": (b"GET /hub/api/user HTTP/1.1\r\nHost: hub\r\n X-Remote-User: a\r\n\r\n", 400),
    "space before colon": (b"GET /hub/api/user HTTP/1.1\r\nX-Remote-User : a\r\n\r\n", 400),
    "no colon": (b"GET /hub/api/user HTTP/1.1\r\nX-Remote-User\r\n\r\n", 400),
    "NUL in a value": (b"GET /hub/api/user HTTP/1.1\r\nAccept: a\x00b\r\n\r\n", 400),
    "two spaces": (b"GET  /hub/api/user HTTP/1.1\r\n\r\n", 400),
    "no version": (b"GET /hub/api/user\r\n\r\n", 400),
    "four parts": (b"GET /hub/api/user HTTP/1.1 x\r\n\r\n", 400),
    "HTTP/0.9-ish": (b"GET /hub/api/user HTTP/x\r\n\r\n", 400),
    "HTTP/2.0": (b"GET /hub/api/user HTTP/2.0\r\n\r\n", 505),
    "h2 preface": (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", 505),
    "tab in target": (b"GET /hub/api/\tx HTTP/1.1\r\n\r\n", 400),
    "CL and TE": (req("/hub/api/user", "POST", "Content-Length: 3\r\nTransfer-Encoding: chunked\r\n"), 400),
    "TE gzip": (req("/hub/api/user", "POST", "Transfer-Encoding: gzip, chunked\r\n"), 400),
    "TE twice": (req("/hub/api/user", "POST", "Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n"), 400),
    "TE with HTTP/1.0": (req("/hub/api/user", "POST", "Transfer-Encoding: chunked\r\n", version="HTTP/1.0"), 400),
    "CL twice": (req("/hub/api/user", "POST", "Content-Length: 1\r\nContent-Length: 1\r\n"), 400),
    "CL list": (req("/hub/api/user", "POST", "Content-Length: 1, 1\r\n"), 400),
    "CL sign": (req("/hub/api/user", "POST", "Content-Length: +1\r\n"), 400),
    "CL negative": (req("/hub/api/user", "POST", "Content-Length: -1\r\n"), 400),
    "CL hex": (req("/hub/api/user", "POST", "Content-Length: 0x10\r\n"), 400),
    "CL huge": (req("/hub/api/user", "POST", "Content-Length: 99999999999999999999999\r\n"), 400),
}


@pytest.mark.parametrize("case", MALFORMED)
def test_malformed_requests(case):
    data, code = MALFORMED[case]
    ex, out = run(data)
    assert status_of(ex) == code and out == b"", (case, ex.denial)
    assert ex.answer().startswith(f"HTTP/1.1 {code} ".encode())


@pytest.mark.parametrize(
    "body, why",
    [
        (b"zz\r\nhello\r\n0\r\n\r\n", "malformed chunk size"),
        (b"0x5\r\nhello\r\n0\r\n\r\n", "malformed chunk size"),
        (b" 5\r\nhello\r\n0\r\n\r\n", "malformed chunk size"),
        (b"5\r\nhelloXX0\r\n\r\n", "chunk data not followed by CRLF"),
        (b"5\nhello\r\n0\r\n\r\n", "malformed chunk line"),
        (b"0\r\nX-Remote-User: admin\r\n\r\n", "trailers are not accepted"),
        (b"1" * 2000, "malformed chunk line"),
        (b"11111111111111111\r\n", "malformed chunk size"),
    ],
)
def test_malformed_chunked_bodies_abort(body, why):
    head = req("/hub/api/user", "POST", "Transfer-Encoding: chunked\r\n")
    ex, out = run([head, body])
    assert status_of(ex) == 400 and ex.denial.abort and ex.denial.reason == why
    assert out.startswith(head)


def test_oversized_heads():
    ex, out = run(b"GET /hub/api/" + b"a" * 9000)
    assert status_of(ex) == 414 and out == b""  # refused before the line even ends
    ex, out = run(req("/hub/api/user", headers="X-Pad: " + "p" * 40000 + "\r\n"))
    assert status_of(ex) == 431 and out == b""
    ex, out = run(req("/hub/api/user", headers="X-Pad: p\r\n" * 101))
    assert status_of(ex) == 431
    ex, _ = run([b"GET /hub/api/user HTTP/1.1\r\n"] + [b"X-Pad: " + b"p" * 1000 + b"\r\n"] * 40)
    assert status_of(ex) == 431  # incremental: refused while the head is still arriving


# -- responses ---------------------------------------------------------------------------------
def test_the_answer_waits_for_responses_to_earlier_requests():
    ex, out = run(req("/hub/api/a") + req("/hub/api/b", "HEAD") + req("/hub/api/c") + req("/hub/login"))
    assert out == req("/hub/api/a") + req("/hub/api/b", "HEAD") + req("/hub/api/c")
    assert ex.requests == 3 and status_of(ex) == 403 and ex.outstanding == 3 and not ex.can_answer()
    ex.from_hub(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nab")
    assert ex.outstanding == 3
    ex.from_hub(b"cd\r\n0\r\n\r\n")
    assert ex.outstanding == 2
    ex.from_hub(b"HTTP/1.1 200 OK\r\nContent-Length: 999\r\n\r\n")  # HEAD: no body follows
    assert ex.outstanding == 1 and not ex.can_answer()
    ex.from_hub(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nx")
    ex.from_hub(b"yz")
    assert ex.outstanding == 0 and ex.can_answer() and ex.responses == 3


def test_untrackable_responses_are_noticed():
    ex, _ = run(req("/hub/api/a"))
    ex.from_hub(b"HTTP/1.0 200 OK\r\n\r\nuntil close")
    assert not ex.tracking
    ex, _ = run(req("/hub/api/a"))
    ex.from_hub(b"hub-api:GET /hub/api/a")
    assert not ex.tracking
