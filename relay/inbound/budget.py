"""The memory budget for message data held by the sessions of this process."""

from __future__ import annotations

from relay.workers.link import Link, LinkDown

# With workers, the hub lends each worker the budget in blocks of limit / LEASE_BLOCKS:
# a worker's sessions take from its loan without asking, so a small message costs no
# round trip to the supervisor (three per message made the hub a tenth of the relay's
# CPU). A worker keeps at most one spare block on loan; the rest goes back as soon as
# it is free, so what the other workers cannot have is a few blocks at most.
LEASE_BLOCKS = 64


class DataBudget:
    """Message bytes that the sessions of this process hold in memory at once.

    A DATA that would take it over `limit` is read to its end, kept nowhere, and
    answered "452 4.3.1" (RFC 5321 section 4.5.3.1.9): the client tries again later.
    The bytes count from the first chunk until the message is spooled or refused;
    what goes to disk past a large message's first part (relay/inbound/protocol.py,
    _Spill) is given back as it goes, so the budget bounds memory, not message sizes.
    With workers, `link` makes the budget global: the hub counts every worker's loan
    (LEASE_BLOCKS), and the sessions of a worker hold parts of its loan.
    """

    def __init__(self, limit: int, link: Link | None = None) -> None:
        self.limit = limit
        self.held = 0
        self.taken = 0  # bytes ever held: whether data went through since some moment
        self.link = link
        self.leased = 0  # of the global budget, lent to this worker by the hub
        self.block = max(1, limit // LEASE_BLOCKS)

    def __repr__(self) -> str:
        return f"<DataBudget {self.held}/{self.limit} leased={self.leased}>"

    @property
    def exhausted(self) -> bool:
        return self.held >= self.limit

    def take(self, size: int) -> bool:
        if self.held + size > self.limit:
            return False
        self._hold(size)
        return True

    async def full(self) -> bool:
        """exhausted, for the global budget when there is a hub."""
        if self.link is None:
            return self.exhausted
        if self.leased > self.held:
            return False
        try:
            return await self.link.full(self.limit)
        except LinkDown:
            return True

    async def reserve(self, size: int) -> bool:
        """take(), against the global budget when there is a hub."""
        if self.link is None:
            return self.take(size)
        # Other sessions may take from the loan while this one waits for the hub: ask
        # again until what is on loan covers this chunk too.
        while (short := self.held + size - self.leased) > 0:
            if not await self._borrow(short):
                return False
        self._hold(size)
        return True

    async def _borrow(self, short: int) -> bool:
        """Add at least `short` bytes to the loan: a block or more when the hub has it,
        else just `short`."""
        assert self.link is not None
        try:
            for amount in dict.fromkeys((max(short, self.block), short)):
                if await self.link.take(amount, self.limit):
                    self.leased += amount
                    return True
        except LinkDown:
            pass
        return False

    def _hold(self, size: int) -> None:
        self.held += size
        self.taken += size

    def release(self, size: int) -> None:
        self.held -= size
        spare = self.leased - self.held - self.block
        if self.link is not None and spare > 0:
            self.leased -= spare
            self.link.send("give", size=spare)
