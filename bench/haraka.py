"""Haraka as a third comparator: what a Node shop would run instead of policy-relay.

A private Haraka instance (installed by bench/run from the npm registry into
bench/.haraka) with its shipped defaults except: it listens on a loopback port, the
`relay` plugin lets 127.0.0.0/8 relay, and `queue/smtp_forward` hands every message to
the same smtp-sink the others deliver to (`enable_outbound = true`: relayed mail goes
there too, not through Haraka's own outbound queue and MX lookups). Haraka's
smtp_forward answers the client only after the upstream accepted: no queue of its own,
so an upstream outage is a 4xx to the client rather than a retry later. The report says
so beside its figures.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import bench

HARAKA_HOME = bench.BENCH_DIR / ".haraka"
HARAKA_BIN = HARAKA_HOME / "node_modules" / ".bin" / "haraka"

NOTE = "Haraka forwards during DATA (smtp_forward): no durable queue of its own"


def available() -> bool:
    return HARAKA_BIN.exists()


def version() -> str:
    package = HARAKA_HOME / "node_modules" / "Haraka" / "package.json"
    try:
        return str(json.loads(package.read_text())["version"])
    except (OSError, ValueError, KeyError):
        return "?"


class HarakaInstance:
    """`haraka -c DIR` in the foreground, stopped by PID like every process we own."""

    def __init__(self, workdir: Path, name: str, sink_port: int, nodes: int = 0,
                 max_size: int = 30_000_000) -> None:
        self.port = bench.free_port()
        self.dir = workdir / f"haraka-{name}"
        subprocess.run([str(HARAKA_BIN), "-i", str(self.dir)], check=True, timeout=60,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        config = self.dir / "config"
        # nodes: Haraka's cluster mode (one process per node); 0 leaves its default (one).
        cluster = f"nodes={nodes}\n" if nodes else ""
        (config / "smtp.ini").write_text(
            f"[main]\nlisten={bench.LOOPBACK}:{self.port}\n{cluster}")
        (config / "plugins").write_text("relay\nqueue/smtp_forward\n")
        (config / "relay.ini").write_text("[relay]\nacl=true\n")
        (config / "relay_acl_allow").write_text("127.0.0.0/8\n")
        (config / "smtp_forward.ini").write_text(
            f"host={bench.LOOPBACK}\nport={sink_port}\nenable_outbound=true\n")
        (config / "databytes").write_text(f"{max_size}\n")
        (config / "me").write_text("haraka.bench.test\n")
        self.log_path = self.dir / "haraka.log"
        self.log = open(self.log_path, "wb")  # noqa: SIM115
        self.proc = bench.OWNED.start([str(HARAKA_BIN), "-c", str(self.dir)],
                                      stdout=self.log, stderr=subprocess.STDOUT)
        bench.wait_tcp(self.port, self.proc, timeout=60)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self) -> None:
        bench.OWNED.stop(self.proc, wait=20)
        self.log.close()
