"""SSRF safety: which addresses the crawler may connect to.

Two checks together keep the crawler away from internal addresses:

* `AddressPolicy.check_host` for hosts written as IP literals (aiohttp never calls the resolver for
  those) and for the reserved `localhost` names, done by the fetcher before every request;
* `GuardedResolver`, which aiohttp calls at connect time for every other host name. aiohttp connects
  to exactly the addresses the resolver returns, so checking them there also defeats DNS rebinding.
"""

from __future__ import annotations

import ipaddress
import re
import socket
import unicodedata
from collections.abc import Iterable
from urllib.parse import unquote

from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import DefaultResolver

from llmo.core.logging import get_logger

log = get_logger(__name__)

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

_METADATA = frozenset(
    {
        ipaddress.ip_address("169.254.169.254"),  # AWS, GCP, Azure, OpenStack
        ipaddress.ip_address("fd00:ec2::254"),  # AWS over IPv6
        ipaddress.ip_address("100.100.100.200"),  # Alibaba Cloud
    }
)
_SHARED = ipaddress.ip_network("100.64.0.0/10")
_DOCUMENTATION = tuple(
    ipaddress.ip_network(n) for n in ("192.0.2.0/24", "198.51.100.0/24", "203.0.113.0/24", "2001:db8::/32")
)
_PRIVATE = tuple(
    ipaddress.ip_network(n) for n in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "fc00::/7")
)
_THIS_NETWORK = ipaddress.ip_network("0.0.0.0/8")
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_IPV4_COMPATIBLE = ipaddress.ip_network("::/96")
# Hex, octal and decimal IPv4 forms only use these characters; anything else is a host name.
_LEGACY_IPV4 = re.compile(r"^[0-9a-fx.]+$", re.IGNORECASE)
_DOTS = str.maketrans({"\u3002": ".", "\uff61": ".", "\uff0e": "."})


class BlockedAddress(OSError):
    """A host or one of its addresses is refused by the address policy.

    It is an OSError so that aiohttp wraps it, like any resolver failure, in ClientConnectorError.
    """

    def __init__(self, host: str, address: str, reason: str) -> None:
        super().__init__(f"refused to connect to {host} ({address}): {reason}")
        self.host = host
        self.address = address
        self.reason = reason


def literal_ip(host: str) -> IPAddress | None:
    """Parse `host` as any literal form of an IP address a URL can carry; None for a host name.

    Accepts dotted quads, the legacy forms socket.inet_aton takes (`2130706433`, `0x7f000001`,
    `0177.0.0.1`, `127.1`), bracketed IPv6, IPv4-mapped IPv6 and IPv6 with a zone id
    (`fe80::1%eth0`, `fe80::1%25eth0`).
    """
    # IDNA maps full-width digits and ideographic dots to ASCII before a name is looked up.
    text = unicodedata.normalize("NFKC", unquote(host.strip())).lower().translate(_DOTS)
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    if not text:
        return None
    if ":" in text:
        try:
            return ipaddress.IPv6Address(text)
        except ValueError:
            return None
    text = text.removesuffix(".")
    if not _LEGACY_IPV4.match(text) or text.startswith(".") or ".." in text:
        return None
    try:
        return ipaddress.IPv4Address(socket.inet_aton(text))
    except OSError:
        return None


def is_localhost_name(host: str) -> bool:
    """True for `localhost` and its subdomains (RFC 6761: they always mean the loopback interface)."""
    name = host.strip().lower().removesuffix(".")
    return name == "localhost" or name.endswith(".localhost")


def _without_scope(ip: IPAddress) -> IPAddress:
    if isinstance(ip, ipaddress.IPv6Address) and ip.scope_id:
        return ipaddress.IPv6Address(int(ip))
    return ip


def _embedded_ipv4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address a packet to `ip` may end up at (NAT64, 6to4, IPv4-compatible forms)."""
    if ip in _NAT64 or (ip in _IPV4_COMPATIBLE and int(ip) > 0xFFFF):
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return ip.sixtofour


class AddressPolicy:
    """Decides which IP addresses and host names the crawler may connect to.

    Everything that is not globally routable is refused unless allowlisted. `allow` entries are
    CIDR networks (`127.0.0.0/8`), single IPs, or exact host names (compared lower-case).
    """

    def __init__(self, allow: Iterable[str] = ()) -> None:
        self._networks: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
        self._hosts: set[str] = set()
        for entry in allow:
            item = entry.strip()
            if not item:
                continue
            try:
                self._networks.append(ipaddress.ip_network(item, strict=False))
            except ValueError:
                self._hosts.add(item.lower().removesuffix("."))

    def host_allowed(self, host: str) -> bool:
        """True when `host` is allowlisted by name."""
        return host.strip().lower().removesuffix(".") in self._hosts

    def address_allowed(self, ip: IPAddress) -> bool:
        """True when `ip` falls in an allowlisted network."""
        plain = _without_scope(ip)
        return any(plain.version == net.version and plain in net for net in self._networks)

    def check(self, ip: IPAddress) -> str | None:
        """The reason `ip` is refused, or None when the crawler may connect to it."""
        ip = _without_scope(ip)
        if self.address_allowed(ip):
            return None
        if isinstance(ip, ipaddress.IPv6Address):
            if ip.ipv4_mapped is not None:
                return self.check(ip.ipv4_mapped)
            embedded = _embedded_ipv4(ip)
            if embedded is not None and self.check(embedded) is not None:
                return "ipv4_mapped"
        return _reason(ip)

    def check_host(self, host: str) -> tuple[str, str] | None:
        """(address, reason) when a URL host is refused before any lookup, else None.

        Covers IP literals in every form and the `localhost` names; other names are left to the
        resolver.
        """
        if self.host_allowed(host):
            return None
        ip = literal_ip(host)
        if ip is not None:
            reason = self.check(ip)
            return (str(ip), reason) if reason else None
        if is_localhost_name(host):
            return ("127.0.0.1", "loopback")
        return None


def _reason(ip: IPAddress) -> str | None:
    """Classify an address that is not allowlisted (IPv4-mapped forms already unwrapped)."""
    if ip in _METADATA:
        return "metadata"
    if ip.is_unspecified or (isinstance(ip, ipaddress.IPv4Address) and ip in _THIS_NETWORK):
        return "unspecified"
    if ip.is_loopback:
        return "loopback"
    if ip.is_link_local:
        return "link_local"
    if ip.is_multicast:
        return "multicast"
    if isinstance(ip, ipaddress.IPv4Address) and ip in _SHARED:
        return "shared"
    if any(ip.version == net.version and ip in net for net in _DOCUMENTATION):
        return "documentation"
    if any(ip.version == net.version and ip in net for net in _PRIVATE):
        return "private"
    if not ip.is_global or ip.is_reserved:
        return "reserved"
    return None


DEFAULT_POLICY = AddressPolicy()


class GuardedResolver(AbstractResolver):
    """An aiohttp resolver that refuses host names resolving to any address the policy refuses.

    Nothing is dropped silently: one refused address among the answers refuses the whole host, so a
    rebinding name that mixes a public and an internal address cannot slip through.
    """

    def __init__(self, policy: AddressPolicy = DEFAULT_POLICY, inner: AbstractResolver | None = None) -> None:
        self._policy = policy
        self._inner = inner if inner is not None else DefaultResolver()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        """Resolve `host` with the wrapped resolver, then check every answer."""
        refused = self._policy.check_host(host)
        if refused is not None:
            raise BlockedAddress(host, refused[0], refused[1])
        results = await self._inner.resolve(host, port, family)
        if not results:
            raise BlockedAddress(host, "", "unresolvable")
        if self._policy.host_allowed(host):
            return results
        for result in results:
            ip = literal_ip(result["host"])
            if ip is None:
                raise BlockedAddress(host, result["host"], "unresolvable")
            reason = self._policy.check(ip)
            if reason is not None:
                log.info("ssrf_blocked", host=host, address=str(ip), reason=reason)
                raise BlockedAddress(host, str(ip), reason)
        return results

    async def close(self) -> None:
        """Close the wrapped resolver."""
        await self._inner.close()


def ssrf_address_forms() -> list[tuple[str, str]]:
    """Hostile URL forms the crawler must refuse, as (url, description) pairs.

    Every entry is a literal address or a `localhost` name, so checking them needs no DNS.
    """
    forms: list[tuple[str, str]] = [
        # loopback in every IPv4 spelling
        ("http://127.0.0.1/", "loopback dotted quad"),
        ("http://127.0.0.1:8080/admin", "loopback with port"),
        ("http://127.1/", "loopback short form"),
        ("http://127.0.1/", "loopback three-part form"),
        ("http://2130706433/", "loopback as decimal integer"),
        ("http://0x7f000001/", "loopback as hex integer"),
        ("http://0x7F.0.0.1/", "loopback hex first octet"),
        ("http://0x7f.0x00.0x00.0x01/", "loopback hex octets"),
        ("http://0177.0.0.1/", "loopback octal first octet"),
        ("http://0177.0000.0000.0001/", "loopback octal octets"),
        ("http://017700000001/", "loopback as octal integer"),
        ("http://127.000.000.001/", "loopback zero-padded"),
        ("http://127.255.255.254/", "loopback end of 127/8"),
        ("http://127.0.0.1./", "loopback with trailing dot"),
        ("http://%31%32%37.0.0.1/", "loopback percent-encoded"),
        ("http://\uff11\uff12\uff17.\uff10.\uff10.\uff11/", "loopback in full-width digits"),
        ("http://user:pass@127.0.0.1/", "loopback behind userinfo"),
        ("http://example.com@127.0.0.1/", "loopback behind a host-like userinfo"),
        ("http://127.0.0.1#@example.com/", "loopback with fragment trick"),
        ("https://127.0.0.1/", "loopback over https"),
        # localhost names
        ("http://localhost/", "localhost name"),
        ("http://localhost./", "localhost with trailing dot"),
        ("http://LOCALHOST/", "localhost upper case"),
        ("http://app.localhost/", "subdomain of localhost"),
        # private networks
        ("http://10.0.0.1/", "RFC 1918 10/8"),
        ("http://10.255.255.255/", "RFC 1918 10/8 upper end"),
        ("http://167772161/", "10.0.0.1 as decimal"),
        ("http://0xa000001/", "10.0.0.1 as hex"),
        ("http://012.0.0.1/", "10.0.0.1 octal first octet"),
        ("http://10.1/", "10.0.0.1 short form"),
        ("http://172.16.0.1/", "RFC 1918 172.16/12"),
        ("http://172.31.255.254/", "RFC 1918 172.16/12 upper end"),
        ("http://192.168.0.1/", "RFC 1918 192.168/16"),
        ("http://192.168.1.1:443/", "home router"),
        ("http://3232235777/", "192.168.1.1 as decimal"),
        ("http://0xc0a80101/", "192.168.1.1 as hex"),
        # cloud metadata
        ("http://169.254.169.254/latest/meta-data/", "cloud metadata"),
        ("http://2852039166/latest/meta-data/", "cloud metadata as decimal"),
        ("http://0xa9fea9fe/latest/meta-data/", "cloud metadata as hex"),
        ("http://0251.0376.0251.0376/latest/meta-data/", "cloud metadata as octal"),
        ("http://169.254.43518/", "cloud metadata two-part form"),
        ("http://[fd00:ec2::254]/latest/meta-data/", "AWS IPv6 metadata"),
        ("http://100.100.100.200/latest/meta-data/", "Alibaba metadata"),
        ("http://[::ffff:169.254.169.254]/", "cloud metadata IPv4-mapped"),
        ("http://169.254.0.1/", "link-local IPv4"),
        # unspecified, shared, reserved, documentation, broadcast, multicast
        ("http://0.0.0.0/", "unspecified IPv4"),
        ("http://0/", "unspecified as integer"),
        ("http://0.0.0.1/", "this-network 0/8"),
        ("http://100.64.0.1/", "carrier-grade NAT shared space"),
        ("http://192.0.2.1/", "documentation TEST-NET-1"),
        ("http://198.18.0.1/", "benchmarking range"),
        ("http://240.0.0.1/", "reserved class E"),
        ("http://255.255.255.255/", "limited broadcast"),
        ("http://224.0.0.1/", "IPv4 multicast"),
        # IPv6
        ("http://[::1]/", "IPv6 loopback"),
        ("http://[0:0:0:0:0:0:0:1]/", "IPv6 loopback long form"),
        ("http://[::]/", "IPv6 unspecified"),
        ("http://[fe80::1]/", "IPv6 link-local"),
        ("http://[fe80::1%25eth0]/", "IPv6 link-local with zone id"),
        ("http://[ff02::1]/", "IPv6 multicast"),
        ("http://[fc00::1]/", "IPv6 unique local"),
        ("http://[fd12:3456:789a::1]/", "IPv6 unique local fd00::/8"),
        ("http://[2001:db8::1]/", "IPv6 documentation"),
        ("http://[::ffff:127.0.0.1]/", "IPv4-mapped loopback"),
        ("http://[::ffff:7f00:1]/", "IPv4-mapped loopback hex form"),
        ("http://[::ffff:10.0.0.1]/", "IPv4-mapped private"),
        ("http://[::127.0.0.1]/", "IPv4-compatible loopback"),
        ("http://[64:ff9b::7f00:1]/", "NAT64 of loopback"),
        ("http://[2002:7f00:1::]/", "6to4 of loopback"),
        ("http://[::ffff:127.0.0.1]:8080/", "IPv4-mapped loopback with port"),
    ]
    return forms
