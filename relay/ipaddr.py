"""Client IP addresses: parsed once, the same way everywhere."""

from __future__ import annotations

import ipaddress

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

LOOPBACK_NETWORKS: tuple[IPNetwork, ...] = (
    ipaddress.ip_network("127.0.0.0/8"),
    ipaddress.ip_network("::1/128"),
)


def client_ip(text: str) -> IPAddress | None:
    """The client address `text` names, or None if it is not an IP address.

    An IPv4-mapped IPv6 address (::ffff:192.0.2.1, as a dual-stack socket reports an
    IPv4 peer) is the IPv4 client it stands for: allowlists, caps and limit buckets must
    not count it as another client.
    """
    try:
        ip: IPAddress = ipaddress.ip_address(text.strip())
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def in_networks(address: str, networks: tuple[IPNetwork, ...]) -> bool:
    ip = client_ip(address)
    return ip is not None and any(ip in net for net in networks)


# Addresses that name a host inside an organisation, never one on the Internet: RFC 1918,
# RFC 6598 shared address space, loopback, link-local (RFC 3927, RFC 4291), and IPv6
# unique local addresses (RFC 4193).
INTERNAL_NETWORKS: tuple[IPNetwork, ...] = (
    *LOOPBACK_NETWORKS,
    *(ipaddress.ip_network(n) for n in (
        "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10", "169.254.0.0/16",
        "fc00::/7", "fe80::/10",
    )),
)
