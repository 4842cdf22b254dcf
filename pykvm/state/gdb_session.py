"""One GDB client's session: the packets of the remote protocol, answered from a target.

GDB manual, appendix E: E.2 Standard Replies (``OK``, ``E NN``, the empty
reply for anything unsupported), E.3 Packets (``?``, ``g G p P m M X c s
C S vCont H T D k Z z``), E.4 Stop Reply Packets (``T AA thread:..;``
with ``swbreak``/``hwbreak``/``watch`` reasons, ``W AA``), E.5 General
Query Packets (``qSupported``, ``qXfer:features:read``, ``qfThreadInfo``,
``qC``, ``qAttached``, ``QStartNoAckMode``).

All-stop mode only: every stop stops every vCPU, and a stop makes its
thread GDB's current one.  While the guest runs the session polls the
target (``wait`` with a short timeout) and the socket in turn, so a Ctrl-C
reaches ``target.interrupt()`` within :data:`POLL_INTERVAL`.

The register layout GDB uses is the one it read from ``target.xml``: the
session describes the CPU mode of the moment GDB asks (QEMU does the same)
and keeps that layout for ``g``/``p`` until GDB asks again.  GDB asks once
per connection, so a guest that changes mode later (real mode -> 32-bit ->
64-bit, as a kernel boots) keeps the old view: 64-bit registers are then
truncated to 32 bits, or 32-bit ones zero-extended.  Reconnect (``disconnect``,
``target remote``) to see the new mode.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from pykvm.log import get_logger
from pykvm.ratelimit import GuestLog
from pykvm.state.gdb_protocol import (
    PACKET_SIZE, ConnectionClosed, Control, PacketChannel, escape, run_length_encode, unescape,
)
from pykvm.state.gdb_target import SIGTRAP, WATCH_REASONS, GdbTarget, Layout, StopEvent, layout_for

logger = get_logger(__name__)

#: Seconds between looks at the socket while the guest runs (how late a Ctrl-C can be).
POLL_INTERVAL = 0.05
#: The most bytes one ``m`` reply carries (hex doubles them); GDB asks again for the rest.
MAX_MEMORY_READ = PACKET_SIZE // 2 - 16
#: The most bytes of a qXfer document one reply carries (escaping may double them).
MAX_XFER_CHUNK = PACKET_SIZE // 2 - 16
THREADS_PER_REPLY = 256
MAX_HW_BREAKPOINTS_KEPT = 4096
ADDRESS_LIMIT = 1 << 64

# Error replies carry errno-style numbers, as QEMU's stub does.
E_FAULT = b"E14"     # memory could not be read or written
E_INVALID = b"E22"   # a malformed packet or an argument out of range
E_NO_THREAD = b"E03"
E_TARGET = b"E01"    # the target refused
OK = b"OK"

_HEX_FIELD = re.compile(rb"[0-9a-fA-F]{1,16}\Z")


class Malformed(ValueError):
    """A packet this session cannot parse: answered E22."""


@dataclass(frozen=True)
class Resume:
    """The packet resumed the guest: run until it stops, then send the stop reply."""

    actions: dict[int | None, str]


@dataclass(frozen=True)
class Finish:
    """Send ``reply`` (unless None) and end the session (D, k)."""

    reply: bytes | None


Outcome = bytes | Resume | Finish


def parse_hex(field: bytes, limit: int = ADDRESS_LIMIT) -> int:
    """A hex number of at most 16 digits below ``limit``."""
    if not _HEX_FIELD.match(field):
        raise Malformed(f"not a hex number: {field[:32]!r}")
    value = int(field, 16)
    if value >= limit:
        raise Malformed(f"{value:#x} is out of range")
    return value


def parse_thread(field: bytes) -> int | None:
    """A thread-id: None for -1 (all), 0 for any, else the id; ``pPID.TID`` is accepted too."""
    if field.startswith(b"p") and b"." in field:
        field = field.split(b".", 1)[1]
    if field == b"-1":
        return None
    return parse_hex(field, 1 << 32)


class Session:
    """Answers one client's packets until it detaches, kills or disconnects."""

    def __init__(self, target: GdbTarget, channel: PacketChannel | None, *,
                 log: GuestLog | None = None, on_attached: Callable[[], None] = lambda: None,
                 poll_interval: float = POLL_INTERVAL) -> None:
        self.target = target
        self.channel = channel
        self.log = log or GuestLog(logger)
        self.on_attached = on_attached
        self.poll_interval = poll_interval
        self.last_stop = StopEvent(1, SIGTRAP)
        self.thread = 1                    # Hg: registers and memory
        self.step_thread: int | None = None  # Hc: the thread a legacy "s" steps (None: the current one)
        self.layout: Layout | None = None  # what GDB was told by target.xml
        self.documents: dict[str, bytes] = {}
        self.swbreak = self.hwbreak = False
        self.hw_breakpoints: set[int] = set()
        self._thread_list: list[int] = []
        self._handlers = {
            b"?": self._stop_status, b"g": self._read_all_registers, b"G": self._write_all_registers,
            b"p": self._read_register, b"P": self._write_register, b"m": self._read_memory,
            b"M": self._write_memory_hex, b"X": self._write_memory_binary, b"c": self._continue,
            b"C": self._continue_with_signal, b"s": self._step, b"S": self._step_with_signal,
            b"H": self._set_thread, b"T": self._thread_alive, b"Z": self._insert_breakpoint,
            b"z": self._remove_breakpoint, b"D": self._detach, b"k": self._kill,
        }

    # --- the session loop -------------------------------------------------------------

    def run(self) -> None:
        """Attach, serve packets, and leave the target running when the client goes."""
        detach_on_exit = True
        try:
            self.attach()
            self.on_attached()
            while True:
                incoming = self.channel.receive(None)
                if incoming is Control.INTERRUPT:
                    continue  # the guest is already stopped
                outcome = self.dispatch(incoming)
                if isinstance(outcome, Finish):
                    if outcome.reply is not None:
                        self.channel.send(outcome.reply)
                    detach_on_exit = False  # D detached already, k killed
                    return
                if isinstance(outcome, Resume):
                    self.resume_and_wait(outcome.actions)
                    continue
                self.channel.send(run_length_encode(outcome) if incoming[:1] in b"gpm" else outcome)
                if incoming == b"QStartNoAckMode":
                    self.channel.no_ack = True  # after GDB acknowledged the OK
        except ConnectionClosed as why:
            logger.debug("GDB client gone: %s", why)
        except Exception as error:  # a target bug must not kill the server's thread
            self._warn("session failed", error)
        finally:
            if detach_on_exit and self.last_stop.reason != "exited":
                self._detach_quietly()

    def attach(self) -> None:
        self.last_stop = self.target.attach()
        self.thread = self.last_stop.thread
        self._describe()

    def resume_and_wait(self, actions: dict[int | None, str]) -> None:
        """Resume; then poll the target and the socket until the guest stops; send the stop reply."""
        try:
            self.target.resume(actions)
        except Exception as error:
            self._warn("resume failed", error)
            self.channel.send(E_TARGET)
            return
        while True:
            stop = self.target.wait(self.poll_interval)
            if stop is not None:
                self.channel.send(self.note_stop(stop))
                return
            incoming = self.channel.receive(0)
            if incoming is Control.INTERRUPT:
                self.target.interrupt()
            elif incoming is not None:  # all-stop GDB sends nothing else while the guest runs
                self.log.warning(("packet while running", incoming[:1]),
                                 "GDB stub: ignoring packet %r while the guest runs", incoming[:16])

    def note_stop(self, stop: StopEvent) -> bytes:
        """Remember a stop (its thread becomes current) and return its stop reply."""
        self.last_stop = stop
        self.thread, self.step_thread = stop.thread, None
        return self.stop_reply(stop)

    def stop_reply(self, stop: StopEvent) -> bytes:
        if stop.reason == "exited":
            return b"W%02x" % ((stop.exit_status or 0) & 0xFF)
        reply = b"T%02x" % (stop.signal & 0xFF)
        if stop.reason in WATCH_REASONS:
            reply += b"%s:%x;" % (stop.reason.encode(), stop.address)
        elif stop.reason == "breakpoint":
            if stop.address in self.hw_breakpoints and self.hwbreak:
                reply += b"hwbreak:;"
            elif stop.address not in self.hw_breakpoints and self.swbreak:
                reply += b"swbreak:;"
        return reply + b"thread:%x;" % stop.thread

    def _detach_quietly(self) -> None:
        try:
            self.target.detach()
        except Exception as error:
            self._warn("detaching the target failed", error)

    def _warn(self, what: str, error: Exception) -> None:
        """A failure a client can repeat at will: rate-limited, the traceback at DEBUG."""
        self.log.warning((what, type(error).__name__), "GDB stub: %s: %s: %s", what, type(error).__name__, error)
        logger.debug("GDB stub: %s", what, exc_info=error)

    # --- dispatch ----------------------------------------------------------------------

    def dispatch(self, payload: bytes) -> Outcome:
        """The answer to one packet.  Never raises: failures become E replies."""
        try:
            return self._dispatch(payload)
        except Malformed as error:
            self.log.warning(("malformed", payload[:1]), "GDB stub: malformed packet %r: %s",
                             payload[:32], error)
            return E_INVALID
        except Exception as error:
            self.log.warning(("target failed", payload[:1], type(error).__name__),
                             "GDB stub: %r failed in the target: %s", payload[:32], error)
            return E_TARGET

    def _dispatch(self, payload: bytes) -> Outcome:
        if payload.startswith((b"q", b"Q")):
            return self._query(payload)
        if payload.startswith(b"v"):
            return self._v_packet(payload)
        handler = self._handlers.get(payload[:1])
        return handler(payload[1:]) if handler else b""

    def _query(self, payload: bytes) -> bytes:
        name, _, argument = payload.partition(b":")
        if name == b"qSupported":
            offered = set(argument.split(b";"))
            self.swbreak = b"swbreak+" in offered
            self.hwbreak = b"hwbreak+" in offered
            return (b"PacketSize=%x;qXfer:features:read+;QStartNoAckMode+;vContSupported+;"
                    b"swbreak+;hwbreak+;multiprocess-" % PACKET_SIZE)
        if name == b"QStartNoAckMode":
            return OK
        if name == b"qXfer":
            return self._xfer(argument)
        if name == b"qfThreadInfo":
            self._thread_list = list(self.target.threads())
            return self._thread_info()
        if name == b"qsThreadInfo":
            return self._thread_info()
        if name == b"qC":
            return b"QC%x" % self.thread
        if name == b"qAttached":
            return b"1"  # quitting GDB detaches (leaves the guest running)
        if name.startswith(b"qThreadExtraInfo,"):
            thread = parse_thread(name.split(b",", 1)[1])
            return f"vCPU {(thread or 1) - 1}".encode().hex().encode()
        if name == b"qSymbol":
            return OK  # no symbols wanted
        return b""

    def _v_packet(self, payload: bytes) -> Outcome:
        if payload == b"vCont?":
            return b"vCont;c;C;s;S"
        if payload.startswith(b"vCont;"):
            return Resume(self._vcont_actions(payload[6:]))
        return b""  # vMustReplyEmpty and everything we do not know

    # --- stops, threads, descriptions ---------------------------------------------------

    def _stop_status(self, _: bytes) -> bytes:
        return self.stop_reply(self.last_stop)

    def _thread_info(self) -> bytes:
        if not self._thread_list:
            return b"l"
        chunk, self._thread_list = self._thread_list[:THREADS_PER_REPLY], self._thread_list[THREADS_PER_REPLY:]
        return b"m" + b",".join(b"%x" % thread for thread in chunk)

    def _set_thread(self, argument: bytes) -> bytes:
        operation, thread = argument[:1], parse_thread(argument[1:])
        if operation not in (b"g", b"c"):
            raise Malformed(f"unknown H operation {operation!r}")
        if thread is None or thread == 0:  # "all" or "any"
            if operation == b"c":
                self.step_thread = None
            return OK
        if thread not in self.target.threads():
            return E_NO_THREAD
        if operation == b"g":
            self.thread = thread
        else:
            self.step_thread = thread
        return OK

    def _thread_alive(self, argument: bytes) -> bytes:
        return OK if parse_thread(argument) in self.target.threads() else E_NO_THREAD

    def _describe(self) -> None:
        architecture = self.target.arch(self.thread)
        self.layout = layout_for(architecture)
        self.documents = self.layout.documents()

    def _xfer(self, argument: bytes) -> bytes:
        fields = argument.split(b":")
        if len(fields) != 4 or fields[0] != b"features" or fields[1] != b"read":
            return b""
        annex, span = fields[2].decode("ascii", "replace"), fields[3]
        offset_field, comma, length_field = span.partition(b",")
        if not comma:
            raise Malformed("qXfer needs offset,length")
        offset, length = parse_hex(offset_field), parse_hex(length_field)
        if annex == "target.xml" and offset == 0:
            self._describe()  # the CPU mode of now (see the module docstring)
        document = self.documents.get(annex)
        if document is None:
            return b"E00"
        chunk = document[offset:offset + min(length, MAX_XFER_CHUNK)]
        more = offset + len(chunk) < len(document)
        return (b"m" if more else b"l") + escape(chunk)

    # --- registers ----------------------------------------------------------------------

    def _read_all_registers(self, _: bytes) -> bytes:
        return self.layout.encode_all(self.target.read_registers(self.thread)).encode()

    def _write_all_registers(self, argument: bytes) -> bytes:
        data = _from_hex(argument)
        if len(data) > self.layout.g_size:
            raise Malformed(f"{len(data)} bytes of registers, the layout has {self.layout.g_size}")
        current = self.target.read_registers(self.thread)
        self.target.write_registers(self.thread, self.layout.decode_all(data, current))
        return OK

    def _register(self, field: bytes):
        number = parse_hex(field, 1 << 16)
        if number >= len(self.layout.registers):
            raise Malformed(f"no register {number}")
        return self.layout.registers[number]

    def _read_register(self, argument: bytes) -> bytes:
        register = self._register(argument)
        return self.layout.encode(register, self.target.read_registers(self.thread)).encode()

    def _write_register(self, argument: bytes) -> bytes:
        number, equals, value = argument.partition(b"=")
        register, data = self._register(number), _from_hex(value)
        if not equals or len(data) != register.size:
            raise Malformed(f"{register.name} takes {register.size} bytes")
        current = self.target.read_registers(self.thread)
        if register.source not in current:
            return E_TARGET
        self.target.write_registers(self.thread, {register.source: self.layout.merge(register, data, current)})
        return OK

    def _set_pc(self, thread: int, address: bytes) -> None:
        if address:
            self.target.write_registers(thread, {"rip": parse_hex(address)})

    # --- memory -------------------------------------------------------------------------

    def _address_length(self, field: bytes) -> tuple[int, int]:
        address, comma, length = field.partition(b",")
        if not comma:
            raise Malformed("needs address,length")
        return parse_hex(address), parse_hex(length)

    def _read_memory(self, argument: bytes) -> bytes:
        address, length = self._address_length(argument)
        length = min(length, MAX_MEMORY_READ, ADDRESS_LIMIT - address)
        if length == 0:
            return E_INVALID
        try:
            data = self.target.read_memory(self.thread, address, length)
        except Exception as error:
            logger.debug("GDB stub: reading %d bytes at %#x: %s", length, address, error)
            return E_FAULT
        return bytes(data[:length]).hex().encode() if data else E_FAULT

    def _write_memory(self, header: bytes, data: bytes) -> bytes:
        address, length = self._address_length(header)
        if length != len(data) or address + length > ADDRESS_LIMIT:
            raise Malformed(f"{len(data)} bytes of data for a length of {length}")
        if not data:
            return OK  # GDB probes X support with an empty write
        try:
            self.target.write_memory(self.thread, address, data)
        except Exception as error:
            logger.debug("GDB stub: writing %d bytes at %#x: %s", length, address, error)
            return E_FAULT
        return OK

    def _write_memory_hex(self, argument: bytes) -> bytes:
        header, _, data = argument.partition(b":")
        return self._write_memory(header, _from_hex(data))

    def _write_memory_binary(self, argument: bytes) -> bytes:
        header, colon, data = argument.partition(b":")
        if not colon:
            raise Malformed("X needs address,length:data")
        try:
            return self._write_memory(header, unescape(data))
        except ValueError as error:
            raise Malformed(str(error)) from None

    # --- running ------------------------------------------------------------------------

    def _continue(self, argument: bytes) -> Resume:
        self._set_pc(self.thread, argument)
        return Resume({None: "c"})

    def _step(self, argument: bytes) -> Resume:
        thread = self.step_thread or self.thread
        self._set_pc(thread, argument)
        return Resume({thread: "s"})  # the other vCPUs stay stopped

    def _continue_with_signal(self, argument: bytes) -> Resume:
        return self._continue(_after_signal(argument))  # a VM has no signals to deliver

    def _step_with_signal(self, argument: bytes) -> Resume:
        return self._step(_after_signal(argument))

    def _vcont_actions(self, argument: bytes) -> dict[int | None, str]:
        """``vCont;s:1;c``: per thread, the first action naming it (or naming all) applies."""
        actions: dict[int | None, str] = {}
        for part in argument.split(b";"):
            action, _, thread_field = part.partition(b":")
            if action in (b"c", b"s"):
                pass
            elif action[:1] in (b"C", b"S"):
                parse_hex(action[1:], 256)  # the signal GDB would deliver: a VM has none
            else:
                raise Malformed(f"unsupported vCont action {part[:16]!r}")
            thread = parse_thread(thread_field) if thread_field else None
            actions.setdefault(thread, action[:1].lower().decode())
        if not actions:
            raise Malformed("vCont without actions")
        return actions

    # --- breakpoints --------------------------------------------------------------------

    def _breakpoint_arguments(self, argument: bytes) -> tuple[int, int, int]:
        fields = argument.split(b";", 1)[0].split(b",")  # ";cond..." lists are not negotiated
        if len(fields) != 3:
            raise Malformed("Z/z needs type,address,kind")
        kind = parse_hex(fields[0], 5)
        return kind, parse_hex(fields[1]), parse_hex(fields[2], 1 << 32)

    def _insert_breakpoint(self, argument: bytes) -> bytes:
        kind, address, length = self._breakpoint_arguments(argument)
        if not self.target.insert_breakpoint(kind, address, length):
            return b""
        if kind == 1 and len(self.hw_breakpoints) < MAX_HW_BREAKPOINTS_KEPT:
            self.hw_breakpoints.add(address)
        return OK

    def _remove_breakpoint(self, argument: bytes) -> bytes:
        kind, address, length = self._breakpoint_arguments(argument)
        if not self.target.remove_breakpoint(kind, address, length):
            return b""
        if kind == 1:
            self.hw_breakpoints.discard(address)
        return OK

    def _detach(self, _: bytes) -> Finish:
        self.target.detach()
        return Finish(OK)

    def _kill(self, _: bytes) -> Finish:
        self.target.kill()
        return Finish(None)  # GDB expects no reply to k


def _from_hex(text: bytes) -> bytes:
    try:
        return bytes.fromhex(text.decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        raise Malformed(f"not hex data: {text[:32]!r}") from None


def _after_signal(argument: bytes) -> bytes:
    """The address part of ``C sig;addr`` / ``S sig;addr``."""
    signal, _, address = argument.partition(b";")
    parse_hex(signal, 256)
    return address
