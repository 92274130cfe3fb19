"""The memory budget for message data held by the sessions of this process."""

from __future__ import annotations

from relay.workers.link import Link, LinkDown


class DataBudget:
    """Message bytes that the sessions of this process hold in memory at once.

    A DATA that would take it over `limit` is read to its end, kept nowhere, and
    answered "452 4.3.1" (RFC 5321 section 4.5.3.1.9): the client tries again later.
    The bytes count from the first chunk until the message is spooled or refused;
    what goes to disk past a large message's first part (relay/inbound/protocol.py,
    _Spill) is given back as it goes, so the budget bounds memory, not message sizes.
    With workers, `link` makes the budget global: the hub counts every worker's bytes.
    """

    def __init__(self, limit: int, link: Link | None = None) -> None:
        self.limit = limit
        self.held = 0
        self.taken = 0  # bytes ever held: whether data went through since some moment
        self.link = link

    def __repr__(self) -> str:
        return f"<DataBudget {self.held}/{self.limit}>"

    @property
    def exhausted(self) -> bool:
        return self.held >= self.limit

    def take(self, size: int) -> bool:
        if self.held + size > self.limit:
            return False
        self.held += size
        self.taken += size
        return True

    async def full(self) -> bool:
        """exhausted, for the global budget when there is a hub."""
        if self.link is None:
            return self.exhausted
        try:
            return await self.link.full(self.limit)
        except LinkDown:
            return True

    async def reserve(self, size: int) -> bool:
        """take(), against the global budget when there is a hub."""
        if self.link is None:
            return self.take(size)
        try:
            if not await self.link.take(size, self.limit):
                return False
        except LinkDown:
            return False
        self.held += size
        self.taken += size
        return True

    def release(self, size: int) -> None:
        if self.link is not None and size:
            self.link.send("give", size=size)
        self.held -= size
