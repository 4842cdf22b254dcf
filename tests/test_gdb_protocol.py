"""GDB Remote Serial Protocol framing: checksums, escapes, run-length encoding, the reader, acks."""

from __future__ import annotations

import socket

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pykvm.state.gdb_protocol import (
    PACKET_SIZE, ConnectionClosed, Control, Packet, PacketChannel, PacketReader, checksum, escape,
    frame, run_length_decode, run_length_encode, unescape,
)

# --- framing, escapes, run-length encoding --------------------------------------------


def test_frame_appends_the_modulo_256_checksum():
    assert frame(b"OK") == b"$OK#9a"
    assert frame(b"") == b"$#00"
    assert checksum(b"\xff\x02") == 0x01


def test_escape_xors_the_four_special_bytes():
    assert escape(b"a#b$c}d*e") == b"a}\x03b}\x04c}]d}\x0ae"
    assert unescape(b"a}\x03b}\x04c}]d}\x0ae") == b"a#b$c}d*e"


def test_unescape_refuses_a_dangling_escape():
    with pytest.raises(ValueError):
        unescape(b"abc}")


@given(st.binary(max_size=512))
def test_escape_round_trips_and_leaves_no_framing_bytes(data):
    escaped = escape(data)
    assert unescape(escaped) == data
    assert b"#" not in escaped and b"$" not in escaped and b"*" not in escaped


def test_run_length_encoding_follows_the_manual():
    # "0* " is '0' and 3 more ('' = 32 = 29 + 3): four zeros.
    assert run_length_encode(b"0000") == b"0* "
    assert run_length_decode(b"0* ") == b"0000"
    assert run_length_encode(b"000") == b"000"  # too short to gain anything
    # 7 and 8 equal characters would need the counts '#' and '$': sent as 6 + the rest.
    assert run_length_encode(b"1" * 7) == b"1*\"1"
    assert run_length_encode(b"1" * 8) == b"1*\"11"


@given(st.text(alphabet="0123456789abcdefx", max_size=600))
def test_run_length_encoding_round_trips_without_framing_bytes(text):
    data = text.encode()
    encoded = run_length_encode(data)
    assert run_length_decode(encoded) == data
    assert b"#" not in encoded and b"$" not in encoded
    assert len(encoded) <= len(data)


@given(st.binary(max_size=64))
def test_run_length_decode_of_garbage_raises_only_value_error_and_stays_bounded(data):
    try:
        decoded = run_length_decode(data)
    except ValueError:
        return
    assert len(decoded) <= 98 * len(data)


# --- the reader ---------------------------------------------------------------------


def test_reader_reports_packets_acks_and_interrupts():
    events = PacketReader().feed(b"+$qC#b4-\x03$g#67")
    assert events == [Control.ACK, Packet(b"qC"), Control.NAK, Control.INTERRUPT, Packet(b"g")]


def test_reader_flags_bad_and_non_hex_checksums():
    bad, non_hex = PacketReader().feed(b"$g#00$g#zz")
    assert bad.payload == b"g" and "bad checksum" in bad.problem
    assert "not hex" in non_hex.problem


def test_a_dollar_inside_a_payload_starts_the_packet_over():
    assert PacketReader().feed(b"$m10,$g#67") == [Packet(b"g")]


def test_0x03_inside_a_binary_payload_is_data_not_an_interrupt():
    payload = b"X10,1:\x03"
    assert PacketReader().feed(frame(payload)) == [Packet(payload)]


def test_noise_between_packets_is_ignored():
    assert PacketReader().feed(b"garbage\n$g#67junk") == [Packet(b"g")]


def test_an_overlong_packet_is_consumed_without_being_stored():
    reader = PacketReader(max_payload=16)
    (event,) = reader.feed(b"$" + b"a" * 10_000 + b"#00")
    assert event.payload == b"" and "longer than 16" in event.problem
    assert len(reader._payload) == 0
    assert reader.feed(frame(b"g")) == [Packet(b"g")]  # and the next packet is fine


@settings(max_examples=200)
@given(st.lists(st.binary(max_size=80).map(escape), max_size=8), st.data())
def test_reader_finds_every_packet_however_the_stream_is_split(payloads, data):
    stream = b"".join(frame(payload) for payload in payloads)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=6)))
    reader, events, start = PacketReader(), [], 0
    for cut in [*cuts, len(stream)]:
        events += reader.feed(stream[start:cut])
        start = cut
    assert events == [Packet(payload) for payload in payloads]


@given(st.lists(st.binary(max_size=300), max_size=20))
def test_reader_never_raises_and_never_holds_more_than_its_limit(chunks):
    reader = PacketReader(max_payload=64)
    for chunk in chunks:
        for event in reader.feed(chunk):
            assert isinstance(event, (Packet, Control))
            if isinstance(event, Packet):
                assert len(event.payload) <= 64
        assert len(reader._payload) <= 64


# --- the channel: acknowledgments over a socket ----------------------------------------


@pytest.fixture
def pair():
    stub, client = socket.socketpair()
    client.settimeout(2.0)
    stub.settimeout(2.0)
    yield PacketChannel(stub, ack_timeout=0.2, retries=2), client
    stub.close()
    client.close()


def read_exactly(sock: socket.socket, count: int) -> bytes:
    data = b""
    while len(data) < count:
        chunk = sock.recv(count - len(data))
        assert chunk, "the stub closed the connection"
        data += chunk
    return data


def test_receive_acknowledges_a_good_packet(pair):
    channel, client = pair
    client.sendall(frame(b"qC"))
    assert channel.receive(1.0) == b"qC"
    assert read_exactly(client, 1) == b"+"


def test_receive_refuses_a_bad_checksum_and_takes_the_retransmission(pair):
    channel, client = pair
    client.sendall(b"$qC#00" + frame(b"qC"))
    assert channel.receive(1.0) == b"qC"
    assert read_exactly(client, 2) == b"-+"


def test_receive_returns_none_after_its_timeout(pair):
    channel, _ = pair
    assert channel.receive(0.0) is None


def test_receive_reports_an_interrupt(pair):
    channel, client = pair
    client.sendall(b"\x03")
    assert channel.receive(1.0) is Control.INTERRUPT


def test_send_waits_for_the_ack_and_resends_after_a_nak(pair):
    channel, client = pair
    client.sendall(b"-+")  # the first copy is refused, the second accepted
    channel.send(b"OK")
    assert read_exactly(client, 12) == b"$OK#9a$OK#9a"


def test_send_resends_on_silence_then_gives_up(pair):
    channel, client = pair
    with pytest.raises(ConnectionClosed):
        channel.send(b"OK")
    assert read_exactly(client, 18) == b"$OK#9a" * 3  # retries=2: three copies in all


def test_events_arriving_during_the_ack_wait_are_kept(pair):
    channel, client = pair
    client.sendall(b"\x03" + frame(b"g") + b"+")
    channel.send(b"OK")
    assert channel.receive(1.0) is Control.INTERRUPT
    assert channel.receive(1.0) == b"g"


def test_no_ack_mode_neither_sends_nor_waits_for_acks(pair):
    channel, client = pair
    channel.no_ack = True
    channel.send(b"OK")
    client.sendall(b"$g#00" + frame(b"g"))  # the bad one is dropped silently
    assert channel.receive(1.0) == b"g"
    client.setblocking(False)
    assert client.recv(100) == b"$OK#9a"


def test_end_of_stream_raises_connection_closed(pair):
    channel, client = pair
    client.sendall(b"$m10")  # mid-packet
    client.close()
    with pytest.raises(ConnectionClosed):
        channel.receive(1.0)


def test_packet_size_leaves_room_for_a_full_register_set():
    assert PACKET_SIZE >= 2 * 608 + 16
