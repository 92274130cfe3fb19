"""One resolver for the whole relay: configured nameservers, bounded time, a shared cache."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

import dns.asyncresolver
import dns.exception
import dns.name
import dns.nameserver
import dns.rdata
import dns.rdatatype
import dns.resolver
import dns.reversename


class DnsTempError(Exception):
    """The question could not be answered now (timeout, SERVFAIL, no usable server, ...).

    Distinct from an empty answer: NXDOMAIN and NODATA are facts about the name and come
    back as ``[]``; this is a fact about the network, and callers turn it into a 4xx or a
    ``temperror`` result (RFC 7208 section 2.6.6, RFC 8601 section 2.7.1).
    """


@dataclass(frozen=True, slots=True)
class DnsSettings:
    """How to reach DNS. An empty ``nameservers`` means the system's /etc/resolv.conf."""

    nameservers: tuple[tuple[str, int], ...] = ()
    timeout: float = 5.0  # seconds for one try against one server
    attempts: int = 2  # tries before giving up; the total bound is timeout * attempts
    cache_size: int = 10000

    @property
    def lifetime(self) -> float:
        """Upper bound, in seconds, of one resolution including retries."""
        return self.timeout * max(1, self.attempts)


class Resolver:
    """Answers the relay's DNS questions, asynchronously for the event loop and
    synchronously (thread-safe) for libraries such as pyspf that run in worker threads.

    Both halves use the same nameservers, timeouts and one TTL-respecting LRU cache
    (dnspython's ``LRUCache`` takes a lock, so sharing it between threads is safe).
    Search domains are never applied: every name asked for is absolute.
    """

    def __init__(self, settings: DnsSettings) -> None:
        self.settings = settings
        self._cache = dns.resolver.LRUCache(max_size=max(1, settings.cache_size))
        self._async = dns.asyncresolver.Resolver(configure=not settings.nameservers)
        self._sync = dns.resolver.Resolver(configure=False)
        if settings.nameservers:
            servers: list[str | dns.nameserver.Nameserver] = [
                dns.nameserver.Do53Nameserver(address, port)
                for address, port in settings.nameservers
            ]
            self._async.nameservers = servers
        # The synchronous half copies whatever the asynchronous half ended up with, so a
        # resolv.conf read happens once and both halves agree.
        self._sync.nameservers = list(self._async.nameservers)
        for resolver in (self._async, self._sync):
            resolver.timeout = settings.timeout
            resolver.lifetime = settings.lifetime
            resolver.cache = self._cache
            resolver.search = []
            resolver.use_search_by_default = False

    def __repr__(self) -> str:
        servers = ",".join(str(ns) for ns in self._async.nameservers)
        return f"<Resolver {servers} timeout={self.settings.timeout}s>"

    # -- asynchronous API, for code on the event loop -------------------------------------

    async def query(
        self, name: str | dns.name.Name, rdtype: str, *, lifetime: float | None = None
    ) -> list[dns.rdata.Rdata]:
        """Records of ``rdtype`` at ``name``; ``[]`` for NXDOMAIN or no data.

        ``lifetime`` may only shorten the configured bound: a check passes what remains
        of its own budget, so a lookup never outlives the check that asked for it.
        Raises DnsTempError for anything else (timeout, SERVFAIL, malformed name, ...).
        """
        bound = self._bound(name, rdtype, lifetime)
        try:
            qname = _absolute(name)
            answer = await self._async.resolve(
                qname, rdtype, search=False, raise_on_no_answer=False, lifetime=bound
            )
        except dns.resolver.NXDOMAIN:
            return []
        except dns.exception.DNSException as exc:
            raise DnsTempError(_problem(name, rdtype, exc)) from exc
        return list(answer.rrset) if answer.rrset is not None else []

    def _bound(self, name: object, rdtype: str, lifetime: float | None) -> float:
        bound = self.settings.lifetime
        if lifetime is not None:
            bound = min(lifetime, bound)
        if bound <= 0:
            raise DnsTempError(f"{name} {rdtype}: no time left")
        return bound

    async def txt(self, name: str, *, lifetime: float | None = None) -> list[bytes]:
        """TXT records at ``name``, each one's character-strings joined (RFC 7208
        section 3.3, RFC 6376 section 3.6.2.2: long records are split into strings of at
        most 255 octets that the reader concatenates without separators)."""
        return [_joined(r) for r in await self.query(name, "TXT", lifetime=lifetime)]

    async def a(self, name: str) -> list[str]:
        return [r.to_text() for r in await self.query(name, "A")]

    async def aaaa(self, name: str) -> list[str]:
        return [r.to_text() for r in await self.query(name, "AAAA")]

    async def mx(self, name: str) -> list[tuple[int, str]]:
        """(preference, exchange) pairs, lowest preference first."""
        return sorted(_mx(r) for r in await self.query(name, "MX"))

    async def ptr(self, ip: str) -> list[str]:
        return [_target(r) for r in await self.query(_reverse(ip), "PTR")]

    # -- synchronous API, for library code running in a worker thread ---------------------

    def query_sync(
        self, name: str | dns.name.Name, rdtype: str, *, lifetime: float | None = None
    ) -> list[dns.rdata.Rdata]:
        """Same contract as :meth:`query`, blocking; ``lifetime`` may only shorten the
        configured bound (pyspf passes what remains of its overall query time)."""
        bound = self._bound(name, rdtype, lifetime)
        try:
            qname = _absolute(name)
            answer = self._sync.resolve(
                qname, rdtype, search=False, raise_on_no_answer=False, lifetime=bound
            )
        except dns.resolver.NXDOMAIN:
            return []
        except dns.exception.DNSException as exc:
            raise DnsTempError(_problem(name, rdtype, exc)) from exc
        return list(answer.rrset) if answer.rrset is not None else []

    def txt_sync(self, name: str) -> list[bytes]:
        return [_joined(r) for r in self.query_sync(name, "TXT")]


def _problem(name: object, rdtype: str, exc: dns.exception.DNSException) -> str:
    """What went wrong, without dnspython's text: that names our resolvers' addresses and
    ports ("Server Do53:127.0.0.1@5353 answered ..."), which end up in headers we write."""
    if isinstance(exc, dns.exception.Timeout):
        why = "timed out"
    elif isinstance(exc, dns.resolver.NoNameservers):
        why = "server failure"
    else:
        why = f"lookup error ({type(exc).__name__})"
    return f"{name} {rdtype}: {why}"


def _absolute(name: str | dns.name.Name) -> dns.name.Name:
    if isinstance(name, dns.name.Name):
        return name
    # A relative name would let dnspython append search domains; an absolute one cannot.
    return dns.name.from_text(name, origin=dns.name.root)


def _reverse(ip: str) -> dns.name.Name:
    try:
        return dns.reversename.from_address(str(ipaddress.ip_address(ip)))
    except ValueError as exc:
        raise DnsTempError(f"not an IP address: {ip!r}") from exc


def _joined(rdata: dns.rdata.Rdata) -> bytes:
    strings: tuple[bytes, ...] = rdata.strings  # type: ignore[attr-defined]
    return b"".join(strings)


def _mx(rdata: dns.rdata.Rdata) -> tuple[int, str]:
    preference: int = rdata.preference  # type: ignore[attr-defined]
    exchange: dns.name.Name = rdata.exchange  # type: ignore[attr-defined]
    return preference, exchange.to_text(omit_final_dot=True)


def _target(rdata: dns.rdata.Rdata) -> str:
    target: dns.name.Name = rdata.target  # type: ignore[attr-defined]
    return target.to_text(omit_final_dot=True)
