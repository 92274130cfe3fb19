"""End-to-end benchmark: smtp-source -> (nothing | Postfix | policy-relay) -> smtp-sink.

Run through `bench/run` (it installs Postfix's tools and the venv first). Everything runs
on 127.0.0.1 on free ports; every wait is bounded; at exit only the processes this script
started are stopped, by PID.

Measured per target, with the same load (smtp-source plus a small aiosmtplib client that
sends sequentially alongside and times each final-dot reply):
  - end-to-end messages/s: from the start of smtp-source until smtp-sink has counted every
    message (smtp-sink -c prints "sess=.. quit=.. msg=N" on every final dot);
  - accepted (250 to the clients) == delivered (counted by the sink);
  - CPU seconds of the relay process (utime+stime from /proc/PID/stat, all threads);
  - latency of aiosmtplib's data() call (DATA, 354, content, final dot, reply), p50/p99.
Then the relay's resident memory: at rest, with 1,000 idle connections (after EHLO), and
peak while 50, then 200, clients send 10 MB messages at once (and after the burst).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import datetime as dt
import json
import os
import platform
import random
import re
import resource
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import aiosmtplib

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
VENV_BIN = Path(sys.executable).parent
SINK = "/usr/sbin/smtp-sink"
SOURCE = "/usr/sbin/smtp-source"
POSTFIX = "/usr/sbin/postfix"
LOOPBACK = "127.0.0.1"
WEBHOOK = "policy-relay + webhook"
CLK_TCK = os.sysconf("SC_CLK_TCK")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# -- processes we own ------------------------------------------------------------------

class Owned:
    """Every process this script starts, stopped by PID (never by name) at the end."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []
        self.cleanups: list = []

    def start(self, argv: list[str], **kw) -> subprocess.Popen[bytes]:
        p = subprocess.Popen(argv, **kw)
        self.procs.append(p)
        return p

    def stop(self, p: subprocess.Popen[bytes], sig: int = signal.SIGTERM, wait: float = 15) -> None:
        if p.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                p.send_signal(sig)
            try:
                p.wait(wait)
            except subprocess.TimeoutExpired:
                log(f"pid {p.pid} ignored signal {sig}; killing it")
                with contextlib.suppress(ProcessLookupError):
                    p.kill()
                p.wait(5)
        if p in self.procs:
            self.procs.remove(p)

    def stop_all(self) -> None:
        for fn in reversed(self.cleanups):
            try:
                fn()
            except Exception as exc:  # keep cleaning up
                log(f"cleanup failed: {exc}")
        self.cleanups.clear()
        for p in list(reversed(self.procs)):
            self.stop(p, wait=10)


OWNED = Owned()


_HANDED_OUT: set[int] = set()


def free_port() -> int:
    """A loopback port nothing listens on now, never one handed out before in this run:
    the kernel may offer a just-closed port again, and two servers then collide."""
    for _ in range(1000):
        with socket.socket() as s:
            s.bind((LOOPBACK, 0))
            port: int = s.getsockname()[1]
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port
    raise RuntimeError("no loopback port left that was not handed out before")


def wait_tcp(port: int, proc: subprocess.Popen[bytes] | None, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(
                f"process {proc.args[0]} exited with {proc.returncode} before listening")
        with contextlib.suppress(OSError), socket.create_connection((LOOPBACK, port), timeout=1):
            return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listening on {LOOPBACK}:{port} after {timeout}s")


def process_tree(pid: int) -> list[int]:
    """`pid` and its descendants (the relay's worker processes with [server] workers)."""
    pids, todo = [], [pid]
    while todo:
        p = todo.pop()
        pids.append(p)
        with contextlib.suppress(OSError):
            for task in Path(f"/proc/{p}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
    return pids


def cpu_seconds(pid: int) -> float:
    """utime+stime of `pid` and its live descendants (and of those it has reaped)."""
    total = 0.0
    for p in process_tree(pid):
        with contextlib.suppress(OSError):
            # Fields after the ")" of comm: state is field 3; utime 14, stime 15,
            # cutime 16, cstime 17 (1-based).
            stat = Path(f"/proc/{p}/stat").read_text()
            rest = stat[stat.rindex(")") + 2:].split()
            total += sum(int(x) for x in rest[11:15]) / CLK_TCK
    return total


def proc_status(pid: int, key: str) -> int:
    """A kB figure from /proc/PID/status (VmRSS, VmHWM), in bytes, summed over the
    process and its descendants."""
    total, found = 0, False
    for p in process_tree(pid):
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith(key + ":"):
                    total += int(line.split()[1]) * 1024
                    found = True
    if not found:
        raise KeyError(key)
    return total


def machine_cpu() -> float:
    """Busy CPU seconds of the whole machine (everyone's), from /proc/stat."""
    f = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = f[3] + f[4]
    return (sum(f[:8]) - idle) / CLK_TCK


# -- smtp-sink -------------------------------------------------------------------------

class Sink:
    """smtp-sink on a loopback port; counts messages via its -c counter on stdout."""

    def __init__(self, workdir: Path, name: str) -> None:
        self.port = free_port()
        self.out_path = workdir / f"sink-{name}.out"
        self.out = open(self.out_path, "wb")  # noqa: SIM115
        self.proc = OWNED.start(
            [SINK, "-u", "nobody", "-c", "-h", "sink.bench.test", f"{LOOPBACK}:{self.port}", "256"],
            stdout=self.out, stderr=subprocess.STDOUT,
        )
        wait_tcp(self.port, self.proc)

    def count(self) -> int:
        with open(self.out_path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 200))
            tail = f.read()
        found = re.findall(rb"mesg=(\d+)", tail)
        return int(found[-1]) if found else 0

    def stop(self) -> None:
        OWNED.stop(self.proc)
        self.out.close()


# -- the relay -------------------------------------------------------------------------

_CAPS: dict[str, str] = {}


def tuning(args: argparse.Namespace) -> dict[str, str]:
    """The relay settings this run overrides, by section; none means the shipped defaults,
    which are what the headline figure measures."""
    server, upstream, queue = [], [], []
    if args.relay_workers is not None:
        # --relay-workers 0 asks for "auto" (one process per CPU core), the shipped default.
        server.append("workers = " + (str(args.relay_workers) if args.relay_workers
                                      else '"auto"'))
    if args.pool_size is not None:
        upstream.append(f"pool_size = {args.pool_size}")
    if args.workers is not None:
        queue.append(f"delivery_workers = {args.workers}")
    return {"server": "".join(x + "\n" for x in server),
            "upstream": "".join(x + "\n" for x in upstream),
            "queue": "".join(x + "\n" for x in queue)}


def tuning_label(args: argparse.Namespace) -> str:
    """How the report names this run's relay settings: "shipped defaults" or the overrides."""
    lines = [ln for part in tuning(args).values() for ln in part.splitlines()]
    return "shipped defaults" if not lines else "tuned: " + ", ".join(lines)


def connection_caps(args: argparse.Namespace) -> str:
    """Raise the relay's connection caps above what the benchmark opens (21 sessions from
    one address; 1,000 idle connections), if this relay version has such settings."""
    if "v" not in _CAPS:
        n = max(args.idle_connections, args.sessions, *args.big_messages, *args.big_points) + 100
        text = f"max_connections = {n}\nmax_connections_per_client = {n}\n"
        with tempfile.NamedTemporaryFile("w", suffix=".toml") as f:
            f.write("[server]\n" + text)
            f.flush()
            r = subprocess.run([str(VENV_BIN / "policy-relay"), "check", "--config", f.name],
                               capture_output=True, text=True, check=False, timeout=60)
        _CAPS["v"] = text if r.returncode == 0 else ""
        if r.returncode != 0:
            log(f"relay has no connection caps to raise ({r.stdout.strip()} {r.stderr.strip()})")
    return _CAPS["v"]


class Receiver:
    """bench/receiver.py: a webhook endpoint in its own process, checking signatures."""

    def __init__(self, directory: Path) -> None:
        directory.mkdir()
        self.port = free_port()
        self.secret = directory / "webhook.secret"
        self.secret.write_text("bench-secret\n")
        self.counts = directory / "webhook-counts.json"
        self.proc = OWNED.start([sys.executable, str(BENCH_DIR / "receiver.py"), str(self.port),
                                 str(self.secret), str(self.counts)])
        wait_tcp(self.port, self.proc)

    def sink_config(self) -> str:
        return ("[[events.sink]]\n"
                'name = "bench"\n'
                'type = "webhook"\n'
                f'url = "http://{LOOPBACK}:{self.port}/events"\n'
                f'secret_file = "{self.secret}"\n')

    def stop(self) -> dict[str, int]:
        OWNED.stop(self.proc)
        counts: dict[str, int] = json.loads(self.counts.read_text())
        return counts


class Relay:
    def __init__(self, workdir: Path, name: str, sink_port: int, args: argparse.Namespace,
                 extra: str = "", caps: str | None = None) -> None:
        self.port = free_port()
        self.dir = workdir / f"relay-{name}"
        self.dir.mkdir()
        self.config = self.dir / "config.toml"
        tuned = tuning(args)
        self.config.write_text(
            "[server]\n"
            'hostname = "relay.bench.test"\n'
            'relay_networks = ["127.0.0.0/8"]\n'
            f'max_message_size = "{args.max_message_size}"\n'
            f"{connection_caps(args) if caps is None else caps}"
            f"{tuned['server']}"
            "[listener.bench]\n"
            f'address = "{LOOPBACK}:{self.port}"\n'
            "[upstream.default]\n"
            f'hosts = ["{LOOPBACK}:{sink_port}"]\n'
            f"{tuned['upstream']}"
            f"max_messages_per_connection = {args.max_messages_per_connection}\n"
            "[queue]\n"
            f'spool_dir = "{self.dir / "spool"}"\n'
            f"{tuned['queue']}"
            f"{extra}"
        )
        self.log_path = self.dir / "relay.log"
        self.log = open(self.log_path, "wb")  # noqa: SIM115
        self.proc = OWNED.start(
            [str(VENV_BIN / "policy-relay"), "serve", "--config", str(self.config)],
            stdout=self.log, stderr=subprocess.STDOUT, cwd=self.dir,
        )
        wait_tcp(self.port, self.proc, timeout=30)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log_counts(self) -> tuple[int, int, int]:
        """(accepted, sent, other delivery lines) from the relay's own log."""
        text = self.log_path.read_bytes()
        return (len(re.findall(rb": client=\[", text)), len(re.findall(rb"status=sent", text)),
                len(re.findall(rb"status=(?:deferred|failed|expired)", text)))

    def stop(self) -> int:
        """Stop (SIGTERM), then return how many messages are still in the spool."""
        OWNED.stop(self.proc, wait=30)
        self.log.close()
        db = self.dir / "spool" / "spool.db"
        if not db.exists():
            return -1
        with contextlib.closing(sqlite3.connect(db)) as con:
            return int(con.execute("SELECT COUNT(*) FROM message").fetchone()[0])


# -- a private Postfix instance --------------------------------------------------------

MASTER_CF = """\
{smtpd_addr} inet n - n - - smtpd
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
tlsmgr    unix  -       -       n       1000?   1       tlsmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
proxywrite unix -       -       n       -       1       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
local     unix  -       n       n       -       -       local
virtual   unix  -       n       n       -       -       virtual
lmtp      unix  -       -       n       -       -       lmtp
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""

MAIN_CF = """\
# Private benchmark instance: own config, queue and data directories, loopback only.
compatibility_level = 3.6
queue_directory = {queue}
data_directory = {data}
mail_owner = postfix
setgid_group = postdrop
myhostname = postfix.bench.test
mydomain = bench.test
myorigin = $myhostname
mydestination =
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
relayhost = [127.0.0.1]:{sink_port}
smtpd_relay_restrictions = permit_mynetworks, reject_unauth_destination
alias_maps =
alias_database =
local_recipient_maps =
smtputf8_enable = no
# The curves send 10 MB messages; Postfix's default limit is 10,240,000 bytes.
message_size_limit = 0
biff = no
maillog_file = {dir}/maillog
maillog_file_prefixes = {dir}
"""


class PostfixInstance:
    """`postfix -c DIR start` with a private config_directory; `postfix -c DIR stop`."""

    def __init__(self, workdir: Path, sink_port: int) -> None:
        self.port = free_port()
        self.dir = workdir / "postfix"
        self.etc = self.dir / "etc"
        self.queue = self.dir / "queue"
        self.etc.mkdir(parents=True)
        self.queue.mkdir(mode=0o755)  # postfix creates its subdirectories, not this one
        self.etc.joinpath("main.cf").write_text(MAIN_CF.format(
            queue=self.queue, data=self.dir / "data", sink_port=sink_port, dir=self.dir))
        self.etc.joinpath("master.cf").write_text(
            MASTER_CF.format(smtpd_addr=f"{LOOPBACK}:{self.port}"))
        self.master_pid: int | None = None
        self.out = self.dir / "postfix-cmd.log"
        OWNED.cleanups.append(self.stop)
        self._postfix("start", timeout=60)
        pidfile = self.queue / "pid" / "master.pid"
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and self.master_pid is None:
            with contextlib.suppress(OSError, ValueError):
                self.master_pid = int(pidfile.read_text().split()[0])
            time.sleep(0.05)
        if self.master_pid is None:
            raise RuntimeError(f"private postfix did not start; see {self.out}")
        wait_tcp(self.port, None, timeout=15)

    def _postfix(self, verb: str, timeout: float) -> int:
        with open(self.out, "ab") as out:
            r = subprocess.run([POSTFIX, "-c", str(self.etc), verb], stdout=out,
                               stderr=subprocess.STDOUT, timeout=timeout, check=False)
        if r.returncode != 0:
            log(f"postfix -c {self.etc} {verb} exited {r.returncode}: "
                + self.out.read_text(errors="replace")[-2000:])
        return r.returncode

    def log_counts(self) -> tuple[int, int]:
        maillog = self.dir / "maillog"
        text = maillog.read_bytes() if maillog.exists() else b""
        return (len(re.findall(rb"postfix/smtpd\[\d+\]: [0-9A-F]+: client=", text)),
                len(re.findall(rb"postfix/smtp\[\d+\]: [0-9A-F]+: to=.*status=sent", text)))

    def alive(self) -> bool:
        """Our master process exists and is not a zombie waiting to be reaped."""
        try:
            stat = Path(f"/proc/{self.master_pid}/stat").read_text()
        except OSError:
            return False
        return stat[stat.rindex(")") + 2] != "Z"

    def stop(self) -> None:
        if self.master_pid is None or not self.alive():
            return
        with contextlib.suppress(subprocess.TimeoutExpired):
            self._postfix("stop", timeout=60)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and self.alive():
            time.sleep(0.1)
        if self.alive():
            log(f"private postfix master {self.master_pid} still running; SIGKILL")
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.master_pid, signal.SIGKILL)
        self.master_pid = None


# -- load ------------------------------------------------------------------------------

def message_bytes(size: int, sender: str, rcpt: str, subject: str) -> bytes:
    head = (f"From: <{sender}>\r\nTo: <{rcpt}>\r\nSubject: {subject}\r\n"
            f"Message-ID: <{time.time_ns()}@bench.test>\r\n\r\n").encode()
    line = b"x" * 76 + b"\r\n"
    body = line * (size // len(line)) + b"y" * (size % len(line))
    if not body.endswith(b"\r\n"):
        body += b"\r\n"
    return head + body


async def latency_client(port: int, size: int, limit: int, stop: asyncio.Event,
                         out: list[float], failures: list[str]) -> None:
    """One connection, messages one after another; times each data() call."""
    sender, rcpt = "latency@source.bench.test", "latency@dest.bench.test"
    msg = message_bytes(size, sender, rcpt, "latency probe")
    try:
        smtp = aiosmtplib.SMTP(hostname=LOOPBACK, port=port, timeout=120,
                               local_hostname="latency.bench.test", start_tls=False)
        await smtp.connect()
        await smtp.ehlo()
    except Exception as exc:
        failures.append(f"connect: {exc!r}")
        return
    try:
        for _ in range(limit):
            if stop.is_set():
                break
            try:
                await smtp.mail(sender)
                await smtp.rcpt(rcpt)
                t0 = time.perf_counter()
                await smtp.data(msg)
                out.append(time.perf_counter() - t0)
            except Exception as exc:
                failures.append(repr(exc))
                if not smtp.is_connected:
                    break
                with contextlib.suppress(Exception):
                    await smtp.rset()
    finally:
        with contextlib.suppress(Exception):
            await smtp.quit()


@dataclass
class LoadResult:
    target: str
    messages: int = 0          # smtp-source's share
    latency_sent: int = 0      # accepted from the latency client
    accepted: int = 0
    delivered: int = 0
    source_seconds: float = 0.0
    seconds: float = 0.0
    rate: float = 0.0
    accept_rate: float = 0.0
    complete: bool = False
    relay_cpu: float | None = None
    machine_cpu: float = 0.0
    p50_ms: float | None = None
    p99_ms: float | None = None
    latency_failures: int = 0
    notes: list[str] = field(default_factory=list)


async def drive(target: str, port: int, sink: Sink, args: argparse.Namespace,
                relay_pid: int | None = None) -> LoadResult:
    res = LoadResult(target=target, messages=args.messages)
    base = sink.count()
    argv = [SOURCE, "-s", str(args.sessions), "-m", str(args.messages), "-l", str(args.size),
            "-r", str(args.recipients), "-f", "bench@source.bench.test",
            "-t", "rcpt@dest.bench.test", "-M", "source.bench.test"]
    if not args.connection_per_message:
        argv.append("-d")
    argv.append(f"{LOOPBACK}:{port}")
    lat: list[float] = []
    failures: list[str] = []
    stop = asyncio.Event()
    cpu0 = cpu_seconds(relay_pid) if relay_pid else None
    mcpu0 = machine_cpu()
    t0 = time.perf_counter()
    src = await asyncio.create_subprocess_exec(*argv, stdout=subprocess.DEVNULL,
                                               stderr=subprocess.PIPE)
    lat_task = asyncio.create_task(
        latency_client(port, args.size, args.latency_messages, stop, lat, failures))
    timeout = max(300.0, args.messages / 20)
    try:
        _, err = await asyncio.wait_for(src.communicate(), timeout)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            src.kill()
        await src.wait()
        err = b"timed out"
        res.notes.append(f"smtp-source did not finish in {timeout:.0f}s")
    res.source_seconds = time.perf_counter() - t0
    stop.set()
    await asyncio.wait_for(lat_task, 180)
    if src.returncode != 0:
        tail = err.decode(errors="replace")[-300:]
        res.notes.append(f"smtp-source exit {src.returncode}: {tail}")
    # smtp-source stops at the first reply it did not expect, so exit 0 = all accepted.
    source_ok = args.messages if src.returncode == 0 else 0
    res.latency_sent = len(lat)
    res.accepted = source_ok + len(lat)
    res.latency_failures = len(failures)
    if failures:
        res.notes.append(f"latency client errors: {failures[:3]}")
    # Wait (bounded) until the sink has counted every accepted message.
    expected = base + res.accepted
    deadline = time.perf_counter() + timeout
    last, last_change = sink.count(), time.perf_counter()
    while time.perf_counter() < deadline:
        n = sink.count()
        if n >= expected:
            break
        if n != last:
            last, last_change = n, time.perf_counter()
        elif time.perf_counter() - last_change > args.stall_timeout:
            res.notes.append(f"sink stalled at {n - base}/{res.accepted} for {args.stall_timeout}s")
            break
        await asyncio.sleep(0.01)
    res.seconds = time.perf_counter() - t0
    if relay_pid:
        res.relay_cpu = cpu_seconds(relay_pid) - cpu0
    res.machine_cpu = machine_cpu() - mcpu0
    await asyncio.sleep(0.5)  # anything beyond the expected count (duplicates) shows up now
    res.delivered = sink.count() - base
    res.complete = res.delivered == res.accepted and src.returncode == 0
    res.rate = res.delivered / res.seconds
    res.accept_rate = res.accepted / res.source_seconds
    if len(lat) >= 2:
        q = statistics.quantiles(lat, n=100, method="inclusive")
        res.p50_ms, res.p99_ms = q[49] * 1000, q[98] * 1000
    return res


# -- memory ----------------------------------------------------------------------------

async def open_idle(port: int, n: int) -> list[asyncio.StreamWriter]:
    writers: list[asyncio.StreamWriter] = []

    async def one(i: int) -> None:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(LOOPBACK, port), 30)
        writers.append(writer)
        await asyncio.wait_for(reader.readline(), 30)  # banner
        writer.write(f"EHLO idle{i}.bench.test\r\n".encode())
        while True:
            line = await asyncio.wait_for(reader.readline(), 30)
            if not line or line[3:4] == b" ":
                break

    for start in range(0, n, 100):
        await asyncio.gather(*(one(i) for i in range(start, min(n, start + 100))))
    return writers


BIG_RETRIES: list[int] = [0]
# The 4xx replies behind those tries, by reply (say which limit answered).
BIG_REPLIES: collections.Counter[str] = collections.Counter()


def big_replies() -> str:
    """The 4xx replies of the last big_messages(), most frequent first, for a note."""
    return "; ".join(f"{n} x {reply}" for reply, n in BIG_REPLIES.most_common(3))


async def big_messages(port: int, count: int, size: int) -> tuple[int, list[str]]:
    """Each client sends one big message; a 4xx reply (the relay's memory budget says
    452 4.3.1) is retried after a second, as an MTA would retry later (counted)."""
    msg = message_bytes(size, "big@source.bench.test", "big@dest.bench.test", "10 MB")
    errors: list[str] = []
    BIG_RETRIES[0] = 0
    BIG_REPLIES.clear()

    async def one() -> bool:
        for _ in range(100):
            try:
                await aiosmtplib.send(msg, sender="big@source.bench.test",
                                      recipients=["big@dest.bench.test"], hostname=LOOPBACK,
                                      port=port, timeout=600, start_tls=False,
                                      local_hostname="big.bench.test")
                return True
            except aiosmtplib.SMTPResponseException as exc:
                if not 400 <= exc.code < 500:
                    errors.append(repr(exc))
                    return False
                BIG_RETRIES[0] += 1
                # Without what varies from reply to reply (ids in parentheses).
                BIG_REPLIES[re.sub(r"\s*\(.*?\)", "", f"{exc.code} {exc.message}")[:80]] += 1
                await asyncio.sleep(1.0)
            except Exception as exc:
                errors.append(repr(exc))
                return False
        errors.append("gave up after 100 tries")
        return False

    ok = await asyncio.gather(*(one() for _ in range(count)))
    return sum(ok), errors


async def sample_rss(pid: int, stop: asyncio.Event, peak: list[int]) -> None:
    while not stop.is_set():
        with contextlib.suppress(OSError):
            peak[0] = max(peak[0], proc_status(pid, "VmRSS"))
        await asyncio.sleep(0.02)


async def big_burst(workdir: Path, args: argparse.Namespace, count: int) -> dict[str, object]:
    """`count` clients each send one big message at once to a fresh relay: its RSS at
    rest, at the peak (sampled every 20 ms, and VmHWM) and 2 s after every message was
    delivered, and how many tries were answered 4xx (the memory budget's 452)."""
    out: dict[str, object] = {"count": count}
    sink = Sink(workdir, f"mem-big-{count}")
    relay = Relay(workdir, f"mem-big-{count}", sink.port, args)
    await asyncio.sleep(1.0)
    rest = proc_status(relay.pid, "VmRSS")
    peak = [rest]
    stop = asyncio.Event()
    spy = await start_spy(workdir, relay.pid, f"big-{count}") if args.profile else None
    sampler = asyncio.create_task(sample_rss(relay.pid, stop, peak))
    t0 = time.perf_counter()
    ok, errors = await big_messages(relay.port, count, args.big_size)
    accept_s = time.perf_counter() - t0
    deadline = time.perf_counter() + 300
    while time.perf_counter() < deadline and sink.count() < ok:
        await asyncio.sleep(0.05)
    delivered = sink.count()
    total_s = time.perf_counter() - t0
    stop.set()
    await sampler
    stop_spy(spy)
    out["rss_at_rest_mb"] = rest / 2**20
    out["accepted"] = ok
    out["delivered"] = delivered
    out["errors"] = errors[:3]
    out["retries"] = BIG_RETRIES[0]
    out["retry_replies"] = big_replies()
    out["rss_peak_mb"] = peak[0] / 2**20
    out["vmhwm_mb"] = proc_status(relay.pid, "VmHWM") / 2**20
    await asyncio.sleep(2.0)
    out["rss_after_mb"] = proc_status(relay.pid, "VmRSS") / 2**20
    out["accept_seconds"] = accept_s
    out["total_seconds"] = total_s
    relay.stop()
    sink.stop()
    return out


async def memory(workdir: Path, args: argparse.Namespace) -> dict[str, object]:
    out: dict[str, object] = {}
    # 1) idle connections
    sink = Sink(workdir, "mem-idle")
    relay = Relay(workdir, "mem-idle", sink.port, args)
    await asyncio.sleep(1.0)
    out["rss_at_rest_mb"] = proc_status(relay.pid, "VmRSS") / 2**20
    writers = await open_idle(relay.port, args.idle_connections)
    await asyncio.sleep(2.0)
    fds = sum(len(os.listdir(f"/proc/{p}/fd")) for p in process_tree(relay.pid))
    out["idle_connections"] = len(writers)
    out["relay_fds_with_idle"] = fds
    out["rss_idle_mb"] = proc_status(relay.pid, "VmRSS") / 2**20
    out["rss_per_idle_conn_kb"] = ((out["rss_idle_mb"] - out["rss_at_rest_mb"]) * 1024
                                   / max(1, len(writers)))
    for w in writers:
        w.close()
    await asyncio.sleep(1.0)
    out["rss_after_idle_closed_mb"] = proc_status(relay.pid, "VmRSS") / 2**20
    relay.stop()
    sink.stop()
    # 2) concurrent big messages, a fresh relay for each burst size
    out["bursts"] = [await big_burst(workdir, args, count) for count in args.big_messages]
    return out


# -- profile ---------------------------------------------------------------------------

def summarize_profile(raw: Path, top: int = 30) -> str:
    """py-spy --format raw: 'frame;frame;... count' lines -> self and inclusive tables."""
    selfc: dict[str, int] = {}
    incl: dict[str, int] = {}
    total = 0
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack or not n.isdigit():
            continue
        count = int(n)
        total += count
        # "func (/path/.../site-packages/mod.py:123)" -> "func (mod.py)": per function
        frames = [re.sub(r":\d+\)$", ")",
                         re.sub(r"\s*\(\S*?(?:site-packages|python3\.\d+)/|\s*\(" + re.escape(
                             str(REPO)) + "/", " (", f))
                  for f in stack.split(";")]
        selfc[frames[-1]] = selfc.get(frames[-1], 0) + count
        for f in set(frames):
            incl[f] = incl.get(f, 0) + count
    lines = [f"samples: {total}", "", "self (top):"]
    for f, c in sorted(selfc.items(), key=lambda kv: -kv[1])[:top]:
        lines.append(f"  {100 * c / total:5.1f}%  {f}")
    lines += ["", "inclusive (top):"]
    for f, c in sorted(incl.items(), key=lambda kv: -kv[1])[:top * 2]:
        lines.append(f"  {100 * c / total:5.1f}%  {f}")
    return "\n".join(lines)


async def start_spy(workdir: Path, pid: int, name: str) -> tuple[subprocess.Popen[bytes], Path]:
    raw = workdir / f"profile-{name}.raw"
    spy = OWNED.start([str(VENV_BIN / "py-spy"), "record", "-p", str(pid), "-r", "200",
                       "-f", "raw", "--threads", "--subprocesses", "-o", str(raw)],
                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    await asyncio.sleep(1.0)
    return spy, raw


def stop_spy(spy: tuple[subprocess.Popen[bytes], Path] | None) -> None:
    """Stop py-spy (SIGINT: it writes its file) and keep a summary in bench/results/."""
    if spy is None:
        return
    proc, raw = spy
    OWNED.stop(proc, sig=signal.SIGINT, wait=60)
    if raw.exists():
        dest = BENCH_DIR / "results" / f"{time.strftime('%Y-%m-%d-%H%M%S')}-{raw.stem}.txt"
        dest.parent.mkdir(exist_ok=True)
        shutil.copy(raw, dest.with_suffix(".raw"))
        dest.write_text(summarize_profile(raw))
        log(f"  profile summary: {dest}")


# -- main ------------------------------------------------------------------------------

def fmt(x: float | None, spec: str = ".0f") -> str:
    return "-" if x is None else format(x, spec)


TARGETS = {"direct": "smtp-sink direct", "postfix": "postfix", "haraka": "haraka",
           "relay": "policy-relay", "relay-webhook": WEBHOOK}


async def measure(target: str, workdir: Path, name: str, args: argparse.Namespace,
                  profile: bool = False) -> LoadResult:
    """One load (args: messages, size, sessions, recipients) through one fresh `target`
    ("direct", "postfix", "haraka" or "relay") to a fresh smtp-sink."""
    import haraka  # beside this file; it imports this module

    label = TARGETS[target]
    sink = Sink(workdir, f"{target}-{name}")
    try:
        if target == "direct":
            return await drive(label, sink.port, sink, args)
        if target == "postfix":
            try:
                pf = PostfixInstance(workdir / f"pf-{name}", sink.port)
            except Exception as exc:
                log(f"  private postfix unavailable: {exc}")
                return LoadResult(label, notes=[f"not run: {exc}"])
            r = await drive(label, pf.port, sink, args, relay_pid=pf.master_pid)
            pf.stop()
            acc, sent = pf.log_counts()
            r.notes.append(f"postfix log: {acc} accepted, {sent} sent")
            return r
        if target == "haraka":
            if not haraka.available():
                return LoadResult(label, notes=["not run: Haraka not installed"])
            hk = haraka.HarakaInstance(workdir, name, sink.port,
                                       nodes=getattr(args, "haraka_nodes", 0))
            r = await drive(label, hk.port, sink, args, relay_pid=hk.pid)
            hk.stop()
            r.notes.append(haraka.NOTE)
            return r
        # relay-webhook: a webhook sink takes every event, to a receiver on loopback.
        receiver = Receiver(workdir / f"receiver-{name}") if target == "relay-webhook" \
            else None
        relay = Relay(workdir, name, sink.port, args,
                      receiver.sink_config() if receiver is not None else "")
        spy = await start_spy(workdir, relay.pid, name) if profile else None
        r = await drive(label, relay.port, sink, args, relay_pid=relay.pid)
        stop_spy(spy)
        if receiver is not None:
            # What the receiver has when the last message reached the sink: events lag
            # mail by design, so this is not all of them.
            r.notes.append(f"webhook: {receiver.stop()} when delivery ended")
        left = relay.stop()
        acc, sent, other = relay.log_counts()
        r.notes.append(f"relay log: {acc} accepted, {sent} sent, {other} deferred/failed; "
                       f"{left} left in spool")
        return r
    finally:
        sink.stop()


async def run_loads(workdir: Path, args: argparse.Namespace) -> dict[str, list[LoadResult]]:
    results: dict[str, list[LoadResult]] = {TARGETS[t]: [] for t in TARGETS
                                            if t in args.targets}
    for rep in range(args.repeat):
        for target in TARGETS:
            if target not in args.targets:
                continue
            log(f"run {rep + 1}/{args.repeat}: smtp-source -> {TARGETS[target]} -> smtp-sink")
            r = await measure(target, workdir, f"load-{rep}", args, profile=args.profile)
            results[TARGETS[target]].append(r)
            cpu = f", cpu {r.relay_cpu:.1f}s" if r.relay_cpu is not None else ""
            log(f"  {r.rate:.0f} msg/s, {r.delivered}/{r.accepted}{cpu} {r.notes}")
    return results


def best(rs: list[LoadResult]) -> LoadResult | None:
    ok = [r for r in rs if r.seconds > 0]
    return max(ok, key=lambda r: r.rate) if ok else None


# -- slowloris -------------------------------------------------------------------------

async def slow_client(port: int, source: str, interval: float, stop: asyncio.Event,
                      counts: dict[str, int]) -> None:
    """Connect from `source`, then send one byte every `interval` seconds and never a
    line's end; when closed or refused, reconnect after a moment, as slowloris does."""
    while not stop.is_set():
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(LOOPBACK, port, local_addr=(source, 0)), 10)
        except (OSError, TimeoutError):
            counts["connect_errors"] += 1
            await asyncio.sleep(1.0)
            continue
        counts["connections"] += 1
        try:
            while not stop.is_set():
                try:
                    if not await asyncio.wait_for(reader.read(1024), interval):
                        break  # closed by the relay
                except TimeoutError:
                    writer.write(b"X")
        except OSError:
            pass
        finally:
            writer.close()
        await asyncio.sleep(random.uniform(0.5, 1.5))


async def served_within(port: int, window: float) -> float | None:
    """Seconds until a real client's message got its 250, retrying refusals as an MTA's
    client would (every 0.5 s); None when the window passed first."""
    msg = message_bytes(1024, "app@source.bench.test", "rcpt@dest.bench.test", "slowloris")
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < window:
        with contextlib.suppress(aiosmtplib.SMTPException, OSError, TimeoutError):
            await asyncio.wait_for(aiosmtplib.send(
                msg, sender="app@source.bench.test", recipients=["rcpt@dest.bench.test"],
                hostname=LOOPBACK, port=port, timeout=window, start_tls=False,
                local_hostname="app.bench.test"), window)
            return time.perf_counter() - t0
        await asyncio.sleep(0.5)
    return None


async def slowloris(workdir: Path, args: argparse.Namespace) -> dict[str, object]:
    """The relay at its default connection caps (100, 20 per client) under
    --slow-connections from --slow-addresses loopback addresses (127.0.0.10 on), each
    sending a byte every --slow-interval seconds, while a real client from 127.0.0.1
    sends --slow-attempts messages, one a second, each within 10 s or not at all."""
    sink = Sink(workdir, "slowloris")
    relay = Relay(workdir, "slowloris", sink.port, args, caps="")
    stop = asyncio.Event()
    counts = {"connections": 0, "connect_errors": 0}
    attack = [asyncio.create_task(slow_client(
        relay.port, f"127.0.0.{10 + i % args.slow_addresses}", args.slow_interval, stop, counts))
        for i in range(args.slow_connections)]
    deadline = time.perf_counter() + 30
    while b"smtpd_pressure started" not in relay.log_path.read_bytes():
        if time.perf_counter() > deadline:
            break
        await asyncio.sleep(0.1)
    times: list[float | None] = []
    rss = [proc_status(relay.pid, "VmRSS")]
    sampler = asyncio.create_task(sample_rss(relay.pid, stop, rss))
    for _ in range(args.slow_attempts):
        times.append(await served_within(relay.port, 10.0))
        await asyncio.sleep(1.0)
    stop.set()
    await asyncio.gather(*attack, sampler)
    text = relay.log_path.read_text(errors="replace")
    relay.stop()
    sink.stop()
    served = [t for t in times if t is not None]
    return {
        "slow_connections": args.slow_connections, "slow_addresses": args.slow_addresses,
        "attempts": len(times), "served": len(served),
        "served_p50_s": statistics.median(served) if served else None,
        "served_max_s": max(served) if served else None,
        "attack_connections": counts["connections"],
        "stalled_closed": text.count("listener=bench: under pressure"),
        "pressure_entered": text.count("smtpd_pressure started"),
        "peak_rss_mb": rss[0] / 2**20,
    }


def report(results: dict[str, list[LoadResult]], mem: dict[str, object] | None,
           args: argparse.Namespace, started: str) -> str:
    rev = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                         capture_output=True, text=True, check=False).stdout.strip()
    dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--", "relay"],
                           capture_output=True, text=True, check=False).stdout.strip()
    cpu = next((ln.split(":", 1)[1].strip() for ln in
                Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("model name")), "?")
    L = [f"## {started}: {args.messages} messages x {args.size} B, {args.sessions} sessions, "
         f"{args.recipients} rcpt/msg", "",
         f"Machine: {os.cpu_count()} CPUs ({cpu}), {platform.platform()}, Python "
         f"{platform.python_version()}; relay at {rev}"
         f"{' + uncommitted relay/ changes' if dirty else ''}. "
         f"smtp-source {'without' if args.connection_per_message else 'with'} -d "
         f"({'one connection per message' if args.connection_per_message else 'reused'}"
         " connections); "
         f"relay: {tuning_label(args)}, "
         f"max_messages_per_connection={args.max_messages_per_connection}, log level info, "
         f"spool on disk (SQLite WAL, synchronous=FULL). Latency client: aiosmtplib, one "
         f"connection, sequential, up to {args.latency_messages} messages during the load.",
         ""]
    best_of = {name: best(rs) for name, rs in results.items()}
    sink_b, pf_b, hk_b, rl_b = (best_of.get(k) for k in (
        "smtp-sink direct", "postfix", "haraka", "policy-relay"))
    if rl_b is not None:
        L += ["| ratio | value |", "|---|---|"]
        # Runs alternate (relay, relay + webhook, relay, ...): compare each pair.
        pairs = zip(results.get("policy-relay", []), results.get(WEBHOOK, []), strict=False)
        for i, (plain, hooked) in enumerate(pairs):
            if plain.rate and hooked.rate:
                L.append(f"| run {i + 1}: policy-relay + webhook sink / policy-relay | "
                         f"{hooked.rate / plain.rate:.3f} |")
        if sink_b:
            L.append(f"| policy-relay / smtp-sink direct | {rl_b.rate / sink_b.rate:.3f} |")
        for other, name in ((pf_b, "Postfix"), (hk_b, "Haraka")):
            if other is None or not other.rate:
                continue
            L.append(f"| policy-relay / {name} relay, msg/s | {rl_b.rate / other.rate:.2f} |")
            if other.p50_ms and rl_b.p50_ms and other.p99_ms and rl_b.p99_ms:
                L.append(f"| p50 final-dot latency, policy-relay / {name} | "
                         f"{rl_b.p50_ms / other.p50_ms:.2f} |")
                L.append(f"| p99 final-dot latency, policy-relay / {name} | "
                         f"{rl_b.p99_ms / other.p99_ms:.2f} |")
        L.append("")
    L += ["| target | run | end-to-end msg/s | accept msg/s | accepted | delivered | "
          "accepted == delivered | target CPU s | CPU ms/msg | machine CPU s | p50 ms | "
          "p99 ms | notes |",
          "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, rs in results.items():
        for i, r in enumerate(rs):
            per_msg = (1000 * r.relay_cpu / r.delivered
                       if r.relay_cpu is not None and r.delivered else None)
            L.append(f"| {name} | {i + 1} | {r.rate:.0f} | {r.accept_rate:.0f} | {r.accepted} | "
                     f"{r.delivered} | {'yes' if r.complete else 'NO'} | "
                     f"{fmt(r.relay_cpu, '.1f')} | {fmt(per_msg, '.2f')} | "
                     f"{r.machine_cpu:.1f} | {fmt(r.p50_ms, '.1f')} | {fmt(r.p99_ms, '.1f')} | "
                     f"{'; '.join(r.notes)} |")
    L += ["", "target CPU s: utime+stime of the target's live processes (the relay's "
          "supervisor and workers; Postfix's master and its children: a Postfix process "
          "that exited during the run is not counted, so Postfix's figure is a floor)."]
    if mem:
        L += ["", "| relay memory | RSS |", "|---|---|",
              f"| at rest | {mem['rss_at_rest_mb']:.1f} MB |",
              f"| {mem['idle_connections']} idle connections (after EHLO; relay holds "
              f"{mem['relay_fds_with_idle']} fds) | {mem['rss_idle_mb']:.1f} MB "
              f"({mem['rss_per_idle_conn_kb']:.1f} KB per connection) |",
              f"| after closing them | {mem['rss_after_idle_closed_mb']:.1f} MB |",
              ]
        for b in mem["bursts"]:
            L += [f"| {b['count']} concurrent {args.big_size / 2**20:.0f} MB messages: at rest, "
                  f"peak (sampled every 20 ms / VmHWM), 2 s after delivery | "
                  f"{b['rss_at_rest_mb']:.0f} MB, {b['rss_peak_mb']:.0f} MB / "
                  f"{b['vmhwm_mb']:.0f} MB, {b['rss_after_mb']:.0f} MB |"]
        L.append("")
        for b in mem["bursts"]:
            why = f" ({b['retry_replies']})" if b["retries"] else ""
            L.append(f"{b['count']} big messages: {b['accepted']} accepted, {b['delivered']} "
                     f"delivered; all accepted after {b['accept_seconds']:.1f}s, delivered "
                     f"after {b['total_seconds']:.1f}s; {b['retries']} tries answered 4xx "
                     f"and sent again{why}. {b['errors'] or ''}")
    return "\n".join(L) + "\n"


def slowloris_report(attack: dict[str, object] | None) -> str:
    if attack is None:
        return ""
    p50, worst = attack["served_p50_s"], attack["served_max_s"]
    return (
        f"\nSlowloris: {attack['slow_connections']} connections from "
        f"{attack['slow_addresses']} addresses (each a byte every few seconds, reconnecting "
        f"when closed: {attack['attack_connections']} connections in all) against the default "
        f"max_connections 100: the real client was served within 10 s in "
        f"{attack['served']} of {attack['attempts']} attempts"
        + (f" (median {p50:.2f} s, worst {worst:.2f} s)" if p50 is not None else "")
        + f"; {attack['stalled_closed']} stalled sessions closed under pressure; peak relay "
        f"RSS {attack['peak_rss_mb']:.0f} MB.\n")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bench/run", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--messages", type=int, default=20000, help="smtp-source messages (-m)")
    p.add_argument("--size", type=int, default=2048, help="message payload bytes (-l)")
    p.add_argument("--sessions", type=int, default=20, help="concurrent sessions (-s)")
    p.add_argument("--recipients", type=int, default=1, help="recipients per message (-r)")
    p.add_argument("--connection-per-message", action="store_true",
                   help="smtp-source without -d: a new connection for every message")
    p.add_argument("--latency-messages", type=int, default=500,
                   help="most messages the aiosmtplib latency client sends during the load")
    p.add_argument("--targets", default="direct,postfix,haraka,relay",
                   help="comma list of direct, postfix, haraka, relay, relay-webhook (the "
                   "relay with a webhook sink taking every event, to a receiver on loopback)")
    p.add_argument("--repeat", type=int, default=1, help="run every target this many times")
    # Unset, each is the relay's shipped default: the headline figure is for what a
    # sysadmin runs. Set, the report labels the run "tuned".
    p.add_argument("--pool-size", type=int, help="relay upstream pool_size")
    p.add_argument("--workers", type=int, help="relay [queue] delivery_workers")
    p.add_argument("--relay-workers", type=int,
                   help="relay [server] workers (processes sharing the port, one spool "
                   "shard each; pool_size and delivery_workers are per worker; 0 = auto)")
    p.add_argument("--max-messages-per-connection", type=int, default=100)
    p.add_argument("--max-message-size", default="25M")
    p.add_argument("--no-memory", action="store_true", help="skip the memory measurements")
    p.add_argument("--idle-connections", type=int, default=1000)
    p.add_argument("--big-messages", default="50,200",
                   help="comma list: concurrent big messages per burst (a fresh relay each)")
    p.add_argument("--big-size", type=int, default=10 * 2**20)
    p.add_argument("--slowloris", action="store_true",
                   help="also measure a real client's service during a slowloris attack")
    p.add_argument("--slow-connections", type=int, default=1000)
    p.add_argument("--slow-addresses", type=int, default=50)
    p.add_argument("--slow-interval", type=float, default=3.0,
                   help="seconds between the bytes each slow connection sends")
    p.add_argument("--slow-attempts", type=int, default=20,
                   help="messages the real client sends during the attack")
    p.add_argument("--stall-timeout", type=float, default=60.0,
                   help="give up waiting for the sink after this long without progress")
    p.add_argument("--curves", action="store_true",
                   help="also run the curves (bench/curves.py): PNG plots beside the report")
    p.add_argument("--curve-messages", type=int, default=3000,
                   help="messages per curve point (2 KB base load)")
    p.add_argument("--curve-bytes", type=int, default=200 * 2**20,
                   help="bytes of load per point of the message-size curve")
    p.add_argument("--big-points", default="10,50,200",
                   help="concurrent big messages, for the memory curve")
    p.add_argument("--profile", action="store_true",
                   help="run py-spy on the relay during its load (slows it; figures marked)")
    p.add_argument("--keep", action="store_true", help="keep the work directory")
    p.add_argument("--output", type=Path, help="results file (default bench/results/DATE.md)")
    args = p.parse_args(argv)
    args.targets = {t.strip() for t in args.targets.split(",") if t.strip()}
    args.big_points = [int(n) for n in args.big_points.split(",") if n.strip()]
    args.big_messages = [int(n) for n in str(args.big_messages).split(",") if n.strip()]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    for tool in (SINK, SOURCE):
        if not os.access(tool, os.X_OK):
            sys.exit(f"{tool} missing: run bench/run (it installs Debian postfix)")
    if args.profile and not (VENV_BIN / "py-spy").exists():
        sys.exit(f"--profile needs py-spy: {VENV_BIN}/pip install py-spy")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = max(args.idle_connections, args.slow_connections) + 1024
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(want, soft)), hard))
    started = dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    workdir = Path(tempfile.mkdtemp(prefix="policy-relay-bench-"))
    workdir.chmod(0o755)  # the postfix and nobody users must reach their directories
    log(f"work directory {workdir}")

    def on_signal(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_signal)
    mem = attack = None
    out = args.output or BENCH_DIR / "results" / (time.strftime("%Y-%m-%d-%H%M%S") + ".md")
    out.parent.mkdir(exist_ok=True)
    curve_text, curves_complete = "", True
    try:
        results = asyncio.run(run_loads(workdir, args))
        if not args.no_memory:
            log("memory: idle connections and concurrent big messages")
            mem = asyncio.run(memory(workdir, args))
        if args.slowloris:
            log(f"slowloris: {args.slow_connections} slow connections and a real client")
            attack = asyncio.run(slowloris(workdir, args))
        if args.curves:
            import curves  # beside this file; needs matplotlib (bench/run installs it)

            curve_text, curves_complete = curves.curves(workdir, args, out.with_suffix(""))
    finally:
        OWNED.stop_all()
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    text = report(results, mem, args, started) + slowloris_report(attack)
    if args.profile:
        text = text.replace("\n\n", "\n\n(py-spy attached to the relay: slower than usual)\n\n", 1)
    text += "\n" + curve_text if curve_text else ""
    print(text)
    out.write_text(text)
    (out.with_suffix(".json")).write_text(json.dumps(
        {"args": {k: (sorted(v) if isinstance(v, set) else str(v) if isinstance(v, Path) else v)
                  for k, v in vars(args).items()},
         "results": {k: [asdict(r) for r in v] for k, v in results.items()}, "memory": mem,
         "slowloris": attack},
        indent=1))
    log(f"results written to {out}")
    ok = all(r.complete for rs in results.values() for r in rs if r.seconds > 0)
    return 0 if ok and curves_complete else 1


if __name__ == "__main__":
    # curves.py and haraka.py `import bench`: make that this module, not a second copy
    # with its own list of processes to stop.
    sys.modules["bench"] = sys.modules[__name__]
    sys.exit(main())
