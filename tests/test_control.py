"""The control socket and the queue CLI, end to end against a real spool."""

from __future__ import annotations

import argparse
import asyncio
import grp
import json
import os
import shutil
import socket
import stat
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from relay.cli.queue import EX_UNAVAILABLE, add_queue_parser, run_queue_async
from relay.queue import control
from relay.queue.control import ControlError, ControlServer
from relay.queue.spool import Envelope, Outcome, Spool

NOW = time.time()
MESSAGE = b"From: a@example.com\r\nSubject: hello\r\n\r\nBody line\r\n"


@dataclass
class Setup:
    spool: Spool
    server: ControlServer
    path: Path
    wakes: list[float] = field(default_factory=list)


@pytest.fixture
def short_dir() -> Iterator[Path]:
    # AF_UNIX paths are limited to 108 bytes; pytest's tmp_path can be longer.
    directory = Path(tempfile.mkdtemp(prefix="pr-ctl-", dir="/tmp"))
    try:
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def envelope(sender: str, *rcpts: str, age: float, route: str = "default",
             hold: bool = False) -> Envelope:
    return Envelope(sender, rcpts, "127.0.0.1", "app1", "smtp",
                    received_at=NOW - age, route=route, hold=hold)


@pytest.fixture
async def setup(short_dir: Path) -> AsyncIterator[Setup]:
    spool = Spool(short_dir / "spool")
    await spool.open()
    # ACTIVE1: new, never tried.  DEFER1/DEFER2: tried, due later.  FAILED1: bounced.
    await spool.store("ACTIVE1", envelope("app@example.com", "u1@example.org", "u2@example.org",
                                          age=60), MESSAGE)
    await spool.store("DEFER1", envelope("app@example.com", "u3@example.org", age=15 * 60,
                                         route="bulk"), MESSAGE * 40)
    await spool.record_attempt("DEFER1", [Outcome(0, "pending", "451 4.4.1 upstream down")],
                               NOW + 600, "451 4.4.1 upstream down")
    await spool.store("DEFER2", envelope("app@example.com", "done@example.org",
                                         "later@example.org", age=30 * 60), MESSAGE)
    await spool.record_attempt(
        "DEFER2",
        [Outcome(0, "sent", "250 2.0.0 Ok"), Outcome(1, "pending", "452 4.2.2 mailbox full")],
        NOW + 900, "452 4.2.2 mailbox full",
    )
    await spool.store("FAILED1", envelope("", "gone@example.org", age=3 * 3600), MESSAGE)
    await spool.record_attempt("FAILED1", [Outcome(0, "failed", "550 5.1.1 no such user")],
                               NOW + 60, "550 5.1.1 no such user")
    path = short_dir / "run" / "control.sock"
    wakes: list[float] = []
    server = ControlServer(spool, lambda: wakes.append(time.time()), path, clock=lambda: NOW)
    result = Setup(spool, server, path, wakes)
    await server.start()
    try:
        yield result
    finally:
        await result.server.stop()
        await spool.close()


def parse(path: Path, *argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="policy-relay")
    add_queue_parser(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(["queue", "--control-socket", str(path), *argv])


async def cli(path: Path, capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    status = await run_queue_async(parse(path, *argv))
    out, err = capsys.readouterr()
    return status, out, err


async def states(spool: Spool) -> dict[str, str]:
    return {m.id: m.state for m in await spool.messages()}


# -- list ------------------------------------------------------------------------------


async def test_list_prints_the_queue_in_mailq_layout(
    setup: Setup, capsys: pytest.CaptureFixture[str]
) -> None:
    status, out, _ = await cli(setup.path, capsys, "list")
    assert status == 0
    lines = out.splitlines()
    assert lines[0] == ("-Queue ID-  --Size-- ----Arrival Time---- "
                        "-Sender/Recipient-------")
    arrival = time.asctime(time.localtime(NOW - 60))[:20]
    assert f"ACTIVE1   {len(MESSAGE):>9} {arrival} app@example.com" in lines
    assert " " * 41 + "u1@example.org" in lines
    # The reason sits right-aligned above its recipients, as showq prints it.
    reason = "(451 4.4.1 upstream down)"
    assert reason.rjust(78) in lines
    assert lines.index(reason.rjust(78)) + 1 == lines.index(" " * 41 + "u3@example.org")
    # Delivered recipients are not listed; the null sender shows as MAILER-DAEMON.
    assert " " * 41 + "done@example.org" not in lines
    assert " " * 41 + "later@example.org" in lines
    failed = next(line for line in lines if line.startswith("FAILED1"))
    assert failed[10] == "#" and failed.endswith("MAILER-DAEMON")
    total = (len(MESSAGE) * 43) // 1024
    assert lines[-1] == f"-- {total} Kbytes in 4 Requests."
    assert lines[-2] == ""


async def test_list_json_is_one_postqueue_object_per_line(
    setup: Setup, capsys: pytest.CaptureFixture[str]
) -> None:
    status, out, _ = await cli(setup.path, capsys, "list", "--json")
    assert status == 0
    records = {r["queue_id"]: r for r in map(json.loads, out.splitlines())}
    assert {k: r["queue_name"] for k, r in records.items()} == {
        "ACTIVE1": "active", "DEFER1": "deferred", "DEFER2": "deferred", "FAILED1": "failed",
    }
    assert records["DEFER1"]["recipients"] == [
        {"address": "u3@example.org", "state": "pending",
         "delay_reason": "451 4.4.1 upstream down"}
    ]
    assert records["DEFER1"]["arrival_time"] == int(NOW - 15 * 60)


async def test_empty_queue_says_so(
    setup: Setup, capsys: pytest.CaptureFixture[str]
) -> None:
    await cli(setup.path, capsys, "delete", "ALL")
    assert await cli(setup.path, capsys, "list") == (0, "Mail queue is empty\n", "")


# -- show ------------------------------------------------------------------------------


async def test_show_prints_envelope_states_and_body(
    setup: Setup, capsys: pytest.CaptureFixture[str]
) -> None:
    status, out, _ = await cli(setup.path, capsys, "show", "DEFER2", "--body")
    assert status == 0
    assert "queue: deferred" in out
    assert "recipient: <done@example.org> sent (250 2.0.0 Ok)" in out
    assert "recipient: <later@example.org> pending (452 4.2.2 mailbox full)" in out
    assert "*** MESSAGE CONTENTS DEFER2 ***\nFrom: a@example.com\r\nSubject: hello" in out
    status, out, _ = await cli(setup.path, capsys, "show", "ACTIVE1")
    assert "MESSAGE CONTENTS" not in out


async def test_show_unknown_id_exits_1(
    setup: Setup, capsys: pytest.CaptureFixture[str]
) -> None:
    status, out, err = await cli(setup.path, capsys, "show", "NOPE")
    assert (status, out) == (1, "")
    assert "NOPE: no such message" in err


# -- hold, release, flush --------------------------------------------------------------


async def test_hold_marks_the_message_and_release_makes_it_due_now(
    setup: Setup, capsys: pytest.CaptureFixture[str]
) -> None:
    status, out, _ = await cli(setup.path, capsys, "hold", "DEFER1")
    assert (status, out) == (0, "Placed on hold: 1 message\n")
    assert (await states(setup.spool))["DEFER1"] == "hold"
    _, listing, _ = await cli(setup.path, capsys, "list")
    assert any(line.startswith("DEFER1    !") for line in listing.splitlines())

    status, out, _ = await cli(setup.path, capsys, "release", "DEFER1")
    assert (status, out) == (0, "Released from hold: 1 message\n")
    message = await setup.spool.get("DEFER1")
    assert message is not None
    assert (message.state, message.next_attempt) == ("queued", NOW)
    assert len(setup.wakes) == 1


async def test_failed_messages_are_not_held_and_unknown_ids_exit_1(
    setup: Setup, capsys: pytest.CaptureFixture[str]
) -> None:
    status, out, err = await cli(setup.path, capsys, "hold", "FAILED1", "NOPE")
    assert status == 1
    assert out == "Placed on hold: 0 messages\n"
    assert "FAILED1: not placed on hold (message is failed)" in err
    assert "NOPE: no such message" in err
    assert (await states(setup.spool))["FAILED1"] == "failed"


async def test_flush_makes_every_queued_message_due_now_and_wakes_delivery(
    setup: Setup, capsys: pytest.CaptureFixture[str]
) -> None:
    status, out, _ = await cli(setup.path, capsys, "flush")
    assert (status, out) == (0, "Flushed: 3 messages\n")
    due = {m.id: m.next_attempt for m in await setup.spool.messages()}
    assert due["DEFER1"] == due["DEFER2"] == due["ACTIVE1"] == NOW
    assert due["FAILED1"] == NOW + 60  # failed messages are finished: untouched
    assert len(setup.wakes) == 1


async def test_flush_by_id_skips_held_messages(
    setup: Setup, capsys: pytest.CaptureFixture[str]
) -> None:
    await cli(setup.path, capsys, "hold", "DEFER2")
    status, out, err = await cli(setup.path, capsys, "flush", "DEFER1", "DEFER2")
    assert (status, out) == (0, "Flushed: 1 message\n")
    assert "DEFER2: not flushed (message is hold)" in err
    held = await setup.spool.get("DEFER2")
    assert held is not None and held.next_attempt == NOW + 900


# -- delete ----------------------------------------------------------------------------


async def test_delete_by_id(setup: Setup, capsys: pytest.CaptureFixture[str]) -> None:
    status, out, _ = await cli(setup.path, capsys, "delete", "ACTIVE1")
    assert (status, out) == (0, "Deleted: 1 message\n")
    assert "ACTIVE1" not in await states(setup.spool)


async def test_delete_all_deferred_removes_only_deferred_messages(
    setup: Setup, capsys: pytest.CaptureFixture[str]
) -> None:
    status, out, _ = await cli(setup.path, capsys, "delete", "ALL", "deferred")
    assert (status, out) == (0, "Deleted: 2 messages\n")
    assert sorted(await states(setup.spool)) == ["ACTIVE1", "FAILED1"]


async def test_lower_case_all_is_a_queue_id_and_deletes_nothing(
    setup: Setup, capsys: pytest.CaptureFixture[str]
) -> None:
    status, out, err = await cli(setup.path, capsys, "delete", "all")
    assert status == 1
    assert out == "Deleted: 0 messages\n"
    assert "all: no such message" in err
    assert len(await states(setup.spool)) == 4
    status, _, err = await cli(setup.path, capsys, "delete", "ALL", "everything")
    assert status == 2 and "usage: delete ALL" in err
    assert len(await states(setup.spool)) == 4


async def test_delete_all_empties_the_queue(
    setup: Setup, capsys: pytest.CaptureFixture[str]
) -> None:
    assert (await cli(setup.path, capsys, "delete", "ALL"))[:2] == (0, "Deleted: 4 messages\n")
    assert await setup.spool.count() == 0


# -- summary ---------------------------------------------------------------------------


async def test_summary_counts_by_queue_route_and_age(
    setup: Setup, capsys: pytest.CaptureFixture[str]
) -> None:
    status, out, _ = await cli(setup.path, capsys, "summary")
    assert status == 0
    lines = out.splitlines()
    assert lines[0].startswith("4 messages, ")
    assert lines[0].endswith("(active 1, deferred 2, hold 0, failed 1)")
    assert lines[2].split() == ["T", "5", "10", "20", "40", "80", "160", "160+"]
    # 1 min and 30 min and 3 h in default; 15 min in bulk.
    assert lines[3].split() == ["TOTAL", "4", "1", "0", "1", "1", "0", "0", "1"]
    assert lines[4].split() == ["bulk", "1", "0", "0", "1", "0", "0", "0", "0"]
    assert lines[5].split() == ["default", "3", "1", "0", "0", "1", "0", "0", "1"]


# -- the socket ------------------------------------------------------------------------


async def test_socket_is_0660_in_a_0750_directory(setup: Setup) -> None:
    assert stat.S_IMODE(setup.path.stat().st_mode) == 0o660
    assert stat.S_ISSOCK(setup.path.stat().st_mode)
    assert stat.S_IMODE(setup.path.parent.stat().st_mode) == 0o750


async def test_socket_group_is_set_when_configured(short_dir: Path) -> None:
    spool = Spool(short_dir / "spool")
    await spool.open()
    group = grp.getgrgid(os.getgid()).gr_name
    server = ControlServer(spool, lambda: None, short_dir / "c.sock", group=group)
    await server.start()
    try:
        assert (short_dir / "c.sock").stat().st_gid == os.getgid()
    finally:
        await server.stop()
        await spool.close()
    assert not (short_dir / "c.sock").exists()
    with pytest.raises(ControlError, match="does not exist"):
        await ControlServer(spool, lambda: None, short_dir / "d.sock",
                            group="no-such-group-here").start()


async def test_a_stale_socket_is_replaced_but_a_live_one_is_not(short_dir: Path) -> None:
    spool = Spool(short_dir / "spool")
    await spool.open()
    path = short_dir / "c.sock"
    with socket.socket(socket.AF_UNIX) as dead:
        dead.bind(str(path))  # bound, never listening: what a killed relay leaves
    server = ControlServer(spool, lambda: None, path)
    await server.start()
    try:
        answer = await control.request(path, {"op": "summary"})
        assert answer["ok"] and answer["total"] == 0
        with pytest.raises(ControlError, match="another relay"):
            await ControlServer(spool, lambda: None, path).start()
    finally:
        await server.stop()
        await spool.close()


async def test_malformed_requests_get_an_error_answer(setup: Setup) -> None:
    reader, writer = await asyncio.open_unix_connection(str(setup.path))
    try:
        for raw, error in ((b"not json\n", "not JSON"), (b'{"op": "explode"}\n', "unknown op"),
                           (b'{"op": "hold", "ids": "DEFER1"}\n', "ids must be a list")):
            writer.write(raw)
            answer = json.loads(await reader.readline())
            assert answer["ok"] is False and error in answer["error"]
    finally:
        writer.close()


async def test_no_relay_means_exit_69_with_a_clear_message(
    short_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    status, out, err = await cli(short_dir / "missing.sock", capsys, "list")
    assert (status, out) == (EX_UNAVAILABLE, "")
    assert "missing.sock" in err and "is policy-relay running?" in err
