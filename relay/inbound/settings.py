"""The inbound limits of [server]: sizes, counts and timeouts every session obeys."""

from __future__ import annotations

import math
from dataclasses import dataclass

from relay.schema import Table


@dataclass(frozen=True, slots=True)
class InboundSettings:
    max_message_size: int = 25 * 1024 * 1024
    max_recipients: int = 1000
    max_line_length: int = 998
    max_header_size: int = 100 * 1024
    max_hops: int = 50
    max_connections: int = 100
    max_connections_per_client: int = 20
    # Pressure (Postfix's stress mode): from this percentage of max_connections on,
    # sessions that keep the server waiting longer than pressure_grace are closed to
    # make room for new clients, and idle ones after pressure_idle_timeout.
    pressure_threshold: int = 80
    pressure_grace: float = 2.0
    pressure_idle_timeout: float = 10.0
    idle_timeout: float = 300.0
    session_timeout: float = 1800.0
    max_errors: int = 20
    max_auth_failures: int = 5
    min_free_space: int = 100 * 1024 * 1024
    max_data_memory: int = 256 * 1024 * 1024

    @property
    def pressure_connections(self) -> int:
        """How many open sessions put the listeners under pressure."""
        return max(1, math.ceil(self.max_connections * self.pressure_threshold / 100))


def read_inbound(server: Table) -> InboundSettings:
    """The inbound keys of the [server] table (the caller reads the rest and finishes it)."""
    base = InboundSettings()
    return InboundSettings(
        max_message_size=server.size("max_message_size", base.max_message_size, low=1024),
        max_recipients=server.integer("max_recipients", base.max_recipients, 1, 100000),
        max_line_length=server.integer("max_line_length", base.max_line_length, 998, 1000000),
        max_header_size=server.size("max_header_size", base.max_header_size, low=1024),
        max_hops=server.integer("max_hops", base.max_hops, 1, 1000),
        max_connections=server.integer("max_connections", base.max_connections, 1, 100000),
        max_connections_per_client=server.integer(
            "max_connections_per_client", base.max_connections_per_client, 1, 100000
        ),
        pressure_threshold=server.integer("pressure_threshold", base.pressure_threshold,
                                          1, 100),
        pressure_grace=server.duration("pressure_grace", base.pressure_grace, low=0.1),
        pressure_idle_timeout=server.duration("pressure_idle_timeout",
                                              base.pressure_idle_timeout, low=0.5),
        idle_timeout=server.duration("idle_timeout", base.idle_timeout, low=1.0),
        session_timeout=server.duration("session_timeout", base.session_timeout, low=1.0),
        max_errors=server.integer("max_errors", base.max_errors, 1, 10000),
        max_auth_failures=server.integer("max_auth_failures", base.max_auth_failures, 1, 10000),
        min_free_space=server.size("min_free_space", base.min_free_space),
        max_data_memory=server.size("max_data_memory", base.max_data_memory, low=1024),
    )
