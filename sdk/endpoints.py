"""Network endpoints as capability resources: `net/HOST:PORT`, the resource of `net.connect`.

A rule names what an agent may reach through the kernel's egress proxy
(kernel/doors/egress.py); a request names the one endpoint it asks for. HOST is

- a DNS name, lowercase ASCII (`api.example.org`): that name only, not its subdomains;
- `*.DOMAIN` (rules only): every name under DOMAIN, not DOMAIN itself;
- an IP address (`203.0.113.7`, `[2001:db8::1]`), or in rules a network in CIDR form
  (`10.0.0.0/8`, `[fd00::/8]`): those addresses, and the only way to grant a private,
  loopback or link-local one (see `explicit_ip`);
- `*` (rules only): any host;

and PORT is a number, or `*` in rules for any port. A name whose last label is all digits is
refused (`2130706433`, `0x7f.1` are IPv4 in disguise to a resolver); so is anything not in
its one canonical form, so that one endpoint has one spelling in every token.
`covers(rule, other)` is the subset test the rule algebra needs (sdk/tokens.py,
kernel/access/rules.py): whether every endpoint `other` allows is allowed by `rule`.
"""

from __future__ import annotations

import ipaddress
import re

PREFIX = "net/"
_LABEL_RE = re.compile(r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?")

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def resource(host: str, port: int | str) -> str:
    """The request resource of a connection to `host` (canonical) on `port` (or `*`: any)."""
    return f"{PREFIX}[{host}]:{port}" if ":" in host else f"{PREFIX}{host}:{port}"


def split(text: str) -> tuple[str, str]:
    """`HOST:PORT` -> (host, port), brackets of an IPv6 host removed; ValueError if no port."""
    if text.startswith("["):
        host, sep, port = text[1:].partition("]:")
        if not sep:
            raise ValueError("an IPv6 host is written [ADDRESS]:PORT")
        return host, port
    host, sep, port = text.rpartition(":")
    if not sep or not host:
        raise ValueError("an endpoint is written HOST:PORT")
    return host, port


def canonical_host(host: str) -> str:
    """A host as a client sent it, in canonical form: lowercase, no trailing dot, an IP
    address in its standard spelling. ValueError if it is neither a name nor an address."""
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        pass
    name = host.lower().removesuffix(".")
    problem = _name_problem(name)
    if problem:
        raise ValueError(problem)
    return name


def _name_problem(name: str) -> str | None:
    if not name.isascii() or len(name) > 253:
        return f"{name[:64]!r} is not an ASCII DNS name of at most 253 characters"
    labels = name.split(".")
    if not all(_LABEL_RE.fullmatch(label) for label in labels):
        return f"{name!r} is not a DNS name (labels of a-z, 0-9, '-', '_')"
    if labels[-1].isdigit():
        return f"{name!r} ends in a numeric label: write an IP address as one"
    return None


def _network(host: str) -> Network | None:
    """The network an IP host (an address, or in rules a CIDR network) stands for."""
    try:
        return ipaddress.ip_network(host, strict=True)
    except ValueError:
        return None


def problem(text: str, *, pattern: bool) -> str | None:
    """Why `text` (after `net/`) is not a well-formed endpoint (a rule's when `pattern`)."""
    try:
        host, port = split(text)
    except ValueError as exc:
        return str(exc)
    if not (port == "*" and pattern) and not (
            port.isdigit() and str(int(port)) == port and 0 < int(port) < 65536):
        return f"port {port!r} is not 1..65535" + (" or '*'" if pattern else "")
    if host == "*":
        return None if pattern else "a request names one host"
    net = _network(host)
    if net is not None:
        single = net.num_addresses == 1
        if not pattern and not single:
            return "a request names one address"
        spelled = str(net.network_address) if single and "/" not in host else str(net)
        if host != spelled:
            return f"write the address {host!r} as {spelled!r}"
        if (net.version == 6) != text.startswith("["):
            return "an IPv6 host is written [ADDRESS]:PORT, an IPv4 one without brackets"
        return None
    if "/" in host:
        try:
            return f"write the network as {ipaddress.ip_network(host, strict=False)}"
        except ValueError:
            return f"{host!r} is not a network in CIDR form"
    if text.startswith("["):
        return f"{host!r} is not an IPv6 address"
    name = host[2:] if pattern and host.startswith("*.") else host
    return _name_problem(name)


def _host_covers(rule: str, other: str) -> bool:
    if rule == "*":
        return True
    rule_net = _network(rule)
    if rule_net is not None:
        other_net = _network(other)
        return (other_net is not None and other_net.version == rule_net.version
                and other_net.subnet_of(rule_net))  # type: ignore[arg-type]
    if rule.startswith("*."):
        # `*.a.org` covers `b.a.org`, `*.b.a.org` and `*.a.org`, never `a.org` nor an address
        return other.endswith(rule[1:]) and _network(other) is None
    return other == rule


def covers(rule: str, other: str) -> bool:
    """Whether every endpoint `other` (after `net/`, a rule's or a request's) allows is
    allowed by `rule`. Both are well formed (`problem` found nothing)."""
    rule_host, rule_port = split(rule)
    other_host, other_port = split(other)
    if rule_port != "*" and rule_port != other_port:
        return False
    return _host_covers(rule_host, other_host)


def explicit_ip(rule: str, address: ipaddress.IPv4Address | ipaddress.IPv6Address,
                port: int) -> bool:
    """Whether `rule` (after `net/`) names `address` by IP (an address or a network holding
    it) on `port`: what a private, loopback or link-local address needs, beyond a name or `*`
    that happens to resolve to it."""
    host, rule_port = split(rule)
    net = _network(host)
    return (net is not None and net.version == address.version and address in net
            and rule_port in ("*", str(port)))


_NAT64 = ipaddress.ip_network("64:ff9b::/96")


def public(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """Whether `address` is a global unicast one that a name or `*` may reach: not loopback,
    private, link-local, shared (CGNAT), reserved or multicast, nor such an IPv4 address
    wrapped in IPv6 (mapped, 6to4, NAT64)."""
    if not address.is_global or address.is_multicast:
        return False
    if isinstance(address, ipaddress.IPv6Address):
        inner = address.ipv4_mapped or address.sixtofour
        if inner is None and address in _NAT64:
            inner = ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
        if inner is not None:
            return public(inner)
    return True
