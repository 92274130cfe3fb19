"""What recording refusals costs the SMTP path: RCPT replies timed on loopback, refused
(each one an event in the spool's next group commit) against accepted (no write).

    .venv/bin/python bench/refusals.py [--clients 8] [--rcpts 2000]

Starts a relay (its own spool and policy in a temporary directory, no upstream needed:
nothing is sent); --clients clients each send --rcpts RCPT TO (a new session with MAIL
FROM every 20, below the relay's error and recipient limits), alternating a refused and
an accepted recipient, timing every reply. Prints p50/p99 per kind, their ratio, and
the refused events the spool holds afterwards (each refusal must be there). Only the
relay it started is stopped, by PID.
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

POLICY = """
[defaults]
final_action = "reject"

[[rule]]
name = "unknown-user"
match.recipient_domain = "refused.test"
action = "reject"
message = "550 5.1.1 <{recipient}>: User unknown"

[[rule]]
name = "loopback"
match.client_address = "127.0.0.0/8"
action = "accept"
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def client(port: int, rcpts: int, timings: dict[str, list[float]]) -> None:
    # A new connection for every 20 commands: ten refusals stay below [server] max_errors.
    for start in range(0, rcpts, 20):
        await session(port, range(start, min(rcpts, start + 20)), timings)


async def session(port: int, numbers: range, timings: dict[str, list[float]]) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)

    async def command(line: str) -> bytes:
        writer.write(line.encode() + b"\r\n")
        await writer.drain()
        reply = await reader.readline()
        while reply[3:4] == b"-":
            reply = await reader.readline()
        return reply

    await reader.readline()
    await command("EHLO bench.test")
    await command("MAIL FROM:<app@bench.test>")
    for i in numbers:
        kind = "refused" if i % 2 == 0 else "accepted"
        domain = "refused.test" if kind == "refused" else "dest.test"
        started = time.perf_counter()
        reply = await command(f"RCPT TO:<u{i}@{domain}>")
        timings[kind].append(time.perf_counter() - started)
        expected = b"550" if kind == "refused" else b"250"
        assert reply.startswith(expected), reply
    await command("QUIT")
    writer.close()
    await writer.wait_closed()


def percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100)[int(q) - 1] * 1000


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--rcpts", type=int, default=2000, help="RCPT commands per client")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="policy-relay-refusals-"))
    (work / "policies").mkdir()
    (work / "policies" / "10.toml").write_text(POLICY)
    port = free_port()
    (work / "config.toml").write_text(
        f'[server]\nworkers = 1\npolicies_dir = "{work / "policies"}"\n'
        f'[listener.smtp]\naddress = "127.0.0.1:{port}"\n'
        f'[queue]\nspool_dir = "{work / "spool"}"\n[metrics]\nlisten = ""\n'
        f'[control]\nsocket = "{work / "control.sock"}"\n')
    log = (work / "relay.log").open("wb")
    relay = subprocess.Popen([sys.executable, "-m", "relay", "serve", "--config",
                              str(work / "config.toml")], stdout=log, stderr=log, cwd=work)
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.1)
        timings: dict[str, list[float]] = {"refused": [], "accepted": []}

        async def run() -> None:
            await asyncio.gather(*(client(port, args.rcpts, timings)
                                   for _ in range(args.clients)))

        started = time.perf_counter()
        asyncio.run(run())
        elapsed = time.perf_counter() - started
        time.sleep(1.0)  # the last refusals' group commit
    finally:
        relay.terminate()
        relay.wait(30)
        log.close()
    with sqlite3.connect(work / "spool" / "spool.db") as db:
        stored = db.execute("SELECT COUNT(*) FROM event WHERE type = 'refused'").fetchone()[0]
    refused, accepted = timings["refused"], timings["accepted"]
    print(f"{args.clients} clients x {args.rcpts} RCPT in {elapsed:.1f}s "
          f"({len(refused) + len(accepted)} replies)")
    for kind, values in timings.items():
        print(f"  {kind:8s} p50 {percentile(values, 50):.2f} ms  "
              f"p99 {percentile(values, 99):.2f} ms")
    print(f"  refused/accepted p50 {percentile(refused, 50) / percentile(accepted, 50):.2f}, "
          f"p99 {percentile(refused, 99) / percentile(accepted, 99):.2f}")
    print(f"  refused events in the spool: {stored} of {len(refused)}")
    return 0 if stored == len(refused) else 1


if __name__ == "__main__":
    sys.exit(main())
