"""The suite's own helpers (tests/conftest.py)."""

from __future__ import annotations

from conftest import free_port


def test_free_port_never_hands_out_a_port_twice():
    # The kernel may offer a port again as soon as the probe closed it; a relay given
    # the same port for two listeners then fails to start (seen in test_inbound_tls).
    ports = [free_port() for _ in range(1000)]
    assert len(set(ports)) == len(ports)
