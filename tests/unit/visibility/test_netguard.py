"""SSRF guard: literal parsing, the address policy and the resolver that guards host names."""

from __future__ import annotations

import ipaddress
import socket
from urllib.parse import urlsplit

import pytest
from aiohttp.abc import AbstractResolver, ResolveResult

from llmo.visibility.netguard import (
    DEFAULT_POLICY,
    AddressPolicy,
    BlockedAddress,
    GuardedResolver,
    literal_ip,
    ssrf_address_forms,
)


class FakeResolver(AbstractResolver):
    """Answers from a table; no DNS traffic."""

    def __init__(self, table: dict[str, list[str]]) -> None:
        self.table = table
        self.calls: list[str] = []

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        self.calls.append(host)
        if host not in self.table:
            raise OSError(f"no such host {host}")
        return [
            ResolveResult(
                hostname=host,
                host=address,
                port=port,
                family=socket.AF_INET6 if ":" in address else socket.AF_INET,
                proto=0,
                flags=0,
            )
            for address in self.table[host]
        ]

    async def close(self) -> None:
        return None


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        ("127.0.0.1", "127.0.0.1"),
        ("2130706433", "127.0.0.1"),
        ("0x7f000001", "127.0.0.1"),
        ("0x7f.0.0.1", "127.0.0.1"),
        ("0177.0.0.1", "127.0.0.1"),
        ("127.1", "127.0.0.1"),
        ("10.1", "10.0.0.1"),
        ("0", "0.0.0.0"),
        ("127.0.0.1.", "127.0.0.1"),
        ("%31%32%37.0.0.1", "127.0.0.1"),
        ("\uff11\uff12\uff17.\uff10.\uff10.\uff11", "127.0.0.1"),
        ("[::1]", "::1"),
        ("::ffff:127.0.0.1", "::ffff:7f00:1"),
        ("[::ffff:7f00:1]", "::ffff:7f00:1"),
        ("2606:4700::1111", "2606:4700::1111"),
    ],
)
def test_literal_ip_parses_every_form(host: str, expected: str) -> None:
    ip = literal_ip(host)
    assert ip is not None
    assert str(ip) == expected


def test_literal_ip_keeps_the_zone_but_reads_the_address() -> None:
    ip = literal_ip("[fe80::1%25eth0]")
    assert isinstance(ip, ipaddress.IPv6Address)
    assert int(ip) == int(ipaddress.IPv6Address("fe80::1"))


@pytest.mark.parametrize(
    "host",
    ["example.com", "deadbeef", "cafe.be", "0x1.com", "1.2.3.4 x", "", "[not-an-ip]", "1..2", "08.0.0.1"],
)
def test_literal_ip_leaves_host_names_alone(host: str) -> None:
    assert literal_ip(host) is None


@pytest.mark.parametrize(
    ("address", "reason"),
    [
        ("127.0.0.1", "loopback"),
        ("10.1.2.3", "private"),
        ("172.16.5.4", "private"),
        ("192.168.1.1", "private"),
        ("169.254.169.254", "metadata"),
        ("fd00:ec2::254", "metadata"),
        ("100.100.100.200", "metadata"),
        ("169.254.1.1", "link_local"),
        ("100.64.0.1", "shared"),
        ("0.0.0.0", "unspecified"),
        ("::", "unspecified"),
        ("224.0.0.1", "multicast"),
        ("ff02::1", "multicast"),
        ("192.0.2.10", "documentation"),
        ("2001:db8::1", "documentation"),
        ("240.0.0.1", "reserved"),
        ("::1", "loopback"),
        ("fe80::1", "link_local"),
        ("fc00::1", "private"),
        ("::ffff:127.0.0.1", "loopback"),
        ("::ffff:169.254.169.254", "metadata"),
        ("64:ff9b::a00:1", "ipv4_mapped"),
    ],
)
def test_policy_refuses_non_global_addresses(address: str, reason: str) -> None:
    assert DEFAULT_POLICY.check(ipaddress.ip_address(address)) == reason


@pytest.mark.parametrize("address", ["93.184.216.34", "8.8.8.8", "2606:4700::1111", "::ffff:8.8.8.8"])
def test_policy_allows_public_addresses(address: str) -> None:
    assert DEFAULT_POLICY.check(ipaddress.ip_address(address)) is None


def test_allowlist_by_network_address_and_name() -> None:
    policy = AddressPolicy(["127.0.0.0/8", "10.0.0.5", "Intranet.Example"])
    assert policy.check(ipaddress.ip_address("127.9.9.9")) is None
    assert policy.check(ipaddress.ip_address("::ffff:127.0.0.1")) is None
    assert policy.check(ipaddress.ip_address("10.0.0.5")) is None
    assert policy.check(ipaddress.ip_address("10.0.0.6")) == "private"
    assert policy.host_allowed("intranet.example")
    assert not policy.host_allowed("other.example")


def test_ssrf_forms_are_broad_and_all_refused_by_the_policy() -> None:
    forms = ssrf_address_forms()
    assert len(forms) >= 40
    assert len({url for url, _ in forms}) == len(forms)
    for url, description in forms:
        host = urlsplit(url).hostname or ""
        assert DEFAULT_POLICY.check_host(host) is not None, (url, description)


async def test_resolver_refuses_localhost() -> None:
    resolver = GuardedResolver(DEFAULT_POLICY)
    with pytest.raises(BlockedAddress) as caught:
        await resolver.resolve("localhost", 80)
    assert caught.value.reason == "loopback"
    await resolver.close()


async def test_resolver_refuses_a_name_resolving_to_an_internal_address() -> None:
    inner = FakeResolver({"rebind.test": ["10.0.0.7"]})
    with pytest.raises(BlockedAddress) as caught:
        await GuardedResolver(DEFAULT_POLICY, inner).resolve("rebind.test", 80)
    assert (caught.value.host, caught.value.address, caught.value.reason) == (
        "rebind.test",
        "10.0.0.7",
        "private",
    )


async def test_resolver_refuses_when_any_answer_is_internal() -> None:
    inner = FakeResolver({"mixed.test": ["93.184.216.34", "169.254.169.254"]})
    with pytest.raises(BlockedAddress) as caught:
        await GuardedResolver(DEFAULT_POLICY, inner).resolve("mixed.test", 443)
    assert caught.value.reason == "metadata"


async def test_resolver_passes_public_answers_through() -> None:
    inner = FakeResolver({"public.test": ["93.184.216.34", "2606:2800:220:1:248:1893:25c8:1946"]})
    results = await GuardedResolver(DEFAULT_POLICY, inner).resolve("public.test", 443)
    assert [r["host"] for r in results] == ["93.184.216.34", "2606:2800:220:1:248:1893:25c8:1946"]


async def test_resolver_honours_allowlisted_names_and_addresses() -> None:
    inner = FakeResolver({"intranet.test": ["10.0.0.7"], "lab.test": ["127.0.0.1"]})
    by_name = GuardedResolver(AddressPolicy(["intranet.test"]), inner)
    assert (await by_name.resolve("intranet.test"))[0]["host"] == "10.0.0.7"
    by_address = GuardedResolver(AddressPolicy(["127.0.0.1"]), inner)
    assert (await by_address.resolve("lab.test"))[0]["host"] == "127.0.0.1"


async def test_resolver_refuses_an_empty_answer() -> None:
    inner = FakeResolver({"empty.test": []})
    with pytest.raises(BlockedAddress) as caught:
        await GuardedResolver(DEFAULT_POLICY, inner).resolve("empty.test")
    assert caught.value.reason == "unresolvable"


def test_blocked_address_is_an_os_error_with_its_fields() -> None:
    error = BlockedAddress("evil.test", "127.0.0.1", "loopback")
    assert isinstance(error, OSError)
    assert "loopback" in str(error)
