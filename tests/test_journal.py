"""bridge.journal against a stand-in journald: a Unix datagram socket on a temporary path.

The real journald reads the same datagrams in tests/test_systemd.py.
"""

from __future__ import annotations

import array
import fcntl
import io
import logging
import os
import socket
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

from bridge import events, journal
from bridge.events import Event


def parse(datagram: bytes) -> dict[str, str]:
    """A native-protocol entry as a dict (a test's own reader of the format, after systemd's docs)."""
    fields: dict[str, str] = {}
    rest = datagram
    while rest:
        line, sep, after = rest.partition(b"\n")
        assert sep, f"unterminated field: {rest[:40]!r}"
        if b"=" in line:
            name, _, value = line.partition(b"=")
            rest = after
        else:
            name = line
            (size,) = struct.unpack("<Q", after[:8])
            value, rest = after[8:8 + size], after[8 + size:]
            assert rest[:1] == b"\n"
            rest = rest[1:]
        fields[name.decode()] = value.decode()
    return fields


class FakeJournal:
    """Receives entries as journald would, including those passed as a sealed memfd."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.settimeout(5)

    def receive(self) -> dict[str, str]:
        fds = array.array("i")
        data, ancillary, _, _ = self.sock.recvmsg(1 << 20, socket.CMSG_SPACE(fds.itemsize))
        for level, kind, payload in ancillary:
            if (level, kind) == (socket.SOL_SOCKET, socket.SCM_RIGHTS):
                fds.frombytes(payload[:len(payload) - len(payload) % fds.itemsize])
        if fds:
            assert data == b""
            fd = fds[0]
            try:
                seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
                assert seals & fcntl.F_SEAL_WRITE, "journald only takes a sealed memfd"
                data = os.pread(fd, os.fstat(fd).st_size, 0)
            finally:
                os.close(fd)
        return parse(data)


@pytest.fixture
def fake(tmp_path: Path) -> Iterator[FakeJournal]:
    box = FakeJournal(tmp_path / "journal.sock")
    yield box
    box.sock.close()


def logger_to(handler: logging.Handler) -> logging.Logger:
    log = logging.getLogger(f"tcpbridge.test-journal.{id(handler)}")
    log.propagate = False
    log.handlers[:] = [handler]
    log.setLevel(logging.DEBUG)
    return log


def handler_for(path: str, fallback: io.StringIO) -> journal.JournalHandler:
    stream = logging.StreamHandler(fallback)
    stream.setFormatter(logging.Formatter("FALLBACK %(message)s"))
    handler = journal.JournalHandler("tcpbridge-test", fallback=stream, path=path)
    handler.setFormatter(logging.Formatter("w1 %(message)s"))
    return handler


def test_a_marked_line_carries_its_message_id_and_facts(fake: FakeJournal) -> None:
    log = logger_to(handler_for(fake.path, io.StringIO()))
    facts = {**events.tunnel_facts("db", "a1b2c3", "127.0.0.1:5000", "ws://b/x"), "outcome": "clean",
             "bytes_up": 12, "duration_s": 0.25}
    log.info("tunnel %s closed", "a1b2c3", extra=events.mark(Event.TUNNEL_CLOSED, facts))
    entry = fake.receive()
    assert entry == {
        "MESSAGE": "w1 tunnel a1b2c3 closed", "PRIORITY": "6", "SYSLOG_IDENTIFIER": "tcpbridge-test",
        "MESSAGE_ID": "ba665e01949948f086ef673b46e5abf4", "TCPBRIDGE_TUNNEL": "db", "TCPBRIDGE_TUNNEL_ID": "a1b2c3",
        "TCPBRIDGE_PEER": "127.0.0.1:5000", "TCPBRIDGE_DESTINATION": "ws://b/x", "TCPBRIDGE_OUTCOME": "clean",
        "TCPBRIDGE_BYTES_UP": "12", "TCPBRIDGE_DURATION_S": "0.250",
    }


@pytest.mark.parametrize(("level", "priority"), [(logging.DEBUG, "7"), (logging.INFO, "6"),
                                                 (logging.WARNING, "4"), (logging.ERROR, "3")])
def test_priorities_are_syslogs(fake: FakeJournal, level: int, priority: str) -> None:
    logger_to(handler_for(fake.path, io.StringIO())).log(level, "x")
    entry = fake.receive()
    assert entry["PRIORITY"] == priority and "MESSAGE_ID" not in entry


def test_a_traceback_is_one_entry_with_newlines(fake: FakeJournal) -> None:
    log = logger_to(handler_for(fake.path, io.StringIO()))
    try:
        raise ValueError("boom\nsecond line")
    except ValueError:
        log.exception("it failed")
    message = fake.receive()["MESSAGE"]
    assert message.startswith("w1 it failed\nTraceback (most recent call last):")
    assert message.endswith("ValueError: boom\nsecond line")


def test_an_entry_too_large_for_a_datagram_goes_as_a_sealed_memfd(fake: FakeJournal) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as probe:  # a datagram may not exceed the send buffer
        limit = probe.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
    big = "y" * (limit + 4096)
    fallback = io.StringIO()
    logger_to(handler_for(fake.path, fallback)).warning("%s", big)
    assert fake.receive()["MESSAGE"] == "w1 " + big
    assert fallback.getvalue() == ""


def test_without_a_journal_every_line_goes_to_the_fallback(tmp_path: Path) -> None:
    fallback = io.StringIO()
    log = logger_to(handler_for(str(tmp_path / "no-journal.sock"), fallback))
    for index in range(50):
        log.info("line %d", index, extra=events.mark(Event.TUNNEL_OPENED, {"tunnel": "t"}))
    assert fallback.getvalue().splitlines() == [f"FALLBACK line {index}" for index in range(50)]


def test_encode_uses_the_binary_form_only_for_values_with_newlines() -> None:
    data = journal.encode([("A", "one"), ("B", "two\nlines"), ("C", "")])
    assert data == b"A=one\nB\n" + struct.pack("<Q", 9) + b"two\nlines\nC=\n"
    assert parse(data) == {"A": "one", "B": "two\nlines", "C": ""}
