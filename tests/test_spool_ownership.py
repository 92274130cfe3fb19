"""One owner per spool, and damage refused loudly: never two relays on one queue, never
new mail into a spool whose stored mail cannot be read."""

from __future__ import annotations

import logging
import os
import re
import shutil
import socket
import sqlite3
import time
from pathlib import Path

import aiosmtplib
import pytest
from conftest import RelayProcess, Sink, free_port, relay_config, run_cli

from relay.queue.spool import Envelope, Spool, SpoolBusy, SpoolDamaged, SpoolError

MESSAGE = b"From: a@example.test\r\nSubject: spool\r\n\r\n" + (b"y" * 70 + b"\r\n") * 40
COUNT = 200


async def store_messages(spool: Spool, count: int = COUNT) -> None:
    envelope = Envelope("a@example.test", ("b@dest.test",), "127.0.0.1", "h", "smtp",
                        received_at=time.time())
    for i in range(count):
        await spool.store(f"M{i:05d}", envelope, MESSAGE)


async def fill(directory: Path, count: int = COUNT) -> None:
    spool = Spool(directory)
    await spool.open()
    await store_messages(spool, count)
    await spool.close()


def damage_page_in_the_middle(database: Path) -> None:
    size = database.stat().st_size
    offset = (size // 2) // 4096 * 4096
    with database.open("r+b") as f:
        f.seek(offset)
        f.write(os.urandom(4096))


async def test_a_second_relay_on_the_same_spool_exits_and_the_first_keeps_serving(
    sink: Sink, start_relay, tmp_path: Path
):
    first = start_relay(sink.port)
    other_dir = tmp_path / "second"
    other_dir.mkdir()
    port = free_port()
    second = RelayProcess(other_dir, relay_config(sink.port, port, tmp_path / "spool"), port)
    second.start(wait=False)
    assert second.proc is not None
    assert second.proc.wait(timeout=15) == 75  # EX_TEMPFAIL
    log = second.log_text()
    assert first.proc is not None
    assert f"spool {tmp_path / 'spool'} is in use by process {first.proc.pid}; " in log
    assert "Traceback" not in log
    async with aiosmtplib.SMTP(hostname="127.0.0.1", port=first.port) as client:
        await client.sendmail("a@example.test", ["b@dest.test"], MESSAGE)
    assert len(sink.wait_messages(1)) == 1


async def test_the_lock_goes_with_its_holder(tmp_path: Path):
    spool = Spool(tmp_path / "spool")
    await spool.open()
    with pytest.raises(SpoolBusy, match=f"in use by process {os.getpid()}"):
        await Spool(tmp_path / "spool").open()
    await spool.close()
    again = Spool(tmp_path / "spool")
    await again.open()  # released on close (and by the kernel if the holder dies)
    await again.close()


@pytest.mark.parametrize("damage", ["overwritten page", "truncated", "overwritten header",
                                    "empty database with a WAL"])
async def test_a_damaged_spool_is_refused_at_open(tmp_path: Path, damage: str):
    directory = tmp_path / "spool"
    await fill(directory)
    database = directory / "spool.db"
    if damage == "overwritten page":
        damage_page_in_the_middle(database)
    elif damage == "truncated":
        os.truncate(database, database.stat().st_size // 2)
    elif damage == "overwritten header":
        with database.open("r+b") as f:
            f.write(os.urandom(100))
    else:
        (directory / "spool.db-wal").write_bytes(database.read_bytes()[:8192])
        os.truncate(database, 0)
    with pytest.raises(SpoolDamaged):
        await Spool(directory).open()


async def crashed_spool(directory: Path) -> tuple[bytes, bytes]:
    """The database and write-ahead log as a SIGKILL would leave them after COUNT
    messages were stored (each commit returned: each message got its 250). The
    messages' own files stay in `directory`/data."""
    spool = Spool(directory)
    await spool.open()
    await store_messages(spool)
    files = (directory / "spool.db").read_bytes(), (directory / "spool.db-wal").read_bytes()
    await spool.close()  # checkpoints and removes the log: put the crashed state back
    return files


def crashed_copy(target: Path, source: Path, database: bytes, wal: bytes) -> Path:
    target.mkdir()
    (target / "spool.db").write_bytes(database)
    (target / "spool.db-wal").write_bytes(wal)
    shutil.copytree(source / "data", target / "data")
    return target


def wal_frames(wal: bytes) -> tuple[int, int]:
    """(frames of the log's current generation, frame size): the frames after a
    checkpoint restarted the log carry new salts (sqlite.org/fileformat.html, 4.1)."""
    frame = 24 + int.from_bytes(wal[8:12], "big")
    salts, count = wal[16:24], 0
    while 32 + (count + 1) * frame <= len(wal) and wal[32 + count * frame + 8:][:8] == salts:
        count += 1
    return count, frame


def sqlite_alone_reads(directory: Path) -> int:
    db = sqlite3.connect(directory / "spool.db")
    try:
        return int(db.execute("SELECT count(*) FROM message").fetchone()[0])
    finally:
        db.close()


@pytest.mark.parametrize("damage", ["a frame in the middle", "the log header"])
async def test_a_damaged_wal_after_a_crash_is_refused_before_sqlite_drops_commits(
    tmp_path: Path, damage: str
):
    database, wal = await crashed_spool(tmp_path / "spool")
    frames, size = wal_frames(wal)
    damaged = bytearray(wal)
    if damage == "a frame in the middle":
        middle = 32 + frames // 2 * size + 1000
        damaged[middle:middle + 4096] = bytes(4096)
    else:
        damaged[20] ^= 0xFF  # the header's second salt
    for name in ("crashed", "as-sqlite-sees-it"):
        crashed_copy(tmp_path / name, tmp_path / "spool", database, bytes(damaged))
    # What the relay guards against: SQLite alone opens it and quietly drops commits.
    dropped = COUNT - sqlite_alone_reads(tmp_path / "as-sqlite-sees-it")
    assert dropped > 0
    with pytest.raises(SpoolDamaged, match=r"at least (\d+) committed transaction") as refused:
        await Spool(tmp_path / "crashed").open()
    # A lower bound: the damage may also reach the header of a commit frame.
    reported = re.search(r"at least (\d+) committed", str(refused.value))
    assert reported is not None and dropped - 1 <= int(reported.group(1)) <= dropped
    check = run_cli("spool", "check", str(tmp_path / "crashed"))
    assert check.returncode == 65, check.stdout + check.stderr
    assert "write-ahead log damaged at " in check.stdout
    assert f"readable messages: {COUNT - dropped}" in check.stdout


async def test_a_wal_torn_at_its_end_by_a_crash_opens_with_every_committed_message(
    tmp_path: Path,
):
    database, wal = await crashed_spool(tmp_path / "spool")
    frames, size = wal_frames(wal)
    # A commit whose fsync never returned (so no 250 was given): its last frame torn.
    torn = bytearray(wal[:32 + frames * size])
    torn[-100:] = bytes(100)
    directory = crashed_copy(tmp_path / "crashed", tmp_path / "spool", database, bytes(torn))
    spool = Spool(directory)
    await spool.open()
    try:
        assert await spool.count() == COUNT - 1
    finally:
        await spool.close()


async def test_the_relay_refuses_a_damaged_spool_with_one_line_and_exit_74(
    sink: Sink, tmp_path: Path
):
    await fill(tmp_path / "spool")
    damage_page_in_the_middle(tmp_path / "spool" / "spool.db")
    port = free_port()
    relay = RelayProcess(tmp_path, relay_config(sink.port, port, tmp_path / "spool"), port)
    relay.start(wait=False)
    assert relay.proc is not None
    assert relay.proc.wait(timeout=15) == 74  # EX_IOERR: a restart cannot fix it
    log = relay.log_text()
    assert "is damaged (" in log and "policy-relay spool salvage" in log
    assert "Traceback" not in log
    assert not relay.log_text().count("listening on")


async def test_check_and_salvage_recover_every_readable_message(sink: Sink, tmp_path: Path):
    spool = tmp_path / "spool"
    await fill(spool)
    damage_page_in_the_middle(spool / "spool.db")
    check = run_cli("spool", "check", str(spool))
    assert check.returncode == 65, check.stdout + check.stderr
    assert "damaged: " in check.stdout
    saved_dir = tmp_path / "salvaged"
    result = run_cli("spool", "salvage", str(spool), "--to", str(saved_dir))
    assert result.returncode == 0, result.stdout + result.stderr
    saved = int(result.stdout.split("salvaged: ")[1].split()[0])
    lost = int(result.stdout.split("unreadable: ")[1].split()[0])
    assert saved > 0 and saved + lost <= COUNT
    assert saved + lost >= COUNT - 30  # a 4 KB page holds at most a few rows
    # The salvaged spool is sound and a relay delivers what it holds.
    assert run_cli("spool", "check", str(saved_dir)).returncode == 0
    port = free_port()
    relay = RelayProcess(tmp_path, relay_config(sink.port, port, saved_dir), port).start()
    try:
        assert len(sink.wait_messages(saved, timeout=30)) == saved
    finally:
        relay.stop()


def test_salvage_refuses_a_target_that_is_not_empty(tmp_path: Path):
    (tmp_path / "spool").mkdir()
    (tmp_path / "spool" / "spool.db").write_bytes(b"")
    (tmp_path / "target").mkdir()
    (tmp_path / "target" / "x").write_text("keep")
    result = run_cli("spool", "salvage", str(tmp_path / "spool"), "--to", str(tmp_path / "target"))
    assert result.returncode == 65
    assert "not empty" in result.stderr
    assert (tmp_path / "target" / "x").read_text() == "keep"


# -- startup errors: one line each, with a sysexits status ---------------------------------


def test_a_port_in_use_is_one_line_and_exit_69(sink: Sink, tmp_path: Path):
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        relay = RelayProcess(tmp_path, relay_config(sink.port, port, tmp_path / "spool"), port)
        relay.start(wait=False)
        assert relay.proc is not None
        assert relay.proc.wait(timeout=15) == 69  # EX_UNAVAILABLE
    log = relay.log_text()
    assert f"cannot listen on 127.0.0.1:{port} (listener smtp): " in log
    assert "Traceback" not in log


def test_a_spool_directory_that_cannot_be_created_is_one_line_and_exit_73(
    sink: Sink, tmp_path: Path
):
    (tmp_path / "file").write_text("not a directory")
    port = free_port()
    relay = RelayProcess(tmp_path, relay_config(sink.port, port, tmp_path / "file" / "spool"),
                         port)
    relay.start(wait=False)
    assert relay.proc is not None
    assert relay.proc.wait(timeout=15) == 73  # EX_CANTCREAT
    log = relay.log_text()
    assert f"cannot create spool directory {tmp_path / 'file' / 'spool'}: Not a directory" in log
    assert "Traceback" not in log


# -- a condition is logged when it starts and when it ends ---------------------------------


class FullSpool(Spool):
    """A real spool whose commits fail while `full` is set (a full disk)."""

    full = False

    def _commit(self) -> None:
        if self.full:
            raise sqlite3.OperationalError("database or disk is full")
        super()._commit()


async def test_a_full_disk_is_logged_once_when_it_starts_and_once_when_it_ends(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
):
    spool = FullSpool(tmp_path / "spool")
    await spool.open()
    envelope = Envelope("a@example.test", ("b@dest.test",), "127.0.0.1", "h", "smtp")
    spool.full = True
    with caplog.at_level(logging.INFO, logger="relay.conditions"):
        for i in range(50):
            with pytest.raises(SpoolError):
                await spool.store(f"F{i}", envelope, MESSAGE)
        assert not spool.writable
        spool.full = False
        await spool.store("OK", envelope, MESSAGE)
    await spool.close()
    lines = [r.getMessage() for r in caplog.records if r.name == "relay.conditions"]
    assert len(lines) == 2
    assert lines[0].startswith(
        f"disk_full started: cannot write to the spool {tmp_path / 'spool'}: database or "
        "disk is full; new mail gets 451")
    assert re.fullmatch(r"disk_full ended after \d+s and 50 refused writes", lines[1])
    assert not any(r.exc_info for r in caplog.records)
    assert spool.writable


async def test_with_workers_a_second_relay_stops_instead_of_restarting_its_workers(
    sink: Sink, start_relay, tmp_path: Path
):
    first = start_relay(sink.port, extra="workers = 2")
    other_dir = tmp_path / "second"
    other_dir.mkdir()
    port = free_port()
    text = relay_config(sink.port, port, tmp_path / "spool", "workers = 2")
    second = RelayProcess(other_dir, text.replace(str(tmp_path / "control.sock"),
                                                  str(other_dir / "control.sock")), port)
    second.start(wait=False)
    assert second.proc is not None
    assert second.proc.wait(timeout=20) == 75
    log = second.log_text()
    assert "is in use by process" in log
    assert "could not start (exit status 75); stopping" in log
    assert "restarting it" not in log
    assert first.proc is not None and first.proc.poll() is None
