"""The wire format: hex payloads, the message decoder, and bridge paths/URLs (no I/O)."""

from __future__ import annotations

import itertools
import os
import random
import subprocess
import sys
from urllib.parse import urlsplit

import pytest

from bridge import frames, protocol
from bridge.protocol import (
    BRIDGE_PATH,
    DEFAULT_MAX_MESSAGE_BYTES,
    END_OF_STREAM,
    GO_FRONTEND_MESSAGE_BYTES,
    CloseCode,
    MessageDecoder,
    ProtocolViolation,
    bridge_path,
    bridge_url,
    encode,
    route_for_path,
)
from tests.helpers import pattern

UUID_PATH = "/tcp-over-websocket-bridge/35218cb7-1201-4940-89e8-48d8f03fed96"


def decode_whole(payload: bytes | str, decoder: MessageDecoder | None = None) -> object:
    decoder = decoder or MessageDecoder()
    return decoder.feed(payload, binary=False, message_finished=True)


def feed_pieces(decoder: MessageDecoder, payload: bytes, cuts: list[int]) -> bytes:
    """Feed ``payload`` as one message split at ``cuts``; return everything decoded."""
    bounds = [0, *cuts, len(payload)]
    out = bytearray()
    for i, (start, end) in enumerate(itertools.pairwise(bounds)):
        result = decoder.feed(payload[start:end], binary=False, message_finished=i == len(bounds) - 2)
        assert isinstance(result, bytes), result
        out += result
    return bytes(out)


# ---------------------------------------------------------------------------
# encode


def test_bridge_path_constant_is_the_go_reference_path() -> None:
    assert BRIDGE_PATH == UUID_PATH


def test_encode_is_lowercase_hex() -> None:
    data = pattern(256)
    encoded = encode(data)
    assert isinstance(encoded, bytes)
    assert encoded == data.hex().encode("ascii")
    assert encoded == encoded.lower()
    assert encode(b"\xab\xcd\xef") == b"abcdef"
    assert encode(b"") == b""


def test_encode_then_decode_round_trips_every_byte_value() -> None:
    data = pattern(70_000)
    assert decode_whole(encode(data)) == data


# ---------------------------------------------------------------------------
# MessageDecoder: data


@pytest.mark.parametrize("payload", [b"68656c6c6f", "68656c6c6f"])
def test_whole_message_bytes_or_str(payload: bytes | str) -> None:
    assert decode_whole(payload) == b"hello"


def test_uppercase_and_mixed_case_hex_accepted() -> None:
    assert decode_whole(b"ABCDEF") == b"\xab\xcd\xef"
    assert decode_whole("aBcDeF") == b"\xab\xcd\xef"


def test_several_messages_in_a_row() -> None:
    decoder = MessageDecoder()
    for chunk in (b"a", b"bc", pattern(1000)):
        assert decoder.feed(encode(chunk), binary=False, message_finished=True) == chunk


@pytest.mark.parametrize("cut", range(0, 11))
def test_fragment_split_at_every_boundary(cut: int) -> None:
    """Both odd (mid-byte) and even cut points give back the same bytes."""
    payload = encode(b"hello")  # 10 hex digits
    decoder = MessageDecoder()
    first = decoder.feed(payload[:cut], binary=False, message_finished=False)
    second = decoder.feed(payload[cut:], binary=False, message_finished=True)
    assert isinstance(first, bytes)
    assert isinstance(second, bytes)
    assert first + second == b"hello"
    # a complete byte is returned as soon as both its digits arrived
    assert first == b"hello"[: cut // 2]


def test_fragments_one_digit_at_a_time() -> None:
    data = pattern(300)
    payload = encode(data)
    decoder = MessageDecoder()
    assert feed_pieces(decoder, payload, list(range(1, len(payload)))) == data


@pytest.mark.parametrize("seed", range(20))
def test_random_fragmentation_matches_input(seed: int) -> None:
    rng = random.Random(seed)
    decoder = MessageDecoder()
    for _ in range(5):  # several messages through the same decoder
        data = rng.randbytes(rng.randrange(1, 5000))
        payload = encode(data)
        if rng.random() < 0.5:
            payload = payload.upper()
        cuts = sorted(rng.sample(range(1, len(payload)), k=min(len(payload) - 1, rng.randrange(0, 40))))
        assert feed_pieces(decoder, payload, cuts) == data


def test_random_fragmentation_with_str_fragments() -> None:
    rng = random.Random(1234)
    data = rng.randbytes(999)
    text = encode(data).decode("ascii")
    decoder = MessageDecoder()
    out = bytearray()
    pos = 0
    while pos < len(text):
        step = rng.randrange(1, 50)
        piece = text[pos:pos + step]
        pos += step
        result = decoder.feed(piece, binary=False, message_finished=pos >= len(text))
        assert isinstance(result, bytes)
        out += result
    assert bytes(out) == data


# ---------------------------------------------------------------------------
# MessageDecoder: end of stream


@pytest.mark.parametrize("payload", [b"", ""])
def test_empty_message_is_end_of_stream(payload: bytes | str) -> None:
    assert decode_whole(payload) is END_OF_STREAM
    assert repr(END_OF_STREAM) == "END_OF_STREAM"


def test_empty_fragments_making_an_empty_message_are_end_of_stream() -> None:
    decoder = MessageDecoder()
    assert decoder.feed(b"", binary=False, message_finished=False) == b""
    assert decoder.feed(b"", binary=False, message_finished=True) is END_OF_STREAM


def test_empty_first_fragment_followed_by_data_is_data() -> None:
    decoder = MessageDecoder()
    first = decoder.feed(b"", binary=False, message_finished=False)
    assert first == b""
    assert first is not END_OF_STREAM
    assert decoder.feed(b"6869", binary=False, message_finished=True) == b"hi"


def test_data_then_empty_final_fragment_is_data() -> None:
    decoder = MessageDecoder()
    assert decoder.feed(b"6869", binary=False, message_finished=False) == b"hi"
    result = decoder.feed(b"", binary=False, message_finished=True)
    assert result == b""
    assert result is not END_OF_STREAM


def test_decoder_usable_after_end_of_stream() -> None:
    decoder = MessageDecoder()
    assert decoder.feed(b"", binary=False, message_finished=True) is END_OF_STREAM
    assert decoder.feed(b"00ff", binary=False, message_finished=True) == b"\x00\xff"
    assert decoder.feed(b"", binary=False, message_finished=True) is END_OF_STREAM


# ---------------------------------------------------------------------------
# MessageDecoder: violations


def violation(payload: bytes | str, **kwargs: object) -> ProtocolViolation:
    decoder = MessageDecoder(**kwargs)  # type: ignore[arg-type]
    with pytest.raises(ProtocolViolation) as info:
        decoder.feed(payload, binary=False, message_finished=True)
    return info.value


@pytest.mark.parametrize("payload", [b"a", b"abc", "abcde", b"0"])
def test_odd_length_is_invalid_data(payload: bytes | str) -> None:
    exc = violation(payload)
    assert exc.code == CloseCode.INVALID_DATA == 1007
    assert exc.reason


def test_odd_length_across_fragments_is_invalid_data() -> None:
    decoder = MessageDecoder()
    assert decoder.feed(b"abc", binary=False, message_finished=False) == b"\xab"
    with pytest.raises(ProtocolViolation) as info:
        decoder.feed(b"de", binary=False, message_finished=True)
    assert info.value.code == 1007


@pytest.mark.parametrize("payload", [b"zz", b"0g", b"hello!", b"12 4", "0x12", b"\xff\xfe", b"12\n4"])
def test_non_hex_is_invalid_data(payload: bytes | str) -> None:
    assert violation(payload).code == 1007


def test_non_hex_in_a_later_fragment_is_invalid_data() -> None:
    decoder = MessageDecoder()
    decoder.feed(b"00", binary=False, message_finished=False)
    with pytest.raises(ProtocolViolation) as info:
        decoder.feed(b"0x", binary=False, message_finished=False)
    assert info.value.code == 1007


@pytest.mark.parametrize("payload", ["é0", "١٢", "\u00ab\u00cd", "ab\u200b"])
def test_non_ascii_str_is_invalid_data(payload: str) -> None:
    assert violation(payload).code == 1007


@pytest.mark.parametrize("payload", [b"", b"6869", b"\x00\x01"])
def test_binary_message_is_unsupported_data(payload: bytes) -> None:
    decoder = MessageDecoder()
    with pytest.raises(ProtocolViolation) as info:
        decoder.feed(payload, binary=True, message_finished=True)
    assert info.value.code == CloseCode.UNSUPPORTED_DATA == 1003


def test_binary_continuation_is_unsupported_data() -> None:
    decoder = MessageDecoder()
    with pytest.raises(ProtocolViolation) as info:
        decoder.feed(b"6869", binary=True, message_finished=False)
    assert info.value.code == 1003


def test_default_limit_admits_the_go_frontend_message() -> None:
    assert DEFAULT_MAX_MESSAGE_BYTES >= GO_FRONTEND_MESSAGE_BYTES == 65536
    data = pattern(GO_FRONTEND_MESSAGE_BYTES // 2)  # 32 KiB read -> 65536 hex chars
    payload = encode(data)
    assert len(payload) == 65536
    assert decode_whole(payload) == data
    assert decode_whole(payload, MessageDecoder(max_message_bytes=65536)) == data


def test_message_over_limit_is_too_big() -> None:
    exc = violation(b"00" * 33, max_message_bytes=64)
    assert exc.code == CloseCode.MESSAGE_TOO_BIG == 1009
    assert "64" in exc.reason
    # exactly at the limit is fine
    assert decode_whole(b"00" * 32, MessageDecoder(max_message_bytes=64)) == bytes(32)


def test_default_limit_rejects_a_larger_message() -> None:
    exc = violation(b"0" * (DEFAULT_MAX_MESSAGE_BYTES + 2))
    assert exc.code == 1009


def test_limit_counts_the_whole_fragmented_message() -> None:
    decoder = MessageDecoder(max_message_bytes=100)
    for _ in range(5):
        decoder.feed(b"00" * 10, binary=False, message_finished=False)  # 100 so far: fine
    with pytest.raises(ProtocolViolation) as info:
        decoder.feed(b"00", binary=False, message_finished=False)
    assert info.value.code == 1009


def test_limit_applies_per_message_not_per_stream() -> None:
    decoder = MessageDecoder(max_message_bytes=100)
    for _ in range(10):
        assert decoder.feed(b"00" * 50, binary=False, message_finished=True) == bytes(50)


def test_too_big_is_checked_before_hex_validity() -> None:
    """An oversized message is refused as too big even if it is also garbage."""
    assert violation(b"z" * 101, max_message_bytes=100).code == 1009


def test_protocol_violation_carries_code_and_reason() -> None:
    exc = ProtocolViolation(CloseCode.POLICY_VIOLATION, "nope")
    assert exc.code == 1008
    assert exc.reason == "nope"
    assert str(exc) == "nope"


# ---------------------------------------------------------------------------
# paths


def test_bridge_path_default_is_the_bare_path() -> None:
    assert bridge_path() == UUID_PATH
    assert bridge_path("default") == UUID_PATH
    assert bridge_path("ssh") == UUID_PATH + "/ssh"


@pytest.mark.parametrize("route", ["default", "ssh", "echo", "a", "A.b_c-9", "9lives", "x" * 64])
def test_route_round_trips(route: str) -> None:
    assert route_for_path(bridge_path(route)) == route


@pytest.mark.parametrize("path", [
    UUID_PATH + "/",                       # trailing slash on the bare path
    UUID_PATH + "/ssh/",                   # trailing slash on a route
    UUID_PATH + "/..",
    UUID_PATH + "/../ssh",
    UUID_PATH + "/ssh/..",
    UUID_PATH + "/.",
    UUID_PATH + "/.hidden",
    UUID_PATH + "/-x",
    UUID_PATH + "/_x",
    UUID_PATH + "//ssh",
    UUID_PATH + "/ssh/more",
    UUID_PATH + "/default",                # 'default' spelled explicitly
    UUID_PATH + "/a b",
    UUID_PATH + "/" + "x" * 65,
    UUID_PATH + "/ssh?x=1",
    UUID_PATH + "x",
    UUID_PATH + "-ssh",
    UUID_PATH[:-1],
    "/tcp-over-websocket-bridge/00000000-0000-0000-0000-000000000000",
    "/prefix" + UUID_PATH,
    "/prefix" + UUID_PATH + "/ssh",
    UUID_PATH.lstrip("/"),
    UUID_PATH.upper(),
    "/",
    "",
])
def test_look_alike_paths_rejected(path: str) -> None:
    assert route_for_path(path) is None


def test_route_name_pattern() -> None:
    assert protocol.ROUTE_NAME.fullmatch("ssh")
    assert not protocol.ROUTE_NAME.fullmatch("")
    assert not protocol.ROUTE_NAME.fullmatch("a/b")


# ---------------------------------------------------------------------------
# URLs (Go's path.Join semantics)


@pytest.mark.parametrize(("base", "expected"), [
    ("ws://h:1", "ws://h:1" + UUID_PATH),
    ("ws://h:1/", "ws://h:1" + UUID_PATH),
    ("wss://h/prefix/", "wss://h/prefix" + UUID_PATH),
    ("wss://h/prefix", "wss://h/prefix" + UUID_PATH),
    ("wss://h/a/b/", "wss://h/a/b" + UUID_PATH),
    ("wss://h//a//b//", "wss://h/a/b" + UUID_PATH),
    ("ws://h:1/?token=x&y=2", "ws://h:1" + UUID_PATH + "?token=x&y=2"),
    ("wss://h/prefix/?token=x", "wss://h/prefix" + UUID_PATH + "?token=x"),
    ("ws://[::1]:8080/", "ws://[::1]:8080" + UUID_PATH),
    ("ws://[::1]:8080", "ws://[::1]:8080" + UUID_PATH),
    ("ws://user:pw@h:1/", "ws://user:pw@h:1" + UUID_PATH),
])
def test_bridge_url_default_route(base: str, expected: str) -> None:
    assert bridge_url(base) == expected
    assert bridge_url(base, "default") == expected


@pytest.mark.parametrize(("base", "expected"), [
    ("ws://h:1", "ws://h:1" + UUID_PATH + "/ssh"),
    ("wss://h/prefix/", "wss://h/prefix" + UUID_PATH + "/ssh"),
    ("ws://h:1/?q=1", "ws://h:1" + UUID_PATH + "/ssh?q=1"),
    ("ws://[::1]:8080/", "ws://[::1]:8080" + UUID_PATH + "/ssh"),
])
def test_bridge_url_named_route(base: str, expected: str) -> None:
    assert bridge_url(base, "ssh") == expected


def test_bridge_url_path_is_recognised_by_route_for_path() -> None:
    for base in ("ws://h:1", "wss://h/prefix/", "ws://[::1]:8080/?x=1"):
        for route in ("default", "echo"):
            path = urlsplit(bridge_url(base, route)).path
            prefix = urlsplit(base).path.rstrip("/")
            assert route_for_path(path[len(prefix):]) == route


# -- data frames and masking -------------------------------------------------------------------------


@pytest.mark.parametrize("length", [0, 1, 3, 4, 5, 63, 64, 65, 125, 126, 65535, 65536, 200003])
def test_mask_is_its_own_inverse_and_matches_the_pure_version(length: int) -> None:
    data = os.urandom(length)
    key = os.urandom(4)
    masked = frames.mask(data, key)
    assert masked == frames.mask_pure(data, key)
    assert masked == bytes(b ^ key[i % 4] for i, b in enumerate(data[:1000])) + masked[1000:]
    assert frames.mask(masked, key) == data


@pytest.mark.parametrize(("length", "header_length", "marker"), [
    (0, 2, 0), (125, 2, 125), (126, 4, 126), (65535, 4, 126), (65536, 10, 127)])
def test_frame_header_uses_the_shortest_length_form(length: int, header_length: int, marker: int) -> None:
    plain = frames.frame_header(frames.OPCODE_TEXT, length)
    assert len(plain) == header_length
    assert plain[0] == 0x81 and plain[1] == marker
    masked = frames.frame_header(frames.OPCODE_TEXT, length, b"abcd")
    assert masked[1] == 0x80 | marker and masked.endswith(b"abcd") and len(masked) == header_length + 4


@pytest.mark.parametrize("length", [0, 1, 5, 125, 126, 70000])
def test_frame_parser_unmasks_client_frames_fed_in_any_pieces(length: int) -> None:
    key, data = os.urandom(4), os.urandom(length)
    wire = frames.frame_header(frames.OPCODE_BINARY, length, key) + frames.mask(data, key)
    for size in (1, 3, 7, 333, 4096, len(wire)):
        parser = frames.FrameParser(1 << 20, masked=True)
        got = []
        for start in range(0, len(wire), size):
            parser.feed(wire[start:start + size])
            while (frame := parser.next_frame()) is not None:
                got.append(frame)
        assert got == [frames.Frame(frames.OPCODE_BINARY, True, data)]


@pytest.mark.parametrize("masked", [False, True], ids=["from a server", "from a client"])
def test_a_large_frame_is_read_into_its_own_buffer_and_the_next_frame_follows(masked: bool) -> None:
    """A large frame still arriving offers the rest of its payload as read space; whatever a read brings
    (short reads, a read that runs into the next frame through feed) gives the same frames."""
    key = os.urandom(4) if masked else b""
    data, small = os.urandom(frames.LARGE_PAYLOAD * 3 + 5), b"next"
    wire = b"".join(frames.frame_header(frames.OPCODE_BINARY, len(payload), key)
                    + (frames.mask(payload, key) if key else payload) for payload in (data, small))
    parser = frames.FrameParser(1 << 20, masked=masked)
    parser.feed(wire[:100])  # the header and the start of the payload
    assert parser.next_frame() is None
    head = len(wire) - len(small) - 2 - (4 if masked else 0) - len(data)  # the large frame's header
    sent = 100
    for read in (1, 4096, 7):
        space = parser.payload_space()
        assert space is not None and len(space) == head + len(data) - sent
        space[:read] = wire[sent:sent + read]
        parser.payload_filled(read)
        sent += read
        assert parser.next_frame() is None
    parser.feed(wire[sent:])  # the rest of the payload and the next frame in one read
    assert parser.next_frame() == frames.Frame(frames.OPCODE_BINARY, True, data)
    assert parser.payload_space() is None
    assert parser.next_frame() == frames.Frame(frames.OPCODE_BINARY, True, small)
    assert parser.next_frame() is None


def test_a_large_frame_waits_for_its_mask_key_before_taking_its_own_buffer() -> None:
    """The 64-bit length arrives before the key: the payload may not start until the key is there."""
    key, data = os.urandom(4), os.urandom(frames.LARGE_PAYLOAD * 5)
    wire = frames.frame_header(frames.OPCODE_BINARY, len(data), key) + frames.mask(data, key)
    parser = frames.FrameParser(1 << 20, masked=True)
    parser.feed(wire[:10])  # first two bytes and the length: no key yet
    assert parser.next_frame() is None and parser.payload_space() is None
    parser.feed(wire[10:])
    assert parser.next_frame() == frames.Frame(frames.OPCODE_BINARY, True, data)


@pytest.mark.parametrize("length", [0, 5, 1023, 1024, 1025, 1026, 1027, 65535, 65536, 70001])
def test_a_masked_frame_is_its_header_and_its_payload_masked(length: int) -> None:
    """Masked into its own buffer (large: every header size, every tail after the last whole word) or joined
    (small): the same bytes as the header plus the pure-Python mask."""
    key, payload = os.urandom(4), os.urandom(length)
    expected = frames.frame_header(frames.OPCODE_BINARY, length, key) + frames.mask_pure(payload, key)
    assert bytes(frames.masked_frame(frames.OPCODE_BINARY, payload, key)) == expected


def test_importing_the_frames_module_starts_no_blas_threads() -> None:
    """numpy's BLAS would start a spinning thread per CPU; the daemons only XOR."""
    pytest.importorskip("numpy")
    count = "import os, bridge.frames, numpy; print(len(os.listdir('/proc/self/task')))"
    result = subprocess.run([sys.executable, "-c", count], capture_output=True, text=True, timeout=60,
                            env={k: v for k, v in os.environ.items() if not k.endswith("_NUM_THREADS")})
    assert result.stdout.strip() == "1", result.stderr


def test_frame_parser_in_server_mode_refuses_an_unmasked_frame() -> None:
    parser = frames.FrameParser(1 << 20, masked=True)
    parser.feed(frames.frame_header(frames.OPCODE_TEXT, 2) + b"ab")
    with pytest.raises(ProtocolViolation) as caught:
        parser.next_frame()
    assert caught.value.code == CloseCode.PROTOCOL_ERROR


# ---------------------------------------------------------------------------
# Negotiated binary messages

VECTORS = os.path.join(os.path.dirname(__file__), "vectors")


def response_headers(raw: bytes) -> list[tuple[str, str]]:
    lines = raw.decode("latin-1").split("\r\n\r\n")[0].split("\r\n")[1:]
    return [(name.strip(), value.strip()) for name, value in (line.split(":", 1) for line in lines)]


@pytest.mark.parametrize(("values", "offered"), [
    (["binary-frames"], True),
    (["Binary-Frames"], True),
    (["zstd, binary-frames"], True),
    (["other", "binary-frames"], True),
    ([], False),
    (["binary"], False),
    (["binary-frames-v2"], False),
])
def test_binary_offered(values: list[str], offered: bool) -> None:
    assert protocol.binary_offered(values) is offered


def test_binary_accepted_only_by_a_header_the_request_did_not_carry() -> None:
    consent = [("Upgrade", "websocket"), ("X-Tcpbridge-Frames", "binary")]
    assert protocol.binary_accepted(["Authorization"], consent)
    assert protocol.binary_accepted([], [("x-tcpbridge-frames", " Binary ")])
    # The request carried the consent header's name: a Go backend would echo it.
    assert not protocol.binary_accepted(["x-TCPBRIDGE-frames"], consent)
    assert not protocol.binary_accepted([], [*consent, ("X-Tcpbridge-Frames", "binary")])  # twice
    assert not protocol.binary_accepted([], [("X-Tcpbridge-Frames", "text")])
    assert not protocol.binary_accepted([], [("X-Tcpbridge-Frames", "binary, text")])
    assert not protocol.binary_accepted([], [])


def test_the_recorded_go_101_echoing_our_offer_is_not_consent() -> None:
    with open(os.path.join(VECTORS, "backend_handshake_response.bin"), "rb") as recorded:
        go_101 = recorded.read()
    # What the Go backend answers to our request: the recorded 101 plus our offer echoed back.
    echoed = go_101[:-2] + b"X-Tcpbridge-Offer: binary-frames\r\n\r\n"
    headers = response_headers(echoed)
    assert ("X-Tcpbridge-Offer", "binary-frames") in headers
    assert not protocol.binary_accepted(["X-Tcpbridge-Offer"], headers)
    assert not protocol.binary_accepted([], response_headers(go_101))


def test_switch_marker_accepted_once_then_empty_binary_is_end_of_stream() -> None:
    decoder = MessageDecoder(switch_allowed=True)
    assert decoder.feed(b"6869", binary=False, message_finished=True) == b"hi"  # hex before the marker
    assert decoder.feed(b"", binary=True, message_finished=True) is protocol.SWITCH_TO_BINARY
    assert decoder.binary
    assert decoder.feed(b"\x00\xff", binary=True, message_finished=True) == b"\x00\xff"
    assert decoder.feed(bytearray(b"ab"), binary=True, message_finished=False) == b"ab"
    assert decoder.feed(b"c", binary=True, message_finished=True) == b"c"
    assert decoder.feed(b"", binary=True, message_finished=True) is END_OF_STREAM


def test_fragmented_empty_switch_marker() -> None:
    decoder = MessageDecoder(switch_allowed=True)
    assert decoder.feed(b"", binary=True, message_finished=False) == b""
    assert decoder.feed(b"", binary=True, message_finished=True) is protocol.SWITCH_TO_BINARY


def test_text_after_the_switch_is_unsupported_data() -> None:
    decoder = MessageDecoder(switch_allowed=True)
    decoder.feed(b"", binary=True, message_finished=True)
    with pytest.raises(ProtocolViolation) as caught:
        decoder.feed(b"6869", binary=False, message_finished=True)
    assert caught.value.code == CloseCode.UNSUPPORTED_DATA


@pytest.mark.parametrize("allowed", [True, False])
def test_binary_data_before_the_switch_is_unsupported_data(allowed: bool) -> None:
    with pytest.raises(ProtocolViolation) as caught:
        MessageDecoder(switch_allowed=allowed).feed(b"data", binary=True, message_finished=True)
    assert caught.value.code == CloseCode.UNSUPPORTED_DATA


def test_an_empty_binary_message_is_no_marker_when_not_consented() -> None:
    with pytest.raises(ProtocolViolation) as caught:
        MessageDecoder().feed(b"", binary=True, message_finished=True)
    assert caught.value.code == CloseCode.UNSUPPORTED_DATA


def test_binary_messages_keep_the_size_limit() -> None:
    decoder = MessageDecoder(GO_FRONTEND_MESSAGE_BYTES, switch_allowed=True)
    decoder.feed(b"", binary=True, message_finished=True)
    decoder.feed(b"x" * GO_FRONTEND_MESSAGE_BYTES, binary=True, message_finished=True)
    with pytest.raises(ProtocolViolation) as caught:
        decoder.feed(b"x" * (GO_FRONTEND_MESSAGE_BYTES + 1), binary=True, message_finished=True)
    assert caught.value.code == CloseCode.MESSAGE_TOO_BIG


# ---------------------------------------------------------------------------
# FrameParser: what the frontend reads from a server


def server_frame(opcode: int, payload: bytes, *, fin: bool = True) -> bytes:
    return bytes([(0x80 if fin else 0) | opcode]) + frames.frame_header(opcode, len(payload))[1:] + payload


def all_frames(parser: frames.FrameParser) -> list[frames.Frame]:
    got = []
    while (frame := parser.next_frame()) is not None:
        got.append(frame)
    return got


@pytest.mark.parametrize("length", [0, 1, 125, 126, 65535, 65536, 200000])
def test_frame_parser_reads_every_length_encoding_fed_a_byte_at_a_time_or_whole(length: int) -> None:
    payload = pattern(length)
    wire = server_frame(frames.OPCODE_BINARY, payload) + server_frame(frames.OPCODE_TEXT, b"ab")
    whole = frames.FrameParser(1 << 20)
    whole.feed(wire)
    expected = [frames.Frame(frames.OPCODE_BINARY, True, payload),
                frames.Frame(frames.OPCODE_TEXT, True, b"ab")]
    assert all_frames(whole) == expected
    pieces = frames.FrameParser(1 << 20)
    got = []
    step = 1 if length < 1000 else 997
    for start in range(0, len(wire), step):
        pieces.feed(wire[start:start + step])
        got += all_frames(pieces)
    assert got == expected


def test_frame_parser_keeps_fragments_and_control_frames_apart() -> None:
    parser = frames.FrameParser(1 << 20)
    parser.feed(server_frame(frames.OPCODE_TEXT, b"61", fin=False) + server_frame(frames.OPCODE_PING, b"p")
                + server_frame(frames.OPCODE_CONTINUATION, b"62"))
    assert [(f.opcode, f.fin, f.payload) for f in all_frames(parser)] == [
        (frames.OPCODE_TEXT, False, b"61"), (frames.OPCODE_PING, True, b"p"),
        (frames.OPCODE_CONTINUATION, True, b"62")]


def test_frame_parser_compacts_its_buffer_over_many_frames() -> None:
    parser = frames.FrameParser(1 << 20)
    frame = server_frame(frames.OPCODE_BINARY, b"x" * 1000)
    stream, step, got = frame * 900, 300 * len(frame) + 10, 0  # reads never end on a frame boundary
    for start in range(0, len(stream), step):
        parser.feed(stream[start:start + step])
        got += len(all_frames(parser))
        assert len(parser._buffer) < step + len(frame)  # consumed bytes do not pile up
    assert got == 900


@pytest.mark.parametrize(("wire", "code"), [
    (bytes([0x81 | 0x40, 0]), CloseCode.PROTOCOL_ERROR),  # RSV1 without an extension
    (bytes([0x83, 0]), CloseCode.PROTOCOL_ERROR),  # reserved opcode
    (bytes([0x81, 0x80 | 1]) + b"key!x", CloseCode.PROTOCOL_ERROR),  # masked by the server
    (bytes([0x09, 0]), CloseCode.PROTOCOL_ERROR),  # fragmented ping
    (bytes([0x88, 126, 0, 200]) + b"x" * 200, CloseCode.PROTOCOL_ERROR),  # control frame over 125 bytes
    (bytes([0x82, 127]) + (1 << 63).to_bytes(8, "big"), CloseCode.PROTOCOL_ERROR),  # top length bit
    (bytes([0x82, 127]) + (1 << 40).to_bytes(8, "big"), CloseCode.MESSAGE_TOO_BIG),  # refused by its header
])
def test_frame_parser_refuses_malformed_frames(wire: bytes, code: CloseCode) -> None:
    parser = frames.FrameParser(GO_FRONTEND_MESSAGE_BYTES)
    parser.feed(wire)
    with pytest.raises(ProtocolViolation) as caught:
        parser.next_frame()
    assert caught.value.code == code


def test_frame_parser_limit_is_the_declared_length() -> None:
    parser = frames.FrameParser(100)
    parser.feed(server_frame(frames.OPCODE_BINARY, b"x" * 100))
    assert parser.next_frame() == frames.Frame(frames.OPCODE_BINARY, True, b"x" * 100)
    parser.feed(server_frame(frames.OPCODE_BINARY, b"x" * 101)[:4])  # the header alone is enough
    with pytest.raises(ProtocolViolation) as caught:
        parser.next_frame()
    assert caught.value.code == CloseCode.MESSAGE_TOO_BIG
