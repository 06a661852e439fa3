"""Fetching a request's http(s) URL (``sdengine serve --allow-url-fetch``) without letting a client use the server
as a probe of its network or stall it: one total deadline for the whole fetch (name lookup, connect, headers,
body), a size cap, addresses that are not public (private, loopback, link-local, multicast, reserved) refused
unless ``allow_private`` (``--allow-private-urls``), checked on the address actually connected to (no DNS
rebinding between the check and the connect) and again on every redirect; and one error message for every
network failure (refused, closed, reset, timed out, no such name, an HTTP error status), so that the answer does
not tell which ports or hosts are reachable from the server. The real cause goes to the log.

Standard library only (core/).
"""

from __future__ import annotations

import http.client
import ipaddress
import logging
import socket
import ssl
import threading
import time
from dataclasses import dataclass
from urllib.parse import urljoin, urlsplit

log = logging.getLogger(__name__)

FETCH_DEADLINE_S = 15.0  # the whole fetch, redirects included
MAX_REDIRECTS = 3
_CHUNK = 64 * 1024


class FetchRefused(ValueError):
    """A URL this server will not fetch or could not fetch; ``str()`` is safe to show to the client."""


@dataclass(frozen=True)
class UrlPolicy:
    """How request URLs are fetched: ``deadline`` seconds in all, ``allow_private``: also non-public addresses."""

    deadline: float = FETCH_DEADLINE_S
    allow_private: bool = False


UNREACHABLE = "the URL could not be fetched (no complete answer within {deadline:g} s)"
PRIVATE = ("the URL names a private, loopback or link-local address, which this server does not fetch "
           "(sdengine serve --allow-private-urls allows it)")


def is_public(address: str) -> bool:
    """Whether ``address`` (an IP literal) is a public unicast address (IPv4-mapped IPv6 judged as its IPv4)."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_global and not (ip.is_multicast or ip.is_reserved or ip.is_link_local or ip.is_loopback
                                 or ip.is_private or ip.is_unspecified)


class _Deadline:
    """Seconds left of one fetch; :meth:`guard` shuts a socket down when they run out (a server trickling bytes
    never trips a per-read timeout)."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        left = self.end - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"deadline of {self.seconds:g} s passed")
        return left

    def guard(self, sock: socket.socket) -> threading.Timer:
        def cut():
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

        timer = threading.Timer(max(self.end - time.monotonic(), 0.0), cut)
        timer.daemon = True
        timer.start()
        return timer


def _connect(host: str, port: int, policy: UrlPolicy, deadline: _Deadline) -> socket.socket:
    """A socket connected to an address of ``host`` the policy allows (every resolved address is checked)."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    if not policy.allow_private and not all(is_public(info[4][0]) for info in infos):
        raise FetchRefused(PRIVATE)
    last: Exception | None = None
    for family, kind, proto, _, address in infos:
        sock = socket.socket(family, kind, proto)
        try:
            sock.settimeout(deadline.left())
            sock.connect(address)
            return sock
        except OSError as exc:
            sock.close()
            last = exc
    raise last or OSError("no address")


def _request(url: str, policy: UrlPolicy, deadline: _Deadline, max_bytes: int) -> tuple[int, str | None, bytes]:
    """(status, Location, body) of one GET, the body cut at ``max_bytes + 1`` bytes."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https") or not parts.hostname:
        raise FetchRefused("only http(s) URLs with a host name are fetched")
    port = parts.port or (443 if scheme == "https" else 80)
    sock = _connect(parts.hostname, port, policy, deadline)
    timer = deadline.guard(sock)
    try:
        if scheme == "https":
            sock = ssl.create_default_context().wrap_socket(sock, server_hostname=parts.hostname)
        conn = http.client.HTTPConnection(parts.hostname, port, timeout=deadline.left())
        conn.sock = sock  # already connected to the checked address
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        conn.request("GET", path, headers={"User-Agent": "sdengine", "Accept": "image/*", "Connection": "close"})
        resp = conn.getresponse()
        location = resp.getheader("location")
        body = bytearray()
        while len(body) <= max_bytes:
            sock.settimeout(deadline.left())
            chunk = resp.read1(_CHUNK)
            if not chunk:
                break
            body += chunk
        deadline.left()  # a shut-down socket reads as the end: only the clock tells
        return resp.status, location, bytes(body[: max_bytes + 1])
    finally:
        timer.cancel()
        sock.close()


def fetch(url: str, max_bytes: int, policy: UrlPolicy = UrlPolicy()) -> bytes:
    """The body of ``url`` (at most ``max_bytes + 1`` bytes: the caller checks the size), following at most
    :data:`MAX_REDIRECTS` redirects, each checked by ``policy``. Raises :class:`FetchRefused` with a message safe
    to show: :data:`PRIVATE`, or the same :data:`UNREACHABLE` text for every network failure."""
    deadline = _Deadline(policy.deadline)
    try:
        for _ in range(MAX_REDIRECTS + 1):
            status, location, body = _request(url, policy, deadline, max_bytes)
            if status in (301, 302, 303, 307, 308) and location:
                url = urljoin(url, location)
                continue
            if status != 200:
                raise OSError(f"HTTP status {status}")
            return body
        raise OSError(f"more than {MAX_REDIRECTS} redirects")
    except FetchRefused:
        raise
    except (OSError, ValueError, http.client.HTTPException) as exc:  # TimeoutError, ssl.SSLError are OSErrors
        log.info("fetching a request URL failed: %s: %s", type(exc).__name__, exc)
        raise FetchRefused(UNREACHABLE.format(deadline=policy.deadline)) from None
