"""How cost grows with load: policy-relay against Postfix and Haraka, in the same run.

Each curve varies one thing from the base load (2 KB messages, 20 sessions, one
recipient) and runs every target on it, fresh: throughput and p99 final-dot latency
against concurrent sessions, message size, the relay's worker processes (Haraka's
cluster nodes alike; Postfix's process model has no such knob, so it is one point) and
recipients per message; then resident memory (all processes of the target together)
against idle connections and against concurrent 10 MB messages, as PSS (shared pages
counted once). Writes a PNG per curve and a Markdown table beside them. Run through
`bench/run --curves` (it installs what this needs).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no screen
import haraka
import matplotlib.pyplot as plt

import bench

KB, MB = 1024, 2**20
LOAD_TARGETS = ("postfix", "haraka", "relay")
STYLE = {"policy-relay": "tab:blue", "postfix": "tab:orange", "haraka": "tab:green"}


@dataclass
class Curve:
    name: str
    xlabel: str
    points: list[int]
    log_x: bool = False
    # label -> [(x, msg/s, p99 ms, CPU ms/msg, accepted == delivered)]
    series: dict[str, list[tuple[int, float, float | None, float | None, bool]]] = field(
        default_factory=dict)


def messages_for(size: int, budget: int) -> int:
    """As many messages as fit `budget` bytes of load, between 40 and 3,000."""
    return max(40, min(3000, budget // size))


def load_args(base: argparse.Namespace, **change: object) -> argparse.Namespace:
    args = argparse.Namespace(**vars(base))
    for key, value in change.items():
        setattr(args, key, value)
    return args


async def load_curve(workdir: Path, base: argparse.Namespace, curve: Curve) -> None:
    for x in curve.points:
        change: dict[str, object] = {}
        targets = LOAD_TARGETS
        if curve.name == "sessions":
            change = {"sessions": x}
        elif curve.name == "size":
            change = {"size": x, "messages": messages_for(x, base.curve_bytes)}
        elif curve.name == "recipients":
            change = {"recipients": x}
        elif curve.name == "workers":
            change = {"relay_workers": x, "haraka_nodes": x}
            targets = ("haraka", "relay") if x > 1 else LOAD_TARGETS
        args = load_args(base, **change)
        for target in targets:
            bench.log(f"curve {curve.name}={x}: {bench.TARGETS[target]} "
                      f"({args.messages} x {args.size} B, {args.sessions} sessions)")
            r = await bench.measure(target, workdir, f"{curve.name}-{x}", args)
            if not r.seconds:
                bench.log(f"  skipped: {r.notes}")
                continue
            per_msg = 1000 * r.relay_cpu / r.delivered if r.relay_cpu and r.delivered else None
            curve.series.setdefault(r.target, []).append(
                (x, r.rate, r.p99_ms, per_msg, r.complete))
            bench.log(f"  {r.rate:.0f} msg/s, p99 {bench.fmt(r.p99_ms, '.1f')} ms, "
                      f"{r.delivered}/{r.accepted}")


# -- memory ----------------------------------------------------------------------------

def tree_pss(pid: int) -> int:
    """Proportional set size of `pid` and its descendants, in bytes: each shared page
    counted once across them (summing RSS would count Postfix's shared libraries once
    per smtpd process, and the relay's forked workers' shared pages once per worker)."""
    total = 0
    for p in bench.process_tree(pid):
        with contextlib.suppress(OSError, ValueError):
            for line in Path(f"/proc/{p}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1]) * 1024
                    break
    return total


@contextlib.asynccontextmanager
async def target_process(target: str, workdir: Path, name: str, sink_port: int,
                         args: argparse.Namespace):  # type: ignore[no-untyped-def]
    """(pid whose process tree is the target, port) for a fresh target."""
    if target == "postfix":
        pf = bench.PostfixInstance(workdir / f"pf-{name}", sink_port)
        try:
            assert pf.master_pid is not None
            yield pf.master_pid, pf.port
        finally:
            pf.stop()
    elif target == "haraka":
        hk = haraka.HarakaInstance(workdir, name, sink_port)
        try:
            yield hk.pid, hk.port
        finally:
            hk.stop()
    else:
        relay = bench.Relay(workdir, name, sink_port, args)
        try:
            yield relay.pid, relay.port
        finally:
            relay.stop()


async def open_idle(port: int, n: int) -> tuple[list[asyncio.StreamWriter], int]:
    """Try n connections and leave them idle after EHLO. A server may not take them all
    (Postfix serves at most 100 sessions by default; the rest wait in its listen queue
    until that is full): a connection not made, or not greeted, within 5 s is left as it
    is. Returns the open connections and how many of them were greeted."""
    writers: list[asyncio.StreamWriter] = []
    greeted = 0

    async def one(i: int) -> None:
        nonlocal greeted
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(bench.LOOPBACK, port), 5)
        except (TimeoutError, OSError):
            return
        writers.append(writer)
        try:
            await asyncio.wait_for(reader.readline(), 5)
            writer.write(f"EHLO idle{i}.bench.test\r\n".encode())
            while True:
                line = await asyncio.wait_for(reader.readline(), 5)
                if not line or line[3:4] == b" ":
                    break
            greeted += 1
        except (TimeoutError, OSError):
            pass

    for start in range(0, n, 100):
        await asyncio.gather(*(one(i) for i in range(start, min(n, start + 100))))
    return writers, greeted


async def memory_idle(workdir: Path, args: argparse.Namespace, points: list[int],
                      series: dict[str, list[tuple[int, float, str]]]) -> None:
    for target in LOAD_TARGETS:
        if target == "haraka" and not haraka.available():
            continue
        label = bench.TARGETS[target]
        sink = bench.Sink(workdir, f"idle-{target}")
        try:
            async with target_process(target, workdir, f"idle-{target}", sink.port,
                                      args) as (pid, port):
                await asyncio.sleep(1.0)
                for n in points:
                    writers, greeted = await open_idle(port, n)
                    await asyncio.sleep(1.5)
                    rss = tree_pss(pid) / MB
                    note = "" if greeted == n else f"{len(writers)} open, {greeted} greeted"
                    series.setdefault(label, []).append((n, rss, note))
                    bench.log(f"memory idle={n}: {label} {rss:.0f} MB {note}")
                    for w in writers:
                        w.close()
                    await asyncio.sleep(1.0)
        finally:
            sink.stop()


async def memory_big(workdir: Path, args: argparse.Namespace, points: list[int],
                     series: dict[str, list[tuple[int, float, str]]]) -> None:
    for target in LOAD_TARGETS:
        if target == "haraka" and not haraka.available():
            continue
        label = bench.TARGETS[target]
        for n in points:
            sink = bench.Sink(workdir, f"big-{target}-{n}")
            try:
                async with target_process(target, workdir, f"big-{target}-{n}", sink.port,
                                          args) as (pid, port):
                    await asyncio.sleep(1.0)
                    rest = tree_pss(pid)
                    peak = [rest]
                    stop = asyncio.Event()

                    async def sample(pid: int = pid, peak: list[int] = peak,
                                     stop: asyncio.Event = stop) -> None:
                        while not stop.is_set():
                            peak[0] = max(peak[0], tree_pss(pid))
                            await asyncio.sleep(0.05)

                    sampler = asyncio.create_task(sample())
                    ok, errors = await bench.big_messages(port, n, args.big_size)
                    deadline = time.perf_counter() + 300
                    while time.perf_counter() < deadline and sink.count() < ok:
                        await asyncio.sleep(0.05)
                    stop.set()
                    await sampler
                    note = "" if ok == n else f"{ok}/{n} accepted"
                    if bench.BIG_RETRIES[0]:
                        note += (f" {bench.BIG_RETRIES[0]} tries answered 4xx "
                                 f"({bench.big_replies()})")
                    series.setdefault(label, []).append((n, peak[0] / MB, note.strip()))
                    bench.log(f"memory big={n}: {label} peak {peak[0] / MB:.0f} MB "
                              f"(rest {rest / MB:.0f} MB) {note} {errors[:1]}")
            finally:
                sink.stop()


# -- plots and report ------------------------------------------------------------------

def plot_load(curve: Curve, out: Path, stamp: str) -> Path:
    fig, (ax_rate, ax_p99) = plt.subplots(1, 2, figsize=(11, 4))
    for label, pts in curve.series.items():
        pts = sorted(pts)
        xs = [p[0] for p in pts]
        kw = {"marker": "o", "label": label, "color": STYLE.get(label)}
        ax_rate.plot(xs, [p[1] for p in pts], **kw)
        ax_p99.plot(xs, [p[2] if p[2] is not None else float("nan") for p in pts], **kw)
    for ax, ylabel in ((ax_rate, "messages/s (end to end)"), (ax_p99, "p99 final-dot ms")):
        ax.set_xlabel(curve.xlabel)
        ax.set_ylabel(ylabel)
        if curve.log_x:
            ax.set_xscale("log")
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.suptitle(f"{curve.xlabel} ({stamp})")
    return save(fig, out, f"curve-{curve.name}")


def plot_memory(name: str, xlabel: str, series: dict[str, list[tuple[int, float, str]]],
                out: Path, stamp: str) -> Path:
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, pts in series.items():
        pts = sorted(pts)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label,
                color=STYLE.get(label))
    ax.set_xlabel(xlabel)
    ax.set_ylabel("memory, all processes (PSS, MB)")
    ax.grid(True, alpha=0.3)
    ax.legend()
    ax.set_title(f"{xlabel} ({stamp})")
    return save(fig, out, f"memory-{name}")


def save(fig: plt.Figure, out: Path, name: str) -> Path:
    """The figure as a PNG beside the report (`out`: its path without suffix)."""
    fig.tight_layout()
    path = out.parent / f"{out.name}-{name}.png"
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def table(curve: Curve) -> list[str]:
    labels = list(curve.series)
    lines = [f"| {curve.xlabel} | " + " | ".join(
        f"{label} msg/s | {label} p99 ms" for label in labels) + " |",
        "|---|" + "---|---|" * len(labels)]
    for x in curve.points:
        cells = []
        for label in labels:
            found = [p for p in curve.series[label] if p[0] == x]
            if not found:
                cells += ["-", "-"]
                continue
            _, rate, p99, _, complete = found[0]
            cells += [f"{rate:.0f}{'' if complete else ' (INCOMPLETE)'}",
                      bench.fmt(p99, ".1f")]
        lines.append(f"| {x} | " + " | ".join(cells) + " |")
    return lines


def memory_table(xlabel: str, series: dict[str, list[tuple[int, float, str]]]) -> list[str]:
    labels = list(series)
    xs = sorted({p[0] for pts in series.values() for p in pts})
    lines = [f"| {xlabel} | " + " | ".join(f"{label} MB" for label in labels) + " |",
             "|---|" + "---|" * len(labels)]
    for x in xs:
        cells = []
        for label in labels:
            found = [p for p in series[label] if p[0] == x]
            cells.append(f"{found[0][1]:.0f}" + (f" ({found[0][2]})" if found and found[0][2]
                                                 else "") if found else "-")
        lines.append(f"| {x} | " + " | ".join(cells) + " |")
    return lines


def curves(workdir: Path, args: argparse.Namespace, out: Path) -> tuple[str, bool]:
    """Run every curve; write the PNGs beside `out` (the report's path without suffix);
    return (Markdown, all complete)."""
    stamp = time.strftime("%Y-%m-%d")
    cores = os.cpu_count() or 1
    load = [
        Curve("sessions", "concurrent sessions", [1, 5, 20, 100], log_x=True),
        Curve("size", "message size (bytes)", [KB, 100 * KB, MB, 10 * MB], log_x=True),
        Curve("workers", "relay workers (Haraka nodes)", list(range(1, cores + 1))),
        Curve("recipients", "recipients per message", [1, 5, 20]),
    ]
    base = load_args(args, messages=args.curve_messages, size=2048, sessions=20,
                     recipients=1, relay_workers=None, haraka_nodes=0)
    idle: dict[str, list[tuple[int, float, str]]] = {}
    big: dict[str, list[tuple[int, float, str]]] = {}

    async def run_all() -> None:
        for curve in load:
            await load_curve(workdir, base, curve)
        await memory_idle(workdir, base, [0, 250, 500, 1000], idle)
        await memory_big(workdir, base, args.big_points, big)

    asyncio.run(run_all())
    L = ["## Curves", "",
         f"Each point is one fresh run of each target; base load {args.curve_messages} "
         "messages of 2 KB, 20 sessions, 1 recipient; the relay on its shipped defaults "
         "except the knob varied. Message counts per size: "
         + ", ".join(f"{s} B: {messages_for(s, args.curve_bytes)}" for s in load[1].points)
         + f". {haraka.NOTE}. Haraka {haraka.version()}.", ""]
    complete = True
    for curve in load:
        path = plot_load(curve, out, stamp)
        L += [f"### {curve.xlabel}", "", f"![{curve.xlabel}]({path.name})", ""]
        L += [*table(curve), ""]
        complete &= all(p[4] for pts in curve.series.values() for p in pts)
    for name, xlabel, series in (
            ("idle", "idle connections", idle),
            ("big", f"concurrent {args.big_size // MB} MB messages (peak)", big)):
        path = plot_memory(name, xlabel, series, out, stamp)
        L += [f"### memory: {xlabel}", "", f"![{xlabel}]({path.name})", ""]
        L += [*memory_table(xlabel, series), ""]
    return "\n".join(L) + "\n", complete
