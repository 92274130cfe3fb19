"""The memory budget for message data held by the sessions of this process."""

from __future__ import annotations


class DataBudget:
    """Message bytes that the sessions of this process hold in memory at once.

    A DATA that would take it over `limit` is read to its end, kept nowhere, and
    answered "452 4.3.1" (RFC 5321 section 4.5.3.1.9): the client tries again later.
    The bytes count from the first chunk until the message is spooled or refused.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.held = 0

    def __repr__(self) -> str:
        return f"<DataBudget {self.held}/{self.limit}>"

    @property
    def exhausted(self) -> bool:
        return self.held >= self.limit

    def take(self, size: int) -> bool:
        if self.held + size > self.limit:
            return False
        self.held += size
        return True

    def release(self, size: int) -> None:
        self.held -= size
