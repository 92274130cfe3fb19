"""policy-relay: an SMTP relay proxy that applies policies and delivers through smarthosts."""

__version__ = "0.1.0"
