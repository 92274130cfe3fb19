"""Intake: the SMTP protocol over aiosmtpd, the handler that answers each command, message
checks, connection limits, AUTH users, TLS and listener settings."""
