"""Group commit in the spool: new messages and delivery results share one durable commit,
and one write that fails is undone alone."""

from __future__ import annotations

import asyncio
import errno
import os
from pathlib import Path

import pytest

from relay.queue.spool import GATHER_PASSES, Envelope, Outcome, Spool, SpoolError

MESSAGE = b"From: a@example.test\r\nSubject: commit\r\n\r\nbody\r\n"


def envelope(*recipients: str) -> Envelope:
    return Envelope(sender="a@example.test", recipients=recipients,
                    client_address="127.0.0.1", helo="client.test", listener="smtp",
                    received_at=1000.0)


async def test_results_and_new_messages_written_together_share_one_commit(tmp_path: Path):
    spool = Spool(tmp_path)
    await spool.open()
    try:
        await spool.store("A", envelope("x@dest.test", "y@dest.test"), MESSAGE)
        await spool.store("B", envelope("z@dest.test"), MESSAGE)
        before = spool.commits
        states = await asyncio.gather(
            spool.record_attempt("A", [Outcome(0, "sent", "250 ok"),
                                       Outcome(1, "pending", "451 later")], 2000.0, "451 later"),
            spool.record_attempt("B", [Outcome(0, "sent", "250 ok")], 2000.0, ""),
            spool.store("C", envelope("w@dest.test"), MESSAGE),
            spool.store("D", envelope("v@dest.test"), MESSAGE),
        )
        assert states[:2] == ["queued", None]
        assert [list(stored) for stored in states[2:]] == [["C"], ["D"]]
        assert spool.commits - before == 1
        # Each result is what its own transaction would have stored.
        a = await spool.get("A")
        assert a is not None and a.attempts == 1 and a.next_attempt == 2000.0
        assert [r.state for r in a.recipients] == ["sent", "pending"]
        assert await spool.get("B") is None  # every recipient sent: removed
        assert sorted(m.id for m in await spool.messages()) == ["A", "C", "D"]
        due = await spool.due(3000.0, 10, exclude=["C"])
        assert [m.id for m, _ in due] == ["D", "A"]
        assert [await spool.data(m.id) for m, _ in due] == [MESSAGE, MESSAGE]
        # Small messages live in their rows: no file of their own, no fsync of their own.
        assert [content.data for _, content in due] == [MESSAGE, MESSAGE]
        assert not any((tmp_path / "data").iterdir())
    finally:
        await spool.close()


async def test_writes_that_keep_arriving_pass_after_pass_wait_for_one_commit(tmp_path: Path):
    """Under load, sessions finish DATA in successive passes of the event loop: the commit
    waits while each pass brings more (a bounded number of passes), so they share one."""
    spool = Spool(tmp_path)
    await spool.open()
    try:
        await spool.store("A", envelope("x@dest.test"), MESSAGE)
        before = spool.commits

        async def arriving(queue_id: str, passes: int) -> None:
            for _ in range(passes):
                await asyncio.sleep(0)
            await spool.store(queue_id, envelope("y@dest.test"), MESSAGE)

        await asyncio.gather(*(arriving(f"B{n}", n) for n in range(GATHER_PASSES)))
        assert spool.commits - before == 1
        # A write alone is held back one pass, not GATHER_PASSES: its own commit.
        await spool.store("C", envelope("z@dest.test"), MESSAGE)
        assert spool.commits - before == 2
    finally:
        await spool.close()


async def test_a_write_that_fails_inside_a_group_commit_fails_alone(tmp_path: Path):
    spool = Spool(tmp_path)
    await spool.open()
    try:
        await spool.store("A", envelope("x@dest.test"), MESSAGE)
        results = await asyncio.gather(
            spool.store("B", envelope("y@dest.test"), MESSAGE),
            spool.store("A", envelope("again@dest.test"), b"other"),  # duplicate id
            spool.store("C", envelope("z@dest.test"), MESSAGE),
            return_exceptions=True,
        )
        assert list(results[0]) == ["B"] and list(results[2]) == ["C"]
        assert isinstance(results[1], SpoolError)
        assert sorted(m.id for m in await spool.messages()) == ["A", "B", "C"]
        a = await spool.get("A")
        assert a is not None and [r.address for r in a.recipients] == ["x@dest.test"]
        assert await spool.data("A") == MESSAGE
    finally:
        await spool.close()


async def test_a_stored_message_survives_reopening(tmp_path: Path):
    spool = Spool(tmp_path)
    await spool.open()
    await spool.store("A", envelope("x@dest.test"), MESSAGE)
    await spool.close()
    again = Spool(tmp_path)
    await again.open()
    try:
        assert await again.data("A") == MESSAGE
        with pytest.raises(SpoolError):
            await again.data("missing")
    finally:
        await again.close()


@pytest.mark.parametrize("kernel_copies", [None, 1000])
async def test_a_large_message_file_is_its_parts_then_its_tail(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kernel_copies: int | None
):
    """The tail is copied by the kernel (copy_file_range); where the kernel refuses
    (another file system, an old kernel) after copying some or nothing, the rest is
    copied a piece at a time from where it stopped."""
    tail = tmp_path / "tail"
    tail.write_bytes(bytes(range(256)) * 4096)  # 1 MiB
    if kernel_copies is not None:
        real = os.copy_file_range
        done = []

        def refusing(src: int, dst: int, count: int) -> int:
            if done:
                raise OSError(errno.EXDEV, "Invalid cross-device link")
            done.append(real(src, dst, kernel_copies))
            return done[0]

        monkeypatch.setattr(os, "copy_file_range", refusing)
    spool = Spool(tmp_path / "spool")
    await spool.open()
    try:
        contents = await spool.store("A", envelope("x@dest.test"),
                                     (b"Received: ours\r\n", MESSAGE), tail)
        assert contents["A"].path is not None
        assert contents["A"].path.read_bytes() == (
            b"Received: ours\r\n" + MESSAGE + tail.read_bytes())
        assert contents["A"].size == contents["A"].path.stat().st_size
    finally:
        await spool.close()
