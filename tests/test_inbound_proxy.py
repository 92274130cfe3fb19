"""PROXY protocol v1 and v2 (as HAProxy sends it): the proxied address is the client."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import RelayProcess, Sink, free_port, relay_config, wait_until
from smtpraw import RawSMTP

pytestmark = pytest.mark.skipif(shutil.which("swaks") is None, reason="swaks is not installed")


@pytest.fixture(scope="module")
def relay_and_sink(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RelayProcess, Sink]]:
    directory: Path = tmp_path_factory.mktemp("proxy")
    sink = Sink()
    sink.start()
    port, untrusted = free_port(), free_port()
    text = relay_config(sink.port, port, directory / "spool",
                        'relay_networks = ["192.0.2.0/24"]\nmax_connections_per_client = 1')
    # The [listener.smtp] of relay_config, with PROXY on; and one that trusts no proxy here.
    text = text.replace(f'address = "127.0.0.1:{port}"\n',
                        f'address = "127.0.0.1:{port}"\nproxy_protocol = true\n')
    text += (f'\n[listener.untrusted]\naddress = "127.0.0.1:{untrusted}"\n'
             'proxy_protocol = true\nproxy_networks = ["198.51.100.0/24"]\n')
    relay = RelayProcess(directory, text, port).start()
    relay.untrusted_port = untrusted  # type: ignore[attr-defined]
    yield relay, sink
    relay.stop()
    sink.stop()


def swaks(port: int, *proxy: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["swaks", "--server", f"127.0.0.1:{port}", "--from", "app@example.test",
         "--to", "ops@dest.test", "--helo", "app.test", *proxy],
        capture_output=True, text=True, timeout=30,
    )


def proxy_args(version: str, source: str) -> list[str]:
    family = {"1": "TCP4", "2": "AF_INET"}[version]
    return ["--proxy-version", version, "--proxy-family", family, "--proxy-source", source,
            "--proxy-source-port", "40000", "--proxy-dest", "127.0.0.1",
            "--proxy-dest-port", "25"]


@pytest.mark.parametrize("version", ["1", "2"])
def test_the_allowlist_sees_the_proxied_address(relay_and_sink, version: str):
    relay, sink = relay_and_sink
    sink.handler.messages.clear()
    result = swaks(relay.port, *proxy_args(version, "192.0.2.7"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "<-  250 2.0.0 Ok: queued as" in result.stdout
    [got] = sink.wait_messages(1)
    assert b"Received: from app.test ([192.0.2.7])" in got.data
    assert "[127.0.0.1] is a proxy for [192.0.2.7]:40000" in relay.log_text()


@pytest.mark.parametrize("version", ["1", "2"])
def test_a_proxied_client_outside_the_allowlist_is_refused(relay_and_sink, version: str):
    relay, _ = relay_and_sink
    result = swaks(relay.port, *proxy_args(version, "203.0.113.9"))
    assert "<** 554 5.7.1 <ops@dest.test>: Relay access denied" in result.stdout
    assert "NOQUEUE: reject: RCPT from [203.0.113.9]: 554 5.7.1" in relay.log_text()


def test_connection_limits_count_the_proxied_address(relay_and_sink):
    relay, _ = relay_and_sink
    header = b"PROXY TCP4 192.0.2.8 127.0.0.1 40001 25\r\n"
    with RawSMTP(relay.port) as first:
        first.send(header)
        assert first.reply() == "220 relay.test ESMTP"
        with RawSMTP(relay.port) as second:  # the same proxied client: over its cap of 1
            second.send(header)
            assert second.reply() == "421 4.7.0 Too many connections, try again later"
        with RawSMTP(relay.port) as other:  # same proxy, another client: served
            other.send(header.replace(b"192.0.2.8", b"192.0.2.9"))
            assert other.reply() == "220 relay.test ESMTP"


def test_no_or_a_broken_proxy_header_closes_without_a_word(relay_and_sink):
    relay, _ = relay_and_sink
    for opening in (b"EHLO client.test\r\n", b"PROXY TCP4 999.1.1.1 127.0.0.1 1 25\r\n"):
        with RawSMTP(relay.port) as raw:
            raw.send(opening)
            assert raw.closed()
            assert raw.buffer == b""


def test_a_proxy_header_from_an_untrusted_peer_is_not_accepted(relay_and_sink):
    relay, _ = relay_and_sink
    with RawSMTP(relay.untrusted_port) as raw:
        raw.send(b"PROXY TCP4 192.0.2.7 127.0.0.1 40000 25\r\n")
        assert raw.closed()
    wait_until(lambda: "PROXY header not accepted from [127.0.0.1]" in relay.log_text())
