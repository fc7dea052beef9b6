"""Our websocket frames (bridge.protocol) against an independent implementation, wsproto's frame layer.

Random frame sequences (messages cut into fragments, pings and pongs between fragments, every
length class, masked from a client and unmasked from a server) encoded by one side are decoded by
the other to the same frames. Frame headers mutated at random are refused by our FrameParser
whenever wsproto refuses them (the frame-level rules: reserved bits, opcodes, masking, control
frames, length encodings); UTF-8 and message sequencing are checked above the parser (the endpoint
and the hex decoder) and are not compared here.
"""

from __future__ import annotations

import os
from typing import NamedTuple

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from wsproto.frame_protocol import FrameProtocol, Opcode, ParseFailed

from bridge import frames
from bridge.frames import FrameParser
from bridge.protocol import ProtocolViolation

MAX_PAYLOAD = 1 << 20
BOUNDED = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])

#: Payload lengths that reach every length class: 7-bit, 16-bit (126..65535) and 64-bit (65536 and up).
LENGTHS = st.sampled_from([0, 1, 2, 125, 126, 127, 1000, 65535, 65536, 70000])


class Wire(NamedTuple):
    """One frame as it should come out of a parser: opcode, FIN, payload."""

    opcode: int
    fin: bool
    payload: bytes


@st.composite
def frame_sequences(draw: st.DrawFn) -> list[Wire]:
    """Messages cut into fragments, with pings and pongs between fragments, ending with a close."""
    wires: list[Wire] = []
    for _ in range(draw(st.integers(1, 4))):
        binary = draw(st.booleans())
        pieces = draw(st.lists(LENGTHS, min_size=1, max_size=4))
        for index, length in enumerate(pieces):
            opcode = (frames.OPCODE_BINARY if binary else frames.OPCODE_TEXT) if index == 0 \
                else frames.OPCODE_CONTINUATION
            payload = os.urandom(length) if binary else b"a" * length  # ASCII: valid UTF-8 cut anywhere
            wires.append(Wire(opcode, index == len(pieces) - 1, payload))
            if draw(st.booleans()):
                control = draw(st.sampled_from([frames.OPCODE_PING, frames.OPCODE_PONG]))
                wires.append(Wire(control, True, os.urandom(draw(st.integers(0, 125)))))
    wires.append(Wire(frames.OPCODE_CLOSE, True, frames.close_payload(1000, "bye")))
    return wires


def encode_with_wsproto(wires: list[Wire], *, client: bool) -> bytes:
    sender = FrameProtocol(client=client, extensions=[])
    wire = bytearray()
    text = False  # the type of the message in progress (wsproto takes it from the first fragment's type)
    for frame in wires:
        if frame.opcode == frames.OPCODE_PING:
            wire += sender.ping(frame.payload)
        elif frame.opcode == frames.OPCODE_PONG:
            wire += sender.pong(frame.payload)
        elif frame.opcode == frames.OPCODE_CLOSE:
            code, reason = frames.parse_close_payload(frame.payload)
            wire += sender.close(code, reason)
        else:
            if frame.opcode != frames.OPCODE_CONTINUATION:
                text = frame.opcode == frames.OPCODE_TEXT
            wire += sender.send_data(frame.payload.decode("ascii") if text else frame.payload, frame.fin)
    return bytes(wire)


def encode_ours(wires: list[Wire], *, client: bool) -> bytes:
    """As our endpoints write: frame_header (FIN cleared for a fragment) and, from a client, masked."""
    wire = bytearray()
    for frame in wires:
        key = os.urandom(4) if client else b""
        head = bytearray(frames.frame_header(frame.opcode, len(frame.payload), key))
        if not frame.fin:
            head[0] &= 0x7F
        wire += head + (frames.mask(frame.payload, key) if client and frame.payload else frame.payload)
    return bytes(wire)


def parse_ours(wire: bytes, *, masked: bool, cuts: list[int]) -> list[Wire]:
    parser = FrameParser(MAX_PAYLOAD, masked=masked)
    wires: list[Wire] = []
    start = 0
    for cut in [*sorted(c % (len(wire) + 1) for c in cuts), len(wire)]:
        parser.feed(wire[start:max(start, cut)])
        start = max(start, cut)
        while (frame := parser.next_frame()) is not None:
            wires.append(Wire(frame.opcode, frame.fin, bytes(frame.payload)))
    return wires


def parse_with_wsproto(wire: bytes, *, client: bool) -> list[Wire]:
    """wsproto's frames (its chunks of one frame joined; ``message_finished`` is the FIN bit)."""
    receiver = FrameProtocol(client=client, extensions=[])
    receiver.receive_bytes(wire)
    wires: list[Wire] = []
    pending = b""
    in_message = False  # wsproto names a continuation frame by its message's opcode; the wire says 0
    for frame in receiver.received_frames():
        payload = frame.payload
        if frame.opcode is Opcode.CLOSE:
            code, reason = payload
            payload = frames.close_payload(int(code), reason or "")
        elif isinstance(payload, str):
            payload = payload.encode("utf-8")
        pending += bytes(payload)
        if frame.frame_finished:
            data = frame.opcode in (Opcode.TEXT, Opcode.BINARY)
            opcode = frames.OPCODE_CONTINUATION if data and in_message else int(frame.opcode)
            wires.append(Wire(opcode, frame.message_finished, pending))
            pending = b""
            if data:
                in_message = not frame.message_finished
    return wires


@BOUNDED
@given(frame_sequences(), st.booleans(), st.lists(st.integers(0, 1 << 20), max_size=8))
def test_what_wsproto_encodes_we_parse_to_the_same_frames(wires: list[Wire], from_client: bool,
                                                          cuts: list[int]) -> None:
    wire = encode_with_wsproto(wires, client=from_client)
    assert parse_ours(wire, masked=from_client, cuts=cuts) == wires


@BOUNDED
@given(frame_sequences(), st.booleans())
def test_what_we_encode_wsproto_parses_to_the_same_frames(wires: list[Wire], from_client: bool) -> None:
    wire = encode_ours(wires, client=from_client)
    # wsproto hands a fragmented text message out as str pieces; ASCII payloads keep their bytes.
    assert parse_with_wsproto(wire, client=not from_client) == wires


@BOUNDED
@given(st.integers(0, 70000), st.sampled_from([frames.OPCODE_BINARY, frames.OPCODE_TEXT]))
def test_a_client_frame_we_mask_in_one_pass_wsproto_unmasks_to_its_payload(length: int, opcode: int) -> None:
    """What the frontend writes for each data message (:func:`frames.masked_frame`), read by wsproto's server."""
    payload = os.urandom(length) if opcode == frames.OPCODE_BINARY else b"f" * length
    wire = bytes(frames.masked_frame(opcode, payload, os.urandom(4)))
    assert parse_with_wsproto(wire, client=False) == [Wire(opcode, True, payload)]


@BOUNDED
@given(st.integers(1, 70000), st.integers(0, 20), st.booleans())
def test_we_unmask_a_whole_client_frame_like_wsproto_wherever_it_lies_in_what_was_read(
        length: int, before: int, growing: bool) -> None:
    """A frame that arrived whole is unmasked straight out of the parser's buffer (the bytes one read
    brought, or the bytearray where a frame cut across reads grows), at any alignment."""
    payload = os.urandom(length)
    wire = bytes(FrameProtocol(client=True, extensions=[]).send_data(payload, True))
    ping = Wire(frames.OPCODE_PING, True, b"p" * before)  # shifts the frame's alignment in the buffer
    parser = FrameParser(MAX_PAYLOAD, masked=True)
    if growing:
        parser.feed(encode_ours([ping], client=True) + wire[:1])
        assert parser.next_frame() == ping
        assert parser.next_frame() is None
        parser.feed(wire[1:])
    else:
        parser.feed(encode_ours([ping], client=True) + wire)
        assert parser.next_frame() == ping
    assert parser.next_frame() == frames.Frame(frames.OPCODE_BINARY, True, payload)


def wsproto_refuses(wire: bytes, *, from_client: bool) -> bool:
    receiver = FrameProtocol(client=not from_client, extensions=[])
    receiver.receive_bytes(wire)
    try:
        for _ in receiver.received_frames():
            pass
    except ParseFailed:
        return True
    return False


def we_refuse(wire: bytes, *, from_client: bool) -> bool:
    parser = FrameParser(MAX_PAYLOAD, masked=from_client)
    parser.feed(wire)
    try:
        while parser.next_frame() is not None:
            pass
    except ProtocolViolation:
        return True
    return False


@st.composite
def mutated_headers(draw: st.DrawFn) -> tuple[bytes, bool]:
    """One whole frame whose first two header bytes, or its extended length, were changed at random."""
    from_client = draw(st.booleans())
    opcode = draw(st.sampled_from([0x0, 0x1, 0x2, 0x8, 0x9, 0xA]))
    length = draw(st.sampled_from([0, 5, 125, 126, 300, 65536]))
    payload = b"a" * length if opcode != frames.OPCODE_CLOSE or length == 0 else \
        frames.close_payload(1000, "") + b"a" * (length - 2)
    wire = bytearray(encode_ours([Wire(opcode, True, payload)], client=from_client))
    wire[0] ^= draw(st.integers(0, 255))
    wire[1] ^= draw(st.sampled_from([0, 0x80, 0x7F, 0x7E, 0x01, 0xFF]))
    if draw(st.booleans()) and len(wire) > 4:  # a non-minimal or huge extended length
        wire[2] ^= draw(st.integers(0, 255))
    return bytes(wire), from_client


@BOUNDED
@given(mutated_headers())
def test_every_frame_header_wsproto_refuses_we_refuse(case: tuple[bytes, bool]) -> None:
    wire, from_client = case
    if we_refuse(wire, from_client=from_client):
        return
    first = first_frame(wire, from_client)  # a shortened length leaves the rest to parse as another frame
    if not wsproto_refuses(first, from_client=from_client):
        return
    if first[0] & 0x0F == frames.OPCODE_CONTINUATION and first[0] & 0x70 == 0:
        return  # a continuation with no message begun: sequencing is the endpoint's (Endpoint.receive)
    assert _refused_for_its_payload(first, from_client), f"wsproto refuses {first[:12].hex()}, we do not"


def first_frame(wire: bytes, from_client: bool) -> bytes:
    """The bytes of the first frame our parser finds in ``wire`` (all of it while that frame is incomplete)."""
    parser = FrameParser(MAX_PAYLOAD, masked=from_client)
    parser.feed(wire)
    if parser.next_frame() is None or parser._offset == 0:
        return wire
    return wire[:parser._offset]


def _refused_for_its_payload(wire: bytes, from_client: bool) -> bool:
    """Whether wsproto refused only a payload our parser leaves to the layers above it: a text frame's UTF-8
    (our text frames are hex, checked by the decoder) or a close frame's code and reason (checked by
    :func:`bridge.endpoint.closed`). Decided by asking wsproto again with a harmless payload."""
    opcode, masked, length = wire[0] & 0x0F, bool(wire[1] & 0x80), wire[1] & 0x7F
    if opcode not in (frames.OPCODE_TEXT, frames.OPCODE_CLOSE) or length >= 126:
        return False
    head = 2 + (4 if masked else 0)
    present = min(length, max(0, len(wire) - head))  # a frame cut short: wsproto checks what came
    harmless = b"a" * present if opcode == frames.OPCODE_TEXT else \
        (frames.close_payload(1000, "") + b"a" * (present - 2) if present >= 2 else b"")
    if len(harmless) != present or len(wire) < head:
        return False
    if masked and harmless:
        harmless = frames.mask(harmless, wire[2:6])
    return not wsproto_refuses(wire[:head] + harmless, from_client=from_client)


@pytest.mark.parametrize(("length", "encoding"), [(5, 126), (125, 126), (300, 127), (65535, 127)])
def test_a_length_not_in_its_shortest_form_is_refused_like_wsproto_does(length: int, encoding: int) -> None:
    """RFC 6455 5.2: the minimal number of bytes MUST be used to encode the length."""
    extended = length.to_bytes(2 if encoding == 126 else 8, "big")
    wire = bytes((0x82, encoding)) + extended + b"a" * length
    assert wsproto_refuses(wire, from_client=False)
    assert we_refuse(wire, from_client=False)
