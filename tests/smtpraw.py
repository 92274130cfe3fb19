"""A socket-level SMTP client for the dialogs no SMTP library would send."""

from __future__ import annotations

import socket
import ssl
import time


class RawSMTP:
    """Send exact bytes, read whole replies (multi-line ones joined with "\\n")."""

    def __init__(self, port: int, source: str = "127.0.0.1", timeout: float = 5.0,
                 tls: ssl.SSLContext | None = None) -> None:
        self.sock: socket.socket = socket.create_connection(
            ("127.0.0.1", port), timeout=timeout, source_address=(source, 0)
        )
        if tls is not None:
            self.sock = tls.wrap_socket(self.sock, server_hostname="relay.test")
        self.buffer = b""

    def __enter__(self) -> RawSMTP:
        return self

    def __exit__(self, *exc: object) -> None:
        self.sock.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _line(self) -> bytes:
        while b"\r\n" not in self.buffer:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError(f"connection closed; unread: {self.buffer!r}")
            self.buffer += chunk
        line, _, self.buffer = self.buffer.partition(b"\r\n")
        return line

    def reply(self) -> str:
        lines = []
        while True:
            line = self._line().decode("utf-8")
            lines.append(line)
            if len(line) < 4 or line[3] == " ":
                return "\n".join(lines)

    def replies(self, count: int) -> list[str]:
        return [self.reply() for _ in range(count)]

    def chat(self, data: bytes, count: int = 1) -> list[str]:
        self.send(data)
        return self.replies(count)

    def closed(self, timeout: float = 5.0) -> bool:
        """True once the server has hung up (anything it still sends is discarded)."""
        deadline = time.monotonic() + timeout
        self.sock.settimeout(timeout)
        while time.monotonic() < deadline:
            try:
                if not self.sock.recv(65536):
                    return True
            except (ConnectionResetError, ssl.SSLError):
                return True
            except TimeoutError:
                return False
        return False

    def starttls(self, context: ssl.SSLContext) -> None:
        assert not self.buffer, f"plaintext left over: {self.buffer!r}"
        self.sock = context.wrap_socket(self.sock, server_hostname="relay.test")
