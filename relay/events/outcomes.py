"""The events of each outcome, built from what the code that decides it already holds."""

from __future__ import annotations

from dataclasses import replace

from relay.events.event import Event, new_event_id
from relay.queue.spool import Envelope, QueuedMessage


def received(queue_id: str, envelope: Envelope, message_id: str, size: int, rule: str,
             trace: list[str]) -> list[Event]:
    """A message stored (and held, when its rule said hold)."""
    event = Event("received", queue_id, envelope.sender, None, envelope.client_address,
                  envelope.sasl_username, envelope.listener, envelope.received_at, message_id,
                  details={"rule": rule, "size": size,
                           "recipients": list(envelope.recipients), "trace": trace},
                  time=envelope.received_at)
    if not envelope.hold:
        return [event]
    return [event, replace(event, type="held", details={"rule": rule, "by": "policy"},
                           id=new_event_id())]


def refused(stage: str, reply: str, rule: str, client_address: str, listener: str,
            sender: str | None, recipient: str | None, sasl_username: str) -> Event:
    """A command refused during the SMTP session: nothing was stored."""
    return Event("refused", "", sender, recipient, client_address, sasl_username, listener,
                 message_id="", details={"stage": stage, "rule": rule, "reply": reply})


def discarded(queue_id: str, envelope: Envelope, message_id: str, rule: str) -> Event:
    """A message taken and dropped by a discard rule: nothing was stored."""
    return Event("discarded", queue_id, envelope.sender, None, envelope.client_address,
                 envelope.sasl_username, envelope.listener, envelope.received_at,
                 message_id, details={"rule": rule,
                                      "recipients": list(envelope.recipients)})


def attempt(message: QueuedMessage, recipient: str, kind: str, reply: str, relay: str,
            tls: str, next_attempt: float, dsn: bool) -> Event:
    """One recipient's result: sent, deferred, bounced or expired."""
    details: dict[str, object] = {"reply": reply, "attempts": message.attempts + 1,
                                  "relay": relay}
    if kind == "sent":
        details["tls"] = tls
    elif kind == "deferred":
        details["next_attempt"] = next_attempt
    else:  # bounced or expired: whether a bounce goes to the sender
        details["dsn"] = dsn
    return Event(kind, message.id, message.sender, recipient, message.client_address,
                 message.sasl_username, message.listener, message.received_at,
                 details=details)


def operator(kind: str, message: QueuedMessage, by: str = "operator") -> Event:
    """held, released or deleted by an operator (or held by the relay itself)."""
    return Event(kind, message.id, message.sender, None, message.client_address,
                 message.sasl_username, message.listener, message.received_at,
                 details={"by": by, "recipients": [r.address for r in message.pending]})
