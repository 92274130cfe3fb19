"""[dns], [spf], [dkim], [dmarc], [ratelimit], [authentication_results]: the checks' settings."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from relay.checks import dkim as dkimlib
from relay.checks.dns import DnsSettings
from relay.schema import Table, parse_hostport

SpfMode = Literal["client", "egress"]


@dataclass(frozen=True, slots=True)
class CheckSettings:
    """[dns], [spf], [dkim], [dmarc], [ratelimit] and the Authentication-Results authserv-id."""

    dns: DnsSettings = field(default_factory=DnsSettings)
    # RFC 8601 section 2.5; "" = the relay's hostname.
    authserv_id: str = ""
    spf_mode: SpfMode = "client"
    spf_egress_addresses: tuple[str, ...] = ()
    spf_timeout: float = 20.0
    # Concurrent SPF evaluations (pyspf is synchronous: one thread each). Each is bounded
    # by spf_timeout, so senders with dead DNS hold at most this many threads for at most
    # that long; everyone else's SPF runs beside them.
    spf_max_concurrent: int = 64
    dmarc_timeout: float = 5.0
    dkim_verify_timeout: float = 10.0
    dkim_sign_headers: tuple[str, ...] = dkimlib.DEFAULT_SIGNED_HEADERS
    dkim_keys: tuple[dkimlib.SigningKey, ...] = field(default=(), repr=False)
    redis_url: str = ""
    redis_key_prefix: str = "policy-relay:"
    redis_timeout: float = 0.25
    on_backend_error: Literal["local", "tempfail", "allow"] = "local"

    def signing_keys(self, domain: str) -> tuple[dkimlib.SigningKey, ...]:
        domain = domain.lower().rstrip(".")
        return tuple(k for k in self.dkim_keys if k.domain == domain)


def read_check_settings(root: Table) -> CheckSettings:
    base = CheckSettings()
    dns_table = root.table("dns")
    nameservers = []
    for item in dns_table.strings("nameservers", ()):
        try:
            nameservers.append(parse_hostport(item, default_port=53))
        except ValueError:
            dns_table.error("nameservers", f'expected "ADDRESS" or "ADDRESS:PORT", got {item!r}')
    dns = DnsSettings(
        nameservers=tuple(nameservers),
        timeout=dns_table.duration("timeout", base.dns.timeout, low=0.05),
        attempts=dns_table.integer("attempts", base.dns.attempts, 1, 10),
    )
    dns_table.finish()

    spf = root.table("spf")
    mode = spf.string("mode", base.spf_mode, ("client", "egress"))
    egress = spf.strings("egress_addresses", ())
    if mode == "egress" and not egress:
        spf.error("egress_addresses", 'must name the egress address(es) when mode = "egress"')
    spf_timeout = spf.duration("timeout", base.spf_timeout, low=0.1)
    spf_max_concurrent = spf.integer("max_concurrent", base.spf_max_concurrent, 1, 1024)
    spf.finish()

    dmarc = root.table("dmarc")
    dmarc_timeout = dmarc.duration("timeout", base.dmarc_timeout, low=0.1)
    dmarc.finish()

    dkim = root.table("dkim")
    verify_timeout = dkim.duration("verify_timeout", base.dkim_verify_timeout, low=0.1)
    headers = dkim.strings("sign_headers", base.dkim_sign_headers)
    unsignable = sorted({h.strip().lower() for h in headers} & dkimlib.NEVER_SIGNED)
    if unsignable:
        # Checked here, not at signing time: a 451 for every message would never heal.
        dkim.error("sign_headers", f"must not be signed: {', '.join(unsignable)}")
    keys = _read_dkim_keys(dkim)
    dkim.finish()

    limits = root.table("ratelimit")
    results = root.table("authentication_results")
    settings = CheckSettings(
        dns=dns,
        authserv_id=results.string("authserv_id", ""),
        spf_mode=mode,  # type: ignore[arg-type]
        spf_egress_addresses=egress,
        spf_timeout=spf_timeout,
        spf_max_concurrent=spf_max_concurrent,
        dmarc_timeout=dmarc_timeout,
        dkim_verify_timeout=verify_timeout,
        dkim_sign_headers=headers,
        dkim_keys=keys,
        redis_url=limits.string("redis_url", base.redis_url),
        redis_key_prefix=limits.string("key_prefix", base.redis_key_prefix),
        redis_timeout=limits.duration("redis_timeout", base.redis_timeout, low=0.01),
        on_backend_error=limits.string(  # type: ignore[arg-type]
            "on_backend_error", base.on_backend_error, ("local", "tempfail", "allow")
        ),
    )
    limits.finish()
    results.finish()
    return settings


def _read_dkim_keys(dkim: Table) -> tuple[dkimlib.SigningKey, ...]:
    """Keys from [[dkim.key]] entries and from key_directory/<domain>/<selector>.key."""
    keys: list[dkimlib.SigningKey] = []
    directory = dkim.string("key_directory", "")
    if directory:
        base = Path(directory)
        if not base.is_dir():
            dkim.error("key_directory", f"not a directory: {directory}")
        else:
            for path in sorted(base.glob("*/*.key")):
                try:
                    keys.append(dkimlib.load_key(path, path.parent.name.lower(), path.stem))
                except ValueError as exc:
                    dkim.error("key_directory", str(exc))
    for table in dkim.table_list("key"):
        domain = table.string("domain", "").lower()
        selector = table.string("selector", "")
        key_file = table.string("key_file", "")
        for name, value in (("domain", domain), ("selector", selector), ("key_file", key_file)):
            if not value:
                table.error(name, "required")
        if domain and selector and key_file:
            try:
                keys.append(dkimlib.load_key(key_file, domain, selector))
            except ValueError as exc:
                table.error("key_file", str(exc))
        table.finish()
    return tuple(keys)
