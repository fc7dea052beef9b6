"""Websocket frames (RFC 6455 section 5.2), built and parsed here for both daemons, free of any I/O.

The libraries' generic paths (pure-Python masking in websocket-client, frame serialisation copies
and per-frame event machinery in wsproto) were most of the CPU of a bulk transfer, and then most of
what a small message or a connection cost; so :class:`FrameParser` splits what one ``recv``
brought into frames in place, client frames are masked with numpy when it is installed (the
``fast`` extra), and a frame is built in one buffer. What the frames carry (hex or binary messages,
the markers) is :mod:`bridge.protocol`'s.
"""

from __future__ import annotations

import os
import struct
from typing import Any, Final, NamedTuple

from bridge.protocol import CloseCode, ProtocolViolation

OPCODE_TEXT: Final = 0x1
OPCODE_BINARY: Final = 0x2
_FIN: Final = 0x80
_MASKED: Final = 0x80

_numpy: Any
# numpy's BLAS starts a thread per CPU on import, which spin while waiting for work; we only XOR.
# One thread: measured 2.4% less wall and 6% less user CPU on a 1 GiB transfer each way.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
try:  # optional acceleration: pip install tcpbridge[fast]
    import numpy as _numpy
except ImportError:  # pragma: no cover - exercised where numpy is absent
    _numpy = None


OPCODE_CONTINUATION: Final = 0x0
OPCODE_CLOSE: Final = 0x8
OPCODE_PING: Final = 0x9
OPCODE_PONG: Final = 0xA
_OPCODES: Final = frozenset({OPCODE_CONTINUATION, OPCODE_TEXT, OPCODE_BINARY, OPCODE_CLOSE, OPCODE_PING, OPCODE_PONG})
#: Compact the parser's buffer once this much of its front has been consumed.
_COMPACT_AFTER: Final = 256 * 1024
#: A frame whose payload is at least this large and not all received yet is read into a buffer of its own
#: (:meth:`FrameParser.payload_space`): its bytes are copied once, not once per read that brought them.
LARGE_PAYLOAD: Final = 16 * 1024


class Frame(NamedTuple):
    """One received frame: its opcode, its FIN bit and its (unmasked) payload.

    A tuple, not a frozen dataclass: one is made per frame, and a frozen dataclass's
    ``__init__`` costs a microsecond of attribute setting.
    """

    opcode: int
    fin: bool
    payload: bytes


class FrameParser:
    """Splits the bytes one websocket endpoint receives into frames (RFC 6455 section 5.2).

    ``masked``: the frames come from a client, so each must be masked (and is
    unmasked here); otherwise from a server, which must not mask.

    Contract: :meth:`feed` appends received bytes; :meth:`next_frame` returns the
    next complete frame, or None until more bytes arrive. It raises
    :class:`ProtocolViolation`, after which the parser is unusable:

    * 1002 for reserved bits set (no extension is ever negotiated), an unknown
      opcode, masking that does not match ``masked``, a control frame that is
      fragmented or longer than 125 bytes, a 64-bit length with its top bit set, a length not in its
      shortest form (RFC 6455 section 5.2: "the minimal number of bytes MUST be used");
    * 1009 for a data frame whose declared length exceeds ``max_payload``, as
      soon as the header arrives: memory stays bounded by ``max_payload`` plus
      one read.

    Messages (continuation frames) are the caller's to reassemble.

    A large frame that is still arriving (:data:`LARGE_PAYLOAD` or more) gets a buffer of its own:
    while :meth:`payload_space` returns one, the caller may read into it and report the count with
    :meth:`payload_filled` instead of feeding (one copy of each byte, where reads that end inside
    frames would otherwise copy them again and again). :meth:`feed` works throughout.
    """

    def __init__(self, max_payload: int, *, masked: bool = False) -> None:
        self.max_payload = max_payload
        self.masked = masked
        # What one recv brought is parsed in place (no copy); only bytes left over
        # from a frame that is not complete yet go into a bytearray to grow.
        self._buffer: bytes | bytearray = b""
        self._offset = 0
        # The large frame being read into its own buffer: payload, bytes in it so far, opcode, FIN, mask key.
        self._large: bytearray | None = None
        self._large_filled = 0
        self._large_frame: tuple[int, bool, bytes] = (0, False, b"")

    def feed(self, data: bytes) -> None:
        if self._large is not None:
            taken = min(len(data), len(self._large) - self._large_filled)
            self._large[self._large_filled:self._large_filled + taken] = memoryview(data)[:taken]
            self._large_filled += taken
            if taken == len(data):
                return
            data = data[taken:]
        buffer, offset = self._buffer, self._offset
        if offset >= len(buffer):
            self._buffer, self._offset = data, 0
        elif isinstance(buffer, bytearray):
            buffer += data
        else:
            rest = bytearray(memoryview(buffer)[offset:])
            rest += data
            self._buffer, self._offset = rest, 0

    def payload_space(self) -> memoryview | None:
        """Where the next read should go: the unfilled rest of a large frame's payload, or None (then
        :meth:`feed`). Report what was read into it with :meth:`payload_filled`."""
        if self._large is None:
            return None
        return memoryview(self._large)[self._large_filled:]

    def payload_filled(self, count: int) -> None:
        """``count`` bytes were read into the space :meth:`payload_space` gave."""
        assert self._large is not None and 0 <= count <= len(self._large) - self._large_filled
        self._large_filled += count

    def next_frame(self) -> Frame | None:
        if self._large is not None:
            return self._finish_large() if self._large_filled == len(self._large) else None
        buffer, pos = self._buffer, self._offset
        available = len(buffer) - pos
        if available < 2:
            return None
        first, second = buffer[pos], buffer[pos + 1]
        opcode, fin = first & 0x0F, bool(first & _FIN)
        if first & 0x70:
            raise ProtocolViolation(CloseCode.PROTOCOL_ERROR, "reserved bits set (no extension was negotiated)")
        if opcode not in _OPCODES:
            raise ProtocolViolation(CloseCode.PROTOCOL_ERROR, f"unknown opcode {opcode:#x}")
        if bool(second & _MASKED) != self.masked:
            raise ProtocolViolation(CloseCode.PROTOCOL_ERROR, "unmasked frame from the client" if self.masked
                                    else "masked frame from the server")
        length, head = second & 0x7F, 2
        if opcode >= OPCODE_CLOSE and (not fin or length > 125):  # known from the first two bytes
            raise ProtocolViolation(CloseCode.PROTOCOL_ERROR, "fragmented or oversized control frame")
        if length == 126:
            if available < 4:
                return None
            length, head = int.from_bytes(buffer[pos + 2:pos + 4], "big"), 4
            if length < 126:
                raise ProtocolViolation(CloseCode.PROTOCOL_ERROR, "frame length not in its shortest form")
        elif length == 127:
            if available < 10:
                return None
            length, head = int.from_bytes(buffer[pos + 2:pos + 10], "big"), 10
            if length >> 63:
                raise ProtocolViolation(CloseCode.PROTOCOL_ERROR, "frame length with the top bit set")
            if length < 65536:
                raise ProtocolViolation(CloseCode.PROTOCOL_ERROR, "frame length not in its shortest form")
        if opcode < OPCODE_CLOSE and length > self.max_payload:
            raise ProtocolViolation(CloseCode.MESSAGE_TOO_BIG,
                                    f"message larger than max_message_bytes ({self.max_payload})")
        key_at, head = pos + head, head + (4 if self.masked else 0)
        end = pos + head + length
        if len(buffer) < end:
            if length >= LARGE_PAYLOAD and len(buffer) >= pos + head:  # the header, mask key included, is here
                self._start_large(opcode, fin, bytes(buffer[key_at:key_at + 4]) if self.masked else b"",
                                  pos + head, length)
            return None
        if self.masked and end > pos + head:
            with memoryview(buffer) as view:  # unmasked straight out of the buffer: one pass, no copy first
                payload = mask(view[pos + head:end], bytes(buffer[key_at:key_at + 4]))
        elif isinstance(buffer, bytes):
            payload = buffer[pos + head:end]
        else:
            with memoryview(buffer) as view:
                payload = bytes(view[pos + head:end])
        self._consumed(end)
        return Frame(opcode, fin, payload)

    def _start_large(self, opcode: int, fin: bool, key: bytes, start: int, length: int) -> None:
        """Move the payload begun at ``start`` of the buffer (all the buffer holds) into its own buffer."""
        large = bytearray(length)
        have = len(self._buffer) - start
        large[:have] = memoryview(self._buffer)[start:]
        self._large, self._large_filled, self._large_frame = large, have, (opcode, fin, key)
        self._buffer, self._offset = b"", 0

    def _finish_large(self) -> Frame:
        payload, (opcode, fin, key) = self._large, self._large_frame
        assert payload is not None
        self._large = None
        if self.masked:
            mask_in_place(payload, key)
        return Frame(opcode, fin, bytes(payload))

    def _consumed(self, end: int) -> None:
        buffer = self._buffer
        if end == len(buffer):
            self._buffer, self._offset = b"", 0
        elif end > _COMPACT_AFTER and isinstance(buffer, bytearray):
            del buffer[:end]
            self._offset = 0
        else:
            self._offset = end


def close_payload(code: int, reason: str) -> bytes:
    """The payload of a close frame: status code, then at most 123 bytes of UTF-8 reason."""
    return struct.pack("!H", code) + reason.encode("utf-8", "replace")[:123]


def parse_close_payload(payload: bytes) -> tuple[int, str]:
    """Return (code, reason) of a close frame's payload; 1005 when it carries no code."""
    if len(payload) < 2:
        return 1005, ""
    (code,) = struct.unpack("!H", payload[:2])
    return code, payload[2:].decode("utf-8", "replace")


def frame_header(opcode: int, length: int, mask_key: bytes = b"") -> bytes:
    """The header of a single unfragmented frame (FIN set), with ``mask_key`` if given."""
    masked = _MASKED if mask_key else 0
    if length < 126:
        head = bytes((_FIN | opcode, masked | length))
    elif length < 65536:
        head = bytes((_FIN | opcode, masked | 126)) + length.to_bytes(2, "big")
    else:
        head = bytes((_FIN | opcode, masked | 127)) + length.to_bytes(8, "big")
    return head + mask_key


def mask(payload: bytes | memoryview, key: bytes) -> bytes:
    """XOR ``payload`` with the 4-byte ``key`` repeated (masking and unmasking are the same)."""
    if _numpy is not None and len(payload) >= 1024:  # below, numpy's call overhead costs more than it saves
        out = _numpy.empty(len(payload), dtype=_numpy.uint8)
        _mask_into(out, payload, key)
        return bytes(out.data)
    return mask_pure(payload, key)


def mask_pure(payload: bytes | memoryview, key: bytes) -> bytes:
    """:func:`mask` without numpy: one big-integer XOR, still C speed per byte."""
    length = len(payload)
    repeated = (key * (length // 4 + 1))[:length]
    return (int.from_bytes(payload, "little") ^ int.from_bytes(repeated, "little")).to_bytes(length, "little")


def mask_in_place(buffer: bytearray, key: bytes, start: int = 0) -> None:
    """:func:`mask` of ``buffer[start:]`` into itself (no copy with numpy)."""
    length = len(buffer) - start
    if _numpy is None or length < 1024:
        buffer[start:] = mask_pure(bytes(buffer[start:]), key)
        return
    view = _numpy.frombuffer(buffer, dtype=_numpy.uint8, offset=start)
    _mask_into(view, view, key)


def masked_frame(opcode: int, payload: bytes, key: bytes) -> bytes | memoryview:
    """A whole client frame: header, ``key``, and ``payload`` masked with it.

    With numpy, a large payload is masked straight into the frame's buffer, in one pass. Copying it there
    first and masking in place took a pass more, and the copy (glibc's ``memmove``) runs about 15 times
    slower when the destination lies 1 to 31 bytes past the source modulo 4 KiB: which is where a frame
    allocated right after the payload's ``recv`` puts it. The payload starts 16-byte aligned in the buffer.
    """
    header = frame_header(opcode, len(payload), key)
    if _numpy is None or len(payload) < 1024:
        return header + mask(payload, key)
    start = -len(header) % 16
    frame = _numpy.empty(start + len(header) + len(payload), dtype=_numpy.uint8)
    data: memoryview = frame.data
    data[start:start + len(header)] = header  # a memoryview slice: cheaper than one more numpy array
    _mask_into(frame[start + len(header):], payload, key)
    return data[start:]


def _mask_into(out: Any, payload: Any, key: bytes) -> None:
    """:func:`mask` of ``payload`` (any buffer, ``out`` itself included) written to ``out``, a uint8 numpy
    array as long (numpy only)."""
    length = len(payload)
    words = length // 4
    _numpy.bitwise_xor(_numpy.frombuffer(payload, dtype=_numpy.uint32, count=words),
                       _numpy.frombuffer(key, dtype=_numpy.uint32)[0], out=out[:words * 4].view(_numpy.uint32))
    for index in range(words * 4, length):
        out[index] = payload[index] ^ key[index % 4]
