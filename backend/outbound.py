"""Which URLs the backend may fetch, decided by the parser that also makes the connection.

Server-side request forgery is refused in three places, all on what is actually sent:

1. `parse_target` reads the URL as `requests` prepares it (urllib3's `parse_url`), so the host that
   is checked is the host that is connected to; a backslash, userinfo (`user@`), whitespace or a
   control character in the authority is refused outright, since parsers disagree on them.
2. `AddressPolicy.check_host`: the host allow-list (`HYBRIDGL_ALLOWED_HOSTS`, `*`: any name).
3. `AddressPolicy.check_address`, called by the connection itself (`guarded_session`) on every
   address it is about to connect to, after its one DNS lookup: loopback, private, link-local,
   unspecified, multicast and reserved addresses are refused unless explicitly allowed
   (`HYBRIDGL_ALLOWED_NETWORKS`, or the address itself in `HYBRIDGL_ALLOWED_HOSTS`), and the cloud
   metadata service only when named exactly. Checking at connect time, on the address used, leaves no
   window for DNS rebinding between a check and the connection.

Label Studio's own origin (LABEL_STUDIO_URL, or a /setup hostname) is trusted by design and is not
subject to 2 and 3: it often lives on a loopback or private address. Its connections are still
checked at connect time against the link-local range, where the cloud metadata and credential
services live and no Label Studio does (`label_studio_policy`): a /setup naming such a host gets
no request sent there.
"""
from __future__ import annotations

import ipaddress
import re
import socket
from dataclasses import dataclass
from typing import Iterable

import requests
from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.exceptions import ConnectTimeoutError, LocationParseError, NameResolutionError, NewConnectionError
from urllib3.util import parse_url

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network

# the cloud instance metadata service (AWS, GCP, Azure, OpenStack; AWS's IPv6 endpoint)
METADATA = (ipaddress.ip_address("169.254.169.254"), ipaddress.ip_address("fd00:ec2::254"))
_BAD_AUTHORITY = re.compile(r"[\\@\s\x00-\x1f\x7f]")


class ForbiddenTarget(Exception):
    """A URL or address the backend refuses to fetch; the message says why and what allows it."""


@dataclass(frozen=True)
class Target:
    """A URL as it will be sent: scheme, host (lower case, no brackets), port and the full URL."""

    url: str
    scheme: str
    host: str
    port: int

    @property
    def origin(self) -> tuple[str, str, int]:
        return self.scheme, self.host, self.port

    def shown(self) -> str:
        """For messages and logs: never the query string (presigned signatures) or fragment."""
        return self.url.split("?")[0].split("#")[0]


def parse_target(url: str) -> Target:
    """The URL `requests` will send, parsed once by urllib3 (the parser that makes the connection)."""
    if not isinstance(url, str) or "://" not in url:
        raise ForbiddenTarget(f"not an absolute http(s) URL: {str(url)[:80]!r}")
    authority = re.split(r"[/?#]", url.split("://", 1)[1], maxsplit=1)[0]
    if _BAD_AUTHORITY.search(authority):
        raise ForbiddenTarget("URL refused: its host part holds a backslash, user info ('@'), whitespace or a "
                              "control character")
    try:
        prepared = requests.Request("GET", url).prepare().url
        parsed = parse_url(prepared)
    except (requests.RequestException, LocationParseError, ValueError, UnicodeError) as exc:
        raise ForbiddenTarget(f"URL refused: it cannot be parsed ({exc.__class__.__name__})") from None
    scheme = (parsed.scheme or "").lower()
    if scheme not in ("http", "https"):
        raise ForbiddenTarget(f"URL scheme {scheme!r} is not allowed (http and https only)")
    if parsed.auth or not parsed.host:
        raise ForbiddenTarget("URL refused: no host, or user info in the URL")
    host = parsed.host.lower().strip("[]")
    return Target(prepared, scheme, host, parsed.port or (443 if scheme == "https" else 80))


def _ip(text: str) -> Address | None:
    try:
        return ipaddress.ip_address(text.split("%")[0])
    except ValueError:
        return None


def is_public(address: Address) -> bool:
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_global and not address.is_multicast


@dataclass(frozen=True)
class AddressPolicy:
    """Hosts (names, or `*`) and non-public networks the backend may fetch images from."""

    hosts: tuple[str, ...] = ()
    networks: tuple[Network, ...] = ()

    @classmethod
    def from_settings(cls, hosts: Iterable[str], networks: Iterable[str]) -> "AddressPolicy":
        """`networks`: CIDRs or single addresses; raises ValueError naming a bad one."""
        parsed = []
        for text in networks:
            try:
                parsed.append(ipaddress.ip_network(text.strip(), strict=False))
            except ValueError:
                raise ValueError(f"{text!r} is not an IP network (e.g. 10.0.0.0/8 or 192.168.1.20)") from None
        return cls(tuple(h.strip().lower().strip("[]") for h in hosts if h.strip()), tuple(parsed))

    def check_host(self, target: Target) -> None:
        if "*" not in self.hosts and target.host not in self.hosts:
            raise ForbiddenTarget(f"images from {target.host} are not allowed (add the host to "
                                  "HYBRIDGL_ALLOWED_HOSTS)")

    def check_address(self, host: str, address: Address) -> None:
        """Refuses a non-public address unless it is explicitly allowed; the metadata service
        only when it is named exactly (a single address), never by a wider network or `*`."""
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        named = _ip(host) == address and host in self.hosts
        if address in METADATA:
            if named or any(n.num_addresses == 1 and address in n for n in self.networks):
                return
            raise ForbiddenTarget(f"{host} is the cloud metadata service ({address}): refused")
        if is_public(address) or named or any(address in n for n in self.networks):
            return
        raise ForbiddenTarget(f"{host} resolves to {address}, a non-public address: refused (allow it with "
                              "HYBRIDGL_ALLOWED_NETWORKS)")


def label_studio_policy(policy: AddressPolicy) -> AddressPolicy:
    """What Label Studio's origin may connect to: any address but link-local ones (169.254.0.0/16,
    fe80::/10: the metadata and credential services), unless `policy` allows them."""
    rest = [*ipaddress.ip_network("0.0.0.0/0").address_exclude(ipaddress.ip_network("169.254.0.0/16")),
            *ipaddress.ip_network("::/0").address_exclude(ipaddress.ip_network("fe80::/10"))]
    return AddressPolicy(policy.hosts, policy.networks + tuple(rest))


class _CheckedConnect:
    """urllib3 connection that resolves its host once, checks every address, and connects only to
    those checked addresses (the policy is a class attribute of the subclasses below)."""

    policy: AddressPolicy

    def _new_conn(self):  # noqa: D401 - urllib3's hook
        try:
            infos = socket.getaddrinfo(self._dns_host, self.port, 0, socket.SOCK_STREAM)
        except socket.gaierror as exc:
            raise NameResolutionError(self.host, self, exc) from exc
        addresses = list(dict.fromkeys(info[4][0] for info in infos))
        for text in addresses:
            self.policy.check_address(self.host.lower().strip("[]"), ipaddress.ip_address(text.split("%")[0]))
        name, last = self._dns_host, None
        try:
            for text in addresses:
                self._dns_host = text  # an address literal: urllib3 resolves nothing more
                try:
                    return super()._new_conn()
                except (NewConnectionError, ConnectTimeoutError) as exc:
                    last = exc
        finally:
            self._dns_host = name
        raise last


def guarded_session(policy: AddressPolicy, trust_env: bool = False) -> requests.Session:
    """A requests session whose every connection is checked by `policy` at connect time. It ignores
    the environment (proxies, .netrc): a proxy would connect on our behalf, unchecked (trust_env:
    Label Studio's, whose proxy is the operator's choice)."""
    http = type("CheckedHTTPConnection", (_CheckedConnect, HTTPConnection), {"policy": policy})
    https = type("CheckedHTTPSConnection", (_CheckedConnect, HTTPSConnection), {"policy": policy})
    pools = {"http": type("CheckedHTTPPool", (HTTPConnectionPool,), {"ConnectionCls": http}),
             "https": type("CheckedHTTPSPool", (HTTPSConnectionPool,), {"ConnectionCls": https})}

    class CheckedAdapter(HTTPAdapter):
        def init_poolmanager(self, *args, **kwargs):
            super().init_poolmanager(*args, **kwargs)
            self.poolmanager.pool_classes_by_scheme = pools

    session = requests.Session()
    session.trust_env = trust_env
    for prefix in ("http://", "https://"):
        session.mount(prefix, CheckedAdapter())
    return session
