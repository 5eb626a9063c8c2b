"""The hub-API filter: an incremental HTTP/1.1 request filter for the hub-API relay (stdlib only).

An agent's direct channel to the hub, and the agent's node-local relay in front of it, carry the
notebook server's calls to the hub's REST API. Without a filter they would carry *any* bytes to
the hub's port: its login page (where a header authenticator such as
``hub_plugin.auth_header.RemoteUserAuthenticator`` trusts a forged ``X-Remote-User`` from a
trusted peer), its admin pages, its other handlers. :class:`HubApiExchange` sits on one such
byte stream and lets only the REST API through. Both the broker (its end of every hub-API
direct channel, so an agent that skips its own relay gets the same answer) and the agent's
node-local relay use it.

Contract of :class:`HubApiExchange` (one instance per client connection / SSH channel):

- :meth:`~HubApiExchange.from_client` takes bytes in the client -> hub direction, in pieces of
  any size, and returns the bytes to forward to the hub (possibly none yet: an incomplete request
  head is held back until it is complete; at most ``MAX_HEAD`` bytes are held).
- A request is forwarded only if its head is well formed HTTP/1.0 or HTTP/1.1 and
    * its method is one of ``ALLOWED_METHODS`` (``CONNECT``, ``TRACE`` ... -> 405);
    * it asks for no protocol switch (an ``Upgrade`` header or ``Connection: upgrade`` -> 403);
    * its target is an origin-form path (``/...``; absolute-form URIs, ``*`` and authority-form
      -> 403) under the API prefix (``<base_url>hub/api/``, or exactly ``<base_url>hub/api``),
      checked both as sent and percent-decoded until stable; any ``.``/``..`` segment (also
      ``..;x``), ``//``, backslash, control character or malformed percent escape -> 403. The
      target is forwarded exactly as sent (the hub routes on the undecoded path);
    * its body, by ``Content-Length`` or chunked, is within ``max_body`` (-> 413);
    * the session's token bucket has a token (-> 429 with ``Retry-After``); every complete request
      head costs one token, denied or not.
- Forwarded heads lose ``Forwarded``, ``X-Forwarded-*``, ``X-Real-Ip``, ``X-Scheme``,
  ``X-Client-Ip``, ``True-Client-Ip``, ``Client-Ip``, ``X-Cluster-Client-Ip`` and every header of
  ``HubApiPolicy.strip_headers``. Names compare case-insensitively with ``_`` and ``-``
  equivalent (``REMOTE_USER`` = ``Remote-User``). All other header lines pass byte for byte.
- Bodies are delimited exactly (``Content-Length``, or chunked with strict hex sizes, CRLFs and no
  trailers; ``Transfer-Encoding`` other than a single ``chunked``, both framings at once,
  duplicate or non-numeric lengths -> 400), so the next request on a keep-alive or pipelined
  connection is parsed again — never smuggled inside a body.
- Malformed input -> 400 (bare CR/LF, obs-folded or malformed header lines, bad request line),
  an over-long request line -> 414, over-long or too many headers -> 431, unsupported version
  -> 505.
- After the first refusal :attr:`~HubApiExchange.denial` is set and no further byte is forwarded.
  The caller should stop reading from the client, wait until :meth:`~HubApiExchange.can_answer`
  (responses to requests already forwarded have been passed on), write :meth:`answer` to the
  client and close the connection — only this one. If the refusal came in the middle of a body
  already partly forwarded (``denial.abort``), the caller also drops the hub connection.
- Checks run in this order: well-formedness (400, 414, 431, 505), the token (429), method,
  upgrade, target, body size; the first failure decides the answer.
- :meth:`~HubApiExchange.from_hub` *observes* the hub -> client bytes (the caller passes them on
  untouched) to count completed responses; if the responses cannot be delimited (no length,
  ``101``, garbage) :attr:`~HubApiExchange.tracking` becomes False and a refusal closes the
  connection without an answer.

:class:`HubApiPolicy` holds the settings (prefix, stripped headers, body cap, rate);
:class:`SessionRates` hands out the token bucket of a session, shared by all its channels.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import math
import re
import time
from collections.abc import Callable
from urllib.parse import urlsplit

from .ratelimit import TokenBucket

#: Identity headers a header authenticator (Shibboleth SP, mod_auth_*, oauth2-proxy) may trust;
#: stripped by default. Compared with ``_`` = ``-`` and ignoring case.
DEFAULT_STRIP_HEADERS: tuple[str, ...] = (
    "X-Remote-User",
    "REMOTE_USER",
    "eppn",
    "X-Eppn",
    "Shib-Eppn",
    "X-Remote-Email",
    "X-Auth-Request-User",
    "X-Auth-Request-Email",
    "X-Auth-Request-Preferred-Username",
)
#: Always stripped: forwarding information a hub (Tornado ``xheaders``) or an authenticator reads.
FORWARDING_HEADERS = frozenset(
    {
        b"forwarded",
        b"x-real-ip",
        b"x-scheme",
        b"x-client-ip",
        b"true-client-ip",
        b"client-ip",
        b"x-cluster-client-ip",
    }
)
FORWARDING_PREFIX = b"x-forwarded-"
ALLOWED_METHODS = frozenset({b"GET", b"HEAD", b"POST", b"PUT", b"PATCH", b"DELETE", b"OPTIONS"})

MAX_REQUEST_LINE = 8 * 1024
MAX_HEAD = 32 * 1024
MAX_HEADERS = 100
MAX_CHUNK_LINE = 1024
MAX_RESPONSE_HEAD = 64 * 1024
#: The hub's REST API under the default base URL (``/``).
DEFAULT_API_PREFIX = "/hub/api/"
DEFAULT_MAX_BODY = 1024 * 1024
DEFAULT_RATE = 20.0
DEFAULT_BURST = 200

_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_VERSION = re.compile(rb"HTTP/\d\.\d")
_PATH = re.compile(rb"/[A-Za-z0-9\-._~!$&'()*+,;=:@/%]*")
_BAD_ESCAPE = re.compile(rb"%(?![0-9A-Fa-f]{2})")
_ESCAPE = re.compile(rb"%([0-9A-Fa-f]{2})")
_BARE_LF = re.compile(rb"(?<!\r)\n")
_HEX = re.compile(rb"[0-9A-Fa-f]{1,16}")
_BAD_VALUE = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
_DIGITS = re.compile(rb"[0-9]{1,18}")

REASONS = {
    400: "Bad Request",
    403: "Forbidden",
    405: "Method Not Allowed",
    413: "Content Too Large",
    414: "URI Too Long",
    429: "Too Many Requests",
    431: "Request Header Fields Too Large",
    505: "HTTP Version Not Supported",
}


def header_key(name: str | bytes) -> bytes:
    """The comparison form of a header name: lower case, ``_`` as ``-``."""
    raw = name.encode("latin-1") if isinstance(name, str) else name
    return raw.lower().replace(b"_", b"-")


def api_prefix_of(url: str) -> str:
    """The API prefix (``<base_url>hub/api/``) from a hub API URL such as ``JUPYTERHUB_API_URL``.

    Raises ValueError when the URL's path does not end in ``/hub/api``: a wider prefix would open
    the hub's login and pages.
    """
    path = urlsplit(url).path.rstrip("/")
    if not path.endswith("/hub/api"):
        raise ValueError(f"the path of {url!r} must end in /hub/api (the hub's REST API)")
    return path + "/"


@dataclasses.dataclass(frozen=True)
class HubApiPolicy:
    """What the relay lets through. ``max_body``/``rate`` of 0 mean no cap."""

    api_prefix: str = DEFAULT_API_PREFIX
    strip_headers: tuple[str, ...] = DEFAULT_STRIP_HEADERS
    max_body: int = DEFAULT_MAX_BODY
    rate: float = DEFAULT_RATE  # requests per second per session (token refill)
    burst: int = DEFAULT_BURST  # bucket size

    def __post_init__(self) -> None:
        p = self.api_prefix.encode("ascii", "replace")
        if not p.startswith(b"/") or not p.endswith(b"/hub/api/") or not _PATH.fullmatch(p) or _path_problem(p):
            raise ValueError(f"API prefix {self.api_prefix!r}: must be a plain path ending in /hub/api/")
        for name in self.strip_headers:
            if not _TOKEN.fullmatch(name.encode("latin-1", "replace")):
                raise ValueError(f"not a header name: {name!r}")
        if self.max_body < 0 or self.rate < 0 or self.burst < 1:
            raise ValueError("max_body and rate must be >= 0, burst >= 1")
        object.__setattr__(self, "strip_headers", tuple(self.strip_headers))

    @functools.cached_property
    def stripped(self) -> frozenset[bytes]:
        return frozenset(header_key(h) for h in self.strip_headers)


# -- rate ---------------------------------------------------------------------------------------
class SessionRates:
    """The token bucket of each session (shared by all its channels and connections).

    A bucket that has refilled completely is the same as a new one, so full buckets are
    forgotten whenever the table has grown past ``prune_at`` entries: memory stays bounded by
    the sessions active within ``burst / rate`` seconds.
    """

    def __init__(self, rate: float, burst: int, clock: Callable[[], float] = time.monotonic, prune_at: int = 1024):
        self.rate = rate
        self.burst = burst
        self.clock = clock
        self.prune_at = prune_at
        self._buckets: dict[str, TokenBucket] = {}

    def bucket(self, session_id: str) -> TokenBucket | None:
        """The session's bucket, or None when the rate is not capped."""
        if self.rate <= 0:
            return None
        b = self._buckets.get(session_id)
        if b is None:
            if len(self._buckets) >= self.prune_at:
                self._buckets = {k: v for k, v in self._buckets.items() if not v.full()}
            b = self._buckets[session_id] = TokenBucket(self.rate, self.burst, self.clock)
        return b

    def __len__(self) -> int:
        return len(self._buckets)


# -- parsing helpers ----------------------------------------------------------------------------
class _Refused(Exception):
    def __init__(self, status: int, reason: str, sample: bytes | None = None):
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.sample = sample


def _unquote(raw: bytes) -> bytes | None:
    if _BAD_ESCAPE.search(raw):
        return None
    return _ESCAPE.sub(lambda m: bytes([int(m.group(1), 16)]), raw)


def _path_problem(path: bytes) -> str | None:
    """Why *path* (raw or decoded) could escape its prefix, or None."""
    if b"\\" in path or _BAD_VALUE.search(path) or b"\t" in path or b" " in path:
        return "backslash, space or control character in the path"
    if b"//" in path:
        return "empty path segment"
    for seg in path.split(b"/"):
        if seg.split(b";", 1)[0] in (b".", b".."):
            return "dot segment in the path"
    return None


def target_problem(target: bytes, prefix: str) -> str | None:
    """Why the request *target* is not under *prefix* (see the module contract), or None if it is."""
    if not target.startswith(b"/"):
        return "target is not an origin-form path"
    path = target.split(b"?", 1)[0]
    if b"#" in target:
        return "fragment in the target"
    if not _PATH.fullmatch(path):
        return "characters not allowed in the path"
    raw_prefix = prefix.encode("ascii")
    decoded, dec_prefix = path, _unquote(raw_prefix) or raw_prefix
    for _ in range(4):
        nxt = _unquote(decoded)
        if nxt is None:
            return "malformed percent-encoding"
        if nxt == decoded:
            break
        decoded = nxt
    else:
        return "percent-encoding nested too deeply"
    for p, pre in ((path, raw_prefix), (decoded, dec_prefix)):
        why = _path_problem(p)
        if why:
            return why
        if not (p.startswith(pre) or p == pre[:-1]):
            return "path outside the hub API"
    return None


class _Body:
    """Delimits one message body in a byte stream: a fixed length, or chunked (RFC 9112 7.1)."""

    def __init__(self, length: int | None, chunked: bool, cap: int = 0, trailers: bool = False):
        self.remaining = length or 0
        self.chunked = chunked
        self.cap = cap
        self.trailers = trailers
        self.total = 0
        self.state = "size" if chunked else "data"
        self.done = not chunked and not length

    def consume(self, buf: bytearray) -> int:
        """How many bytes at the start of *buf* belong to this body; sets :attr:`done` at its end."""
        pos, n = 0, len(buf)
        while pos < n and not self.done:
            if self.state == "data":
                take = min(self.remaining, n - pos)
                pos += take
                self.remaining -= take
                if self.remaining == 0:
                    if self.chunked:
                        self.state = "crlf"
                    else:
                        self.done = True
            elif self.state == "crlf":
                got = bytes(buf[pos : pos + 2])
                if got != b"\r\n"[: len(got)]:
                    raise _Refused(400, "chunk data not followed by CRLF")
                if len(got) < 2:
                    break
                pos += 2
                self.state = "size"
            else:  # "size" or "trailer": a CRLF-terminated line
                eol = buf.find(b"\r\n", pos)
                if eol < 0:
                    if n - pos > MAX_CHUNK_LINE or b"\n" in buf[pos:]:
                        raise _Refused(400, "malformed chunk line")
                    break
                line = bytes(buf[pos:eol])
                if b"\n" in line or _BAD_VALUE.search(line):
                    raise _Refused(400, "malformed chunk line")
                pos = eol + 2
                if self.state == "trailer":
                    if not line:
                        self.done = True
                    elif not self.trailers:
                        raise _Refused(400, "trailers are not accepted")
                    continue
                size_text = line.split(b";", 1)[0]
                if not _HEX.fullmatch(size_text):
                    raise _Refused(400, "malformed chunk size")
                size = int(size_text, 16)
                self.total += size
                if self.cap and self.total > self.cap:
                    raise _Refused(413, "request body too large")
                if size:
                    self.remaining, self.state = size, "data"
                else:
                    self.state = "trailer"
        return pos


@dataclasses.dataclass(frozen=True)
class Denial:
    status: int
    reason: str  # fixed text: never client input
    sample: bytes  # start of the offending request, for the log (cap and escape it there)
    abort: bool = False  # the request was partly forwarded: drop the hub connection
    retry_after: float | None = None


# -- the exchange -------------------------------------------------------------------------------
class HubApiExchange:
    """One client connection to the hub API, filtered (see the module docstring for the contract)."""

    def __init__(self, policy: HubApiPolicy, bucket: TokenBucket | None = None):
        self.policy = policy
        self.bucket = bucket
        self._stripped = policy.stripped
        self._buf = bytearray()
        self._scanned = 0
        self._body: _Body | None = None
        self.denial: Denial | None = None
        self.requests = 0  # request heads forwarded
        # responses
        self._sent: collections.deque[bytes] = collections.deque()  # methods awaiting a response
        self._rbuf = bytearray()
        self._rbody: _Body | None = None
        self.tracking = True
        self.responses = 0

    # client -> hub --------------------------------------------------------------------------
    def from_client(self, data: bytes) -> bytes:
        """Bytes from the client; returns what may be forwarded to the hub."""
        if self.denial is not None:
            return b""
        self._buf += data
        out: list[bytes] = []
        try:
            while self._buf:
                if self._body is not None:
                    n = self._body.consume(self._buf)
                    out.append(bytes(self._buf[:n]))
                    del self._buf[:n]
                    if not self._body.done:
                        break
                    self._body = None
                    continue
                head = self._take_head()
                if head is None:
                    break
                out.append(head)
                if self._body is not None and self._body.done:
                    self._body = None
        except _Refused as r:
            abort = self._body is not None
            sample = r.sample if r.sample is not None else b"(request body)" if abort else bytes(self._buf[:80])
            self._deny(r.status, r.reason, sample, abort)
        return b"".join(out)

    def _deny(self, status: int, reason: str, sample: bytes, abort: bool = False) -> None:
        retry = self.bucket.retry_after() if status == 429 and self.bucket is not None else None
        self.denial = Denial(status, reason, sample[:200], abort, retry)
        self._buf.clear()

    def _take_head(self) -> bytes | None:
        """Parse, check and rewrite one complete request head at the start of the buffer."""
        buf = self._buf
        while buf.startswith(b"\r\n"):  # RFC 9112 2.2: ignore empty lines before a request
            del buf[:2]
            self._scanned = 0
        start = max(0, self._scanned - 3)
        end = buf.find(b"\r\n\r\n", start)
        # only the head: a body in the same piece may contain anything
        if _BARE_LF.search(buf, max(0, start - 1), end if end >= 0 else len(buf)):
            raise _Refused(400, "bare LF in the request head")
        if end < 0:
            self._scanned = len(buf)
            first = buf.find(b"\r\n")
            if (first if first >= 0 else len(buf)) > MAX_REQUEST_LINE:
                raise _Refused(414, "request line too long")
            if len(buf) > MAX_HEAD:
                raise _Refused(431, "request head too large")
            return None
        if end + 4 > MAX_HEAD:
            raise _Refused(431, "request head too large")
        head = bytes(buf[:end])
        del buf[: end + 4]
        self._scanned = 0
        try:
            return self._check_head(head)
        except _Refused as r:
            raise _Refused(r.status, r.reason, head[:120]) from None

    def _check_head(self, head: bytes) -> bytes:
        lines = head.split(b"\r\n")
        if b"\r" in head.replace(b"\r\n", b""):
            raise _Refused(400, "bare CR in the request head")
        request_line, header_lines = lines[0], lines[1:]
        if len(request_line) > MAX_REQUEST_LINE:
            raise _Refused(414, "request line too long")
        if len(header_lines) > MAX_HEADERS:
            raise _Refused(431, "too many header fields")
        parts = request_line.split(b" ")
        if (
            len(parts) != 3
            or not _TOKEN.fullmatch(parts[0])
            or not parts[1]
            or _BAD_VALUE.search(parts[1])
            or b"\t" in parts[1]
        ):
            raise _Refused(400, "malformed request line")
        method, target, version = parts
        if not _VERSION.fullmatch(version):
            raise _Refused(400, "malformed request line")
        if version not in (b"HTTP/1.1", b"HTTP/1.0"):
            raise _Refused(505, "only HTTP/1.0 and HTTP/1.1")
        kept: list[bytes] = [request_line]
        length: int | None = None
        chunked = False
        seen_te = False
        upgrade = False
        for line in header_lines:
            name, colon, value = line.partition(b":")
            if not colon or not _TOKEN.fullmatch(name):
                raise _Refused(400, "malformed header line")
            value = value.strip(b" \t")
            if _BAD_VALUE.search(value):
                raise _Refused(400, "control character in a header value")
            key = header_key(name)
            if key == b"content-length":
                if length is not None or not _DIGITS.fullmatch(value):
                    raise _Refused(400, "invalid or repeated Content-Length")
                length = int(value)
            elif key == b"transfer-encoding":
                if seen_te or value.lower() != b"chunked" or version == b"HTTP/1.0":
                    raise _Refused(400, "unsupported Transfer-Encoding")
                seen_te = chunked = True
            elif key in (b"upgrade", b"http2-settings") or (
                key == b"connection" and b"upgrade" in [t.strip().lower() for t in value.split(b",")]
            ):
                upgrade = True
            if key in FORWARDING_HEADERS or key.startswith(FORWARDING_PREFIX) or key in self._stripped:
                continue
            kept.append(line)
        if chunked and length is not None:
            raise _Refused(400, "both Content-Length and Transfer-Encoding")
        # well formed: from here on the request costs a token, then the policy decides
        if self.bucket is not None and not self.bucket.take():
            raise _Refused(429, "too many hub API requests from this session")
        if method not in ALLOWED_METHODS:
            raise _Refused(405, "method not allowed through the hub API relay")
        if upgrade:
            raise _Refused(403, "protocol upgrades are not allowed through the hub API relay")
        why = target_problem(target, self.policy.api_prefix)
        if why:
            raise _Refused(403, f"only the hub API is reachable through this relay ({why})")
        cap = self.policy.max_body
        if cap and length is not None and length > cap:
            raise _Refused(413, "request body too large")
        self._body = _Body(length, chunked, cap) if (chunked or length) else None
        self._sent.append(method)
        self.requests += 1
        return b"\r\n".join(kept) + b"\r\n\r\n"

    # hub -> client --------------------------------------------------------------------------
    def from_hub(self, data: bytes) -> None:
        """Observe bytes the hub sent (the caller passes them to the client unchanged)."""
        if not self.tracking:
            return
        self._rbuf += data
        try:
            while self._rbuf and self.tracking:
                if self._rbody is not None:
                    n = self._rbody.consume(self._rbuf)
                    del self._rbuf[:n]
                    if not self._rbody.done:
                        break
                    self._rbody = None
                    self.responses += 1
                    continue
                if not self._response_head():
                    break
        except _Refused:
            self.tracking = False
        if not self.tracking:
            self._rbuf.clear()

    def _response_head(self) -> bool:
        end = self._rbuf.find(b"\r\n\r\n")
        if end < 0:
            if len(self._rbuf) > MAX_RESPONSE_HEAD or not b"HTTP/".startswith(bytes(self._rbuf[:5])):
                self.tracking = False
            return False
        lines = bytes(self._rbuf[:end]).split(b"\r\n")
        del self._rbuf[: end + 4]
        status_parts = lines[0].split(b" ", 2)
        if len(status_parts) < 2 or not _VERSION.fullmatch(status_parts[0]) or not status_parts[1].isdigit():
            self.tracking = False
            return False
        status = int(status_parts[1])
        if 100 <= status < 200:
            if status == 101:
                self.tracking = False
            return True  # interim response: the final one follows
        if not self._sent:
            self.tracking = False  # a response to nothing we sent
            return False
        method = self._sent.popleft()
        length: int | None = None
        chunked = False
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            key, value = header_key(name.strip()), value.strip()
            if key == b"content-length" and _DIGITS.fullmatch(value):
                length = int(value)
            elif key == b"transfer-encoding":
                chunked = value.lower().split(b",")[-1].strip() == b"chunked"
                if not chunked:
                    self.tracking = False
        if method == b"HEAD" or status in (204, 304):
            self.responses += 1
            return True
        if not chunked and length is None:
            self.tracking = False  # delimited by the hub closing the connection
            return False
        body = _Body(length, chunked, trailers=True)
        if body.done:
            self.responses += 1
        else:
            self._rbody = body
        return True

    @property
    def outstanding(self) -> int:
        """Forwarded requests whose response has not been passed on completely yet."""
        return len(self._sent) + (1 if self._rbody is not None else 0)

    # the refusal ----------------------------------------------------------------------------
    def can_answer(self) -> bool:
        """Refused, and every earlier response is complete: :meth:`answer` may be written now."""
        if self.denial is None or not self.tracking:
            return False
        return self.outstanding <= (1 if self.denial.abort else 0)

    def answer(self) -> bytes:
        """The HTTP response for :attr:`denial` (the connection closes after it)."""
        assert self.denial is not None
        d = self.denial
        body = f"hub API relay: {d.reason}\n".encode()
        extra = f"Retry-After: {max(1, math.ceil(d.retry_after))}\r\n" if d.retry_after is not None else ""
        return (
            f"HTTP/1.1 {d.status} {REASONS.get(d.status, 'Refused')}\r\n"
            "Content-Type: text/plain; charset=utf-8\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\nCache-Control: no-store\r\n"
            f"{extra}\r\n"
        ).encode() + body
