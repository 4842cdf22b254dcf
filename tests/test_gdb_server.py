"""The GDB stub against the fake target, driven by a raw socket client (no GDB)."""

from __future__ import annotations

import os
import resource
import socket
import xml.etree.ElementTree as ET

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pykvm.state.gdb_fake import FakeX86Target, Op
from pykvm.state.gdb_protocol import PACKET_SIZE, Control, Packet, PacketReader, escape, frame, run_length_decode
from pykvm.state.gdb_server import GdbAddress, GdbServer
from pykvm.state.gdb_session import MAX_MEMORY_READ, Finish, Resume, Session
from pykvm.state.gdb_target import I386, X86_64, GdbTarget, StopEvent

TIMEOUT = 5.0


class Client:
    """GDB's side of the wire, just enough to test the stub."""

    def __init__(self, address: GdbAddress, *, ack: bool = True) -> None:
        if address.family == "unix":
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.settimeout(TIMEOUT)
            self.sock.connect(address.path)
        else:
            self.sock = socket.create_connection((address.host, address.port), timeout=TIMEOUT)
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # as GDB does
        self.ack = ack
        self.reader = PacketReader()
        self.events: list = []

    def close(self) -> None:
        self.sock.close()

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def send(self, payload: bytes) -> None:
        self.send_raw(frame(payload))
        if self.ack:
            assert self.next_event() is Control.ACK

    def next_event(self):
        while not self.events:
            data = self.sock.recv(65536)
            if not data:
                raise EOFError("the stub closed the connection")
            self.events += self.reader.feed(data)
        return self.events.pop(0)

    def reply(self) -> bytes:
        event = self.next_event()
        assert isinstance(event, Packet) and event.problem is None, event
        if self.ack:
            self.send_raw(b"+")
        return run_length_decode(event.payload)

    def command(self, payload: bytes) -> bytes:
        self.send(payload)
        return self.reply()

    def closed_by_stub(self) -> bool:
        try:
            return self.sock.recv(1) == b""
        except ConnectionResetError:
            return True


@pytest.fixture
def fake():
    return FakeX86Target(vcpus=2, program={0x1010: Op("store", 0x2000, 8, 0x1234), 0x1040: Op("spin"),
                                           0x1080: Op("exit", value=3)})


@pytest.fixture
def server(fake):
    with GdbServer(fake, "tcp::0") as gdb_server:
        yield gdb_server


@pytest.fixture
def client(server):
    connection = Client(server.bound_address)
    assert server.wait_for_client(TIMEOUT)
    yield connection
    connection.close()


def negotiate(client: Client) -> None:
    assert b"swbreak+" in client.command(b"qSupported:multiprocess+;swbreak+;hwbreak+;xmlRegisters=i386")
    assert client.command(b"QStartNoAckMode") == b"OK"
    client.ack = False


# --- addresses and the server's life --------------------------------------------------


@pytest.mark.parametrize("spec, expected", [
    ("tcp::1234", GdbAddress("tcp", "127.0.0.1", 1234)),
    ("tcp:0.0.0.0:99", GdbAddress("tcp", "0.0.0.0", 99)),
    ("tcp:[::1]:5", GdbAddress("tcp", "::1", 5)),
    ("unix:/run/gdb.sock", GdbAddress("unix", path="/run/gdb.sock")),
])
def test_addresses_use_qemus_spelling(spec, expected):
    assert GdbAddress.parse(spec) == expected


@pytest.mark.parametrize("spec", ["", "1234", "udp::1", "tcp:", "tcp:host", "tcp::70000", "tcp::-1", "unix:"])
def test_bad_addresses_are_refused(spec):
    with pytest.raises(ValueError):
        GdbAddress.parse(spec)


def test_wait_for_client_times_out_without_one(server):
    assert server.wait_for_client(0) is False


def test_a_unix_socket_server_serves_and_removes_its_socket(fake, tmp_path):
    path = tmp_path / "gdb.sock"
    with GdbServer(fake, f"unix:{path}") as gdb_server:
        client = Client(gdb_server.bound_address)
        assert client.command(b"?") == b"T05thread:1;"
        client.close()
    assert not path.exists()


def test_close_with_a_client_attached_detaches_the_target(fake):
    gdb_server = GdbServer(fake, "tcp::0")
    gdb_server.start()
    client = Client(gdb_server.bound_address)
    assert client.command(b"?") == b"T05thread:1;"
    gdb_server.close()
    assert client.closed_by_stub()
    assert fake.calls[-1] == ("detach",)
    client.close()


def test_descriptors_past_1023_work(fake):
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 1200:
        pytest.skip(f"RLIMIT_NOFILE is {soft}: cannot open 1100 descriptors")
    fillers = [os.open(os.devnull, os.O_RDONLY) for _ in range(1100)]  # select() would fail now
    try:
        with GdbServer(fake, "tcp::0") as gdb_server:
            client = Client(gdb_server.bound_address)
            assert client.sock.fileno() > 1023
            assert client.command(b"?") == b"T05thread:1;"
            client.close()
    finally:
        for fd in fillers:
            os.close(fd)


def test_a_target_may_close_the_server_from_its_kill(fake):
    gdb_server = GdbServer(fake, "tcp::0")
    fake.kill = gdb_server.close  # a machine that shuts down, its GDB stub with it
    gdb_server.start()
    client = Client(gdb_server.bound_address)
    client.send(b"k")
    assert client.closed_by_stub()
    gdb_server._thread.join(TIMEOUT)
    assert not gdb_server._thread.is_alive()
    client.close()


# --- negotiation and registers --------------------------------------------------------


def test_qsupported_advertises_what_the_stub_does(client):
    features = client.command(b"qSupported:swbreak+;hwbreak+").split(b";")
    assert b"PacketSize=%x" % PACKET_SIZE in features
    for feature in (b"qXfer:features:read+", b"QStartNoAckMode+", b"vContSupported+", b"swbreak+",
                    b"hwbreak+", b"multiprocess-"):
        assert feature in features


def test_no_ack_mode_stops_acknowledgments(client):
    negotiate(client)
    client.send_raw(frame(b"?"))
    assert client.next_event() == Packet(b"T05thread:1;")  # no "+" before it


def test_a_bad_checksum_is_refused_and_the_retransmission_answered(client):
    client.send_raw(b"$?#00")
    assert client.next_event() is Control.NAK
    assert client.command(b"?") == b"T05thread:1;"


def test_an_overlong_packet_is_refused_and_the_session_goes_on(client):
    client.send_raw(b"$" + b"M0,1:" + b"0" * (2 * PACKET_SIZE) + b"#00")
    assert client.next_event() is Control.NAK
    assert client.command(b"?") == b"T05thread:1;"


def test_g_sends_the_x86_64_layout(client, fake):
    fake.registers[1].update(rax=0x1122334455667788, r15=0xF, eflags=0x246, fs_base=0xABC)
    data = bytes.fromhex(client.command(b"g").decode())
    assert len(data) == X86_64.g_size == 608
    assert data[0:8] == (0x1122334455667788).to_bytes(8, "little")
    assert data[15 * 8:16 * 8] == (0xF).to_bytes(8, "little")
    assert data[16 * 8:17 * 8] == (0x1000).to_bytes(8, "little")    # rip
    assert data[17 * 8:17 * 8 + 4] == (0x246).to_bytes(4, "little")  # eflags
    fs_base_offset = sum(r.size for r in X86_64.registers[:X86_64.registers.index(
        next(r for r in X86_64.registers if r.name == "fs_base"))])
    assert data[fs_base_offset:fs_base_offset + 8] == (0xABC).to_bytes(8, "little")


def test_registers_the_target_lacks_are_unavailable(client, fake):
    del fake.registers[1]["st0"]
    text = client.command(b"g").decode()
    st0 = next(i for i, r in enumerate(X86_64.registers) if r.name == "st0")
    offset = 2 * sum(r.size for r in X86_64.registers[:st0])
    assert text[offset:offset + 20] == "x" * 20
    assert client.command(b"p%x" % st0) == b"x" * 20
    assert client.command(b"P%x=%s" % (st0, b"00" * 10)) == b"E01"


def test_G_writes_every_register(client, fake):
    data = bytearray(bytes.fromhex(client.command(b"g").decode()))
    data[8:16] = (0xCAFE).to_bytes(8, "little")  # rbx
    assert client.command(b"G" + data.hex().encode()) == b"OK"
    assert fake.registers[1]["rbx"] == 0xCAFE
    assert client.command(b"G" + data.hex().encode() + b"00") == b"E22"  # not a register boundary


def test_p_and_P_read_and_write_one_register(client, fake):
    assert client.command(b"P10=%s" % (0x2000).to_bytes(8, "little").hex().encode()) == b"OK"  # rip
    assert fake.registers[1]["rip"] == 0x2000
    assert client.command(b"p10") == (0x2000).to_bytes(8, "little").hex().encode()
    assert client.command(b"p999") == b"E22"
    assert client.command(b"P0=00") == b"E22"  # rax takes 8 bytes


def test_a_32_bit_register_write_keeps_the_high_half(client, fake):
    fake.mode = "i386"
    fake.registers[1]["rax"] = 0xDEADBEEF_00000005
    client.command(b"qXfer:features:read:target.xml:0,fff")  # GDB learns the mode from here
    assert client.command(b"p0") == b"05000000"
    assert client.command(b"P0=77000000") == b"OK"
    assert fake.registers[1]["rax"] == 0xDEADBEEF_00000077
    assert len(client.command(b"g")) == 2 * I386.g_size


# --- target descriptions ----------------------------------------------------------------


def read_document(client: Client, annex: str, chunk: int = 0x50) -> bytes:
    document, offset = b"", 0
    while True:
        reply = client.command(b"qXfer:features:read:%s:%x,%x" % (annex.encode(), offset, chunk))
        assert reply[:1] in (b"m", b"l"), reply
        document += reply[1:]
        offset += len(reply) - 1
        if reply[:1] == b"l":
            return document


def test_the_description_is_read_in_pieces_with_its_included_features(client):
    target = read_document(client, "target.xml")
    assert target == X86_64.documents()["target.xml"]
    root = ET.fromstring(target.replace(b"xi:include", b"include"))
    assert root.find("architecture").text == "i386:x86-64"
    names = []
    for include in root.iter("include"):
        feature = ET.fromstring(read_document(client, include.get("href")))
        names += [reg.get("name") for reg in feature.iter("reg")]
    assert names == [register.name for register in X86_64.registers]
    assert names[:18] == ["rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp", *[f"r{n}" for n in range(8, 16)],
                          "rip", "eflags"]


def test_an_unknown_annex_is_an_error_and_offsets_past_the_end_are_empty(client):
    assert client.command(b"qXfer:features:read:nonsense.xml:0,100") == b"E00"
    assert client.command(b"qXfer:features:read:target.xml:100000,100") == b"l"
    assert client.command(b"qXfer:features:read:target.xml:zz,100") == b"E22"
    assert client.command(b"qXfer:auxv:read::0,100") == b""


def test_the_description_follows_the_cpu_mode_when_gdb_asks(client, fake):
    fake.mode = "i8086"
    assert b"<architecture>i8086</architecture>" in read_document(client, "target.xml")
    assert b'name="eip"' in read_document(client, "i386-core.xml")


# --- memory -----------------------------------------------------------------------------


def test_m_reads_memory_and_M_and_X_write_it(client, fake):
    assert client.command(b"M2000,4:01020304") == b"OK"
    binary = bytes([0x23, 0x24, 0x7D, 0x2A, 0x03, 0x00])  # "#$}*", Ctrl-C and NUL: escaped or raw
    assert client.command(b"X2004,%x:" % len(binary) + escape(binary)) == b"OK"
    assert client.command(b"m2000,a") == b"01020304" + binary.hex().encode()
    assert client.command(b"X2000,0:") == b"OK"  # GDB's probe for X


def test_a_read_past_the_end_is_partial_then_an_error(client, fake):
    fake.memory[-2:] = b"\xaa\xbb"
    assert client.command(b"m%x,10" % (fake.memory_size - 2)) == b"aabb"
    assert client.command(b"m%x,10" % fake.memory_size) == b"E14"
    assert client.command(b"M%x,2:0000" % (fake.memory_size - 1)) == b"E14"


def test_a_huge_read_is_capped(client):
    reply = client.command(b"m0,ffffffffffffffff")
    assert len(reply) == 2 * MAX_MEMORY_READ


@pytest.mark.parametrize("packet", [b"mzz,1", b"m1", b"m10000000000000000,1", b"M0,2:00", b"M0,1:0g",
                                    b"X0,2:a", b"Z9,0,1", b"Z0,0", b"Hq1", b"vCont;x", b"vCont;", b"C;zz"])
def test_malformed_packets_get_E22(client, packet):
    assert client.command(packet) == b"E22"


def test_unknown_packets_get_the_empty_reply(client):
    assert client.command(b"Jfoo") == b""
    assert client.command(b"vMustReplyEmpty") == b""
    assert client.command(b"qTStatus") == b""


# --- threads ----------------------------------------------------------------------------


def test_threads_are_listed_and_selected(client, fake):
    assert client.command(b"qfThreadInfo") == b"m1,2"
    assert client.command(b"qsThreadInfo") == b"l"
    assert client.command(b"qC") == b"QC1"
    assert client.command(b"qAttached") == b"1"
    assert bytes.fromhex(client.command(b"qThreadExtraInfo,2").decode()) == b"vCPU 1"
    fake.registers[2]["rax"] = 0x42
    assert client.command(b"Hg2") == b"OK"
    assert client.command(b"p0") == (0x42).to_bytes(8, "little").hex().encode()
    assert client.command(b"T2") == b"OK"
    assert client.command(b"T9") == b"E03"
    assert client.command(b"Hg9") == b"E03"
    assert client.command(b"Hgp1.2") == b"OK"  # the multiprocess spelling is understood too


# --- running and stopping ---------------------------------------------------------------


def test_vcont_steps_one_thread_and_continues_the_rest(client, fake):
    negotiate(client)
    assert client.command(b"vCont?") == b"vCont;c;C;s;S"
    assert client.command(b"vCont;s:2;c") == b"T05thread:2;"
    assert fake.calls[-1] == ("resume", {2: "s", None: "c"})
    assert fake.registers[2]["rip"] == 0x1004
    assert client.command(b"qC") == b"QC2"  # the stop's thread is current


def test_legacy_s_steps_the_hc_thread_from_an_address(client, fake):
    assert client.command(b"Hc2") == b"OK"
    assert client.command(b"s1100") == b"T05thread:2;"
    assert fake.calls[-1] == ("resume", {2: "s"})
    assert fake.registers[2]["rip"] == 0x1104


def test_a_software_breakpoint_stop_says_swbreak(client, fake):
    negotiate(client)
    assert client.command(b"Z0,1008,1") == b"OK"
    assert client.command(b"c") == b"T05swbreak:;thread:1;"
    assert fake.registers[1]["rip"] == 0x1008
    assert client.command(b"z0,1008,1") == b"OK"
    assert fake.breakpoints == set()


def test_continuing_from_a_breakpoint_goes_round_the_loop_to_it_again(client, fake):
    fake.program[0x1008] = Op("jump", 0x1000)
    assert client.command(b"Z1,1004,1") == b"OK"
    assert client.command(b"vCont;c:1") == b"T05thread:1;"  # thread 2 has no action: it stays
    assert fake.executed == 1  # the nop at 0x1000
    assert client.command(b"vCont;c:1") == b"T05thread:1;"  # the breakpoint under the PC does not fire at once
    assert fake.executed == 4 and fake.registers[1]["rip"] == 0x1004  # 0x1004, the jump, 0x1000
    assert fake.registers[2]["rip"] == 0x1000


def test_a_hardware_breakpoint_stop_says_hwbreak(client, fake):
    negotiate(client)
    assert client.command(b"Z1,100c,1") == b"OK"
    assert client.command(b"vCont;c") == b"T05hwbreak:;thread:1;"


def test_breakpoint_reasons_are_left_out_unless_negotiated(client):
    assert client.command(b"Z0,1008,1") == b"OK"
    assert client.command(b"c") == b"T05thread:1;"


def test_a_write_watchpoint_reports_the_data_address(client, fake):
    assert client.command(b"Z2,2000,8") == b"OK"
    assert client.command(b"C05") == b"T05watch:2000;thread:1;"
    assert fake.registers[1]["rip"] == 0x1014  # after the store
    assert client.command(b"m2000,8") == (0x1234).to_bytes(8, "little").hex().encode()


def test_ctrl_c_interrupts_a_running_guest(client, fake):
    client.send(b"c1040")  # a jump-to-self: only an interrupt stops it
    client.send_raw(b"\x03")
    assert client.reply() == b"T02thread:1;"
    assert ("interrupt",) in fake.calls


def test_packets_while_running_are_ignored(client, fake):
    negotiate(client)
    client.send(b"c1040")
    client.send(b"g")
    client.send_raw(b"\x03")
    assert client.reply() == b"T02thread:1;"
    assert client.command(b"?") == b"T02thread:1;"


def test_an_interrupt_while_stopped_is_ignored(client):
    client.send_raw(b"\x03")
    assert client.command(b"?") == b"T05thread:1;"


def test_the_guest_ending_is_reported_with_its_status(client):
    assert client.command(b"c1080") == b"W03"
    assert client.command(b"?") == b"W03"


# --- leaving ------------------------------------------------------------------------------


def test_D_detaches_and_hangs_up(client, fake):
    assert client.command(b"Z0,1008,1") == b"OK"
    assert client.command(b"D") == b"OK"
    assert client.closed_by_stub()
    assert fake.calls[-1] == ("detach",) and fake.breakpoints == set()


def test_k_kills_without_a_reply_and_hangs_up(client, fake):
    client.send(b"k")
    assert client.closed_by_stub()
    assert fake.calls[-1] == ("kill",)


def test_a_client_vanishing_mid_packet_detaches_and_the_next_one_is_served(server, client, fake):
    client.send_raw(b"$m10")
    client.close()
    second = Client(server.bound_address)
    try:
        assert second.command(b"?") == b"T05thread:1;"  # served only after the first session ended
    finally:
        second.close()
    assert fake.calls.count(("attach",)) == 2
    assert fake.calls.index(("detach",)) < len(fake.calls) - 1


def test_a_client_vanishing_while_the_guest_runs_leaves_it_running(server, client, fake):
    client.send(b"c1040")
    client.close()
    second = Client(server.bound_address)
    try:
        assert second.command(b"?") == b"T05thread:1;"
    finally:
        second.close()
    assert ("detach",) in fake.calls and ("interrupt",) not in fake.calls


# --- a target that fails ---------------------------------------------------------------


class BrokenTarget(FakeX86Target):
    def read_registers(self, thread):
        raise RuntimeError("KVM_GET_REGS failed")

    def resume(self, actions):
        raise RuntimeError("KVM_RUN failed")


def test_target_failures_become_errors_and_the_session_goes_on():
    with GdbServer(BrokenTarget(), "tcp::0") as gdb_server:
        client = Client(gdb_server.bound_address)
        assert client.command(b"g") == b"E01"
        assert client.command(b"c") == b"E01"
        assert client.command(b"?") == b"T05thread:1;"
        client.close()


def test_the_fake_is_a_gdb_target():
    assert isinstance(FakeX86Target(), GdbTarget)
    with pytest.raises(ValueError):
        StopEvent(1, reason="watch")  # a watchpoint stop needs its data address


# --- any packet at all ------------------------------------------------------------------

packets = st.one_of(
    st.binary(max_size=64),
    st.tuples(st.sampled_from([b"m", b"M", b"X", b"g", b"G", b"p", b"P", b"Z", b"z", b"H", b"T", b"vCont;",
                               b"qXfer:features:read:", b"qSupported:", b"qThreadExtraInfo,", b"c", b"s", b"C"]),
              st.binary(max_size=40)).map(b"".join),
    st.tuples(st.sampled_from([b"m", b"M", b"Z2,", b"qXfer:features:read:target.xml:"]),
              st.integers(0, 2**70).map(lambda n: b"%x" % n), st.sampled_from([b",", b":", b",1:"]),
              st.integers(0, 2**70).map(lambda n: b"%x" % n)).map(b"".join),
)


@settings(max_examples=400, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(payload=packets)
def test_any_packet_gets_a_bounded_answer_and_never_an_exception(payload):
    target = FakeX86Target(program={0x1000: Op("spin")})
    session = Session(target, channel=None)
    session.attach()
    outcome = session.dispatch(payload)
    assert isinstance(outcome, (bytes, Resume, Finish))
    if isinstance(outcome, bytes):
        assert len(outcome) <= PACKET_SIZE
    if isinstance(outcome, Resume):
        assert set(outcome.actions.values()) <= {"c", "s"}
