"""TLS server contexts for the listeners, loaded from certificate files and reloaded in place."""

from __future__ import annotations

import logging
import ssl

log = logging.getLogger("relay.tls")


def server_context(cert_file: str, key_file: str) -> ssl.SSLContext:
    """A server-side context with the certificate chain and key; raises on any problem."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    # RFC 8996: TLS 1.0 and 1.1 are deprecated.
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(cert_file, key_file)
    return context


def load_problem(cert_file: str, key_file: str) -> str | None:
    """Why the pair cannot be used, or None: for the config check at load time."""
    try:
        server_context(cert_file, key_file)
    except (OSError, ssl.SSLError) as exc:
        return str(exc.strerror or exc)
    return None


class ListenerTLS:
    """One listener's context. Reload swaps the certificate inside the same context object,
    so the already-bound implicit-TLS socket and every later STARTTLS use the new one."""

    def __init__(self, cert_file: str, key_file: str) -> None:
        self.cert_file = cert_file
        self.key_file = key_file
        self.context = server_context(cert_file, key_file)

    def reload(self) -> bool:
        # Load into a fresh context first: a bad pair must leave the live one untouched
        # (load_cert_chain could otherwise replace the certificate and then fail on the key).
        problem = load_problem(self.cert_file, self.key_file)
        if problem is not None:
            log.error("TLS reload failed, keeping the old certificate: %s: %s",
                      self.cert_file, problem)
            return False
        self.context.load_cert_chain(self.cert_file, self.key_file)
        log.info("reloaded TLS certificate %s", self.cert_file)
        return True
