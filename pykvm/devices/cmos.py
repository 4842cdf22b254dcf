"""The PC's CMOS RAM and real-time clock: a Motorola MC146818 at ports 0x70/0x71.

Registers and bits follow the MC146818A datasheet ("Real-Time Clock Plus
RAM"), as QEMU's ``hw/rtc/mc146818rtc.c`` models it for ``-M pc``; the PC's
configuration bytes follow QEMU's ``pc_cmos_init`` (``hw/i386/pc.c``).

Port 0x70 (offset 0) takes the index of one of 128 bytes; its bit 7 masks
the NMI on a PC.  Port 0x71 (offset 1) reads and writes the indexed byte::

    0x00-0x09  seconds, alarm seconds, minutes, alarm minutes, hours, alarm hours,
               day of week (Sunday = 1), day of month, month, year (two digits)
    0x0a  A    UIP (bit 7, read-only), divider (bits 4-6), periodic rate (bits 0-3)
    0x0b  B    SET, PIE, AIE, UIE, SQWE, DM (binary), 24/12, DSE
    0x0c  C    IRQF, PF, AF, UF: read-only, cleared by reading
    0x0d  D    VRT: always 0x80 (the battery is good)
    0x32       century (0x37, the IBM PS/2 century byte, is the same register)
    others     battery-backed RAM: the PC keeps its memory size and equipment there

Time comes from an injectable host clock.  The guest's clock is the host's
plus an offset that changes when the guest sets the time (QEMU's
``base_rtc``/``offset``): setting SET in B freezes the registers, the guest
writes them, and clearing SET starts the clock from them, keeping the
sub-second phase.  Leaving divider reset (A bits 5-6) starts the first
update half a second later, as the datasheet says.

A device has no timer of its own, so the three interrupt sources (periodic,
alarm, update-ended) are *latched lazily*: every register access first
latches all events up to the current time and drives IRQ 8 as a timely timer
would have, :meth:`Cmos.advance` does the same for the platform's timer, and
:meth:`Cmos.next_event` says when the next event that raises IRQ 8 is due.
As in QEMU, the periodic flag runs only while PIE enables it, UIE is cleared
when SET is written, and no update or alarm happens while the dividers are
held in reset.

Where this differs from QEMU, on purpose: an alarm hour in 12-hour mode uses
its own PM bit (QEMU's ``convert_hour`` takes the current hour's); a time
register written while the clock runs keeps the other registers current and
the sub-second phase (QEMU may start from registers last refreshed at the
previous read).  Daylight saving (DSE) is stored and ignored, as in QEMU;
the square wave (SQWE) drives nothing.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

from pykvm.devices.calendar import civil_from_days, days_from_civil
from pykvm.errors import DeviceError
from pykvm.platform import layout

# Register indexes.
SECONDS = 0x00
SECONDS_ALARM = 0x01
MINUTES = 0x02
MINUTES_ALARM = 0x03
HOURS = 0x04
HOURS_ALARM = 0x05
DAY_OF_WEEK = 0x06
DAY_OF_MONTH = 0x07
MONTH = 0x08
YEAR = 0x09
REG_A = 0x0A
REG_B = 0x0B
REG_C = 0x0C
REG_D = 0x0D
SHUTDOWN_STATUS = 0x0F
CENTURY = 0x32
IBM_PS2_CENTURY = 0x37  # an alias of CENTURY, as in QEMU
CMOS_SIZE = 128
TIME_REGISTERS = (SECONDS, MINUTES, HOURS, DAY_OF_WEEK, DAY_OF_MONTH, MONTH, YEAR, CENTURY)

# Register A.
A_UIP = 0x80  # update in progress
A_DIVIDER = 0x70
A_DIVIDER_NORMAL = 0x20  # 32.768 kHz time base; 0x00 and 0x10 run too (QEMU)
A_DIVIDER_RESET = 0x60  # both bits set: the divider chain is held in reset
A_RATE = 0x0F

# Register B.
B_SET = 0x80
B_PIE = 0x40  # periodic interrupt enable
B_AIE = 0x20  # alarm interrupt enable
B_UIE = 0x10  # update-ended interrupt enable
B_SQWE = 0x08
B_DM = 0x04  # data mode: 1 binary, 0 BCD
B_24H = 0x02
B_DSE = 0x01

# Register C: the flags sit at the same bits as their enables in B.
C_IRQF = 0x80
C_PF = 0x40
C_AF = 0x20
C_UF = 0x10
C_FLAGS = C_PF | C_AF | C_UF

D_VRT = 0x80
HOUR_PM = 0x80  # the hours registers' PM bit in 12-hour mode
ALARM_DONT_CARE = 0xC0  # an alarm byte with both top bits set matches any value
NMI_MASK = 0x80  # bit 7 of the index port
S3_RESUME = 0xFE  # SHUTDOWN_STATUS value QEMU sets on suspend to RAM

# QEMU's power-on values.
RESET_A = 0x26  # normal divider, 1024 Hz periodic rate
RESET_B = B_24H  # 24-hour BCD

NS = 1_000_000_000
RTC_HZ = 32768  # the time base the periodic rates divide
UIP_HOLD_NS = 8 * NS // RTC_HZ  # UIP is set for the last 244 us of every second
SECONDS_PER_DAY = 86400

# pc_cmos_init's configuration bytes.
BASE_MEMORY_LO, BASE_MEMORY_HI = 0x15, 0x16
EXTENDED_MEMORY_LO, EXTENDED_MEMORY_HI = 0x17, 0x18
EXTENDED_MEMORY_COPY_LO, EXTENDED_MEMORY_COPY_HI = 0x30, 0x31
MEMORY_ABOVE_16M_LO, MEMORY_ABOVE_16M_HI = 0x34, 0x35
MEMORY_ABOVE_4G = (0x5B, 0x5C, 0x5D)
CPU_COUNT = 0x5F  # CPUs - 1
FLOPPY_TYPES = 0x10
HARD_DISKS = 0x12
EQUIPMENT = 0x14
BOOT_DEVICES = 0x3D  # first and second boot device, a nibble each
BOOT_DEVICE_3 = 0x38  # third boot device in the high nibble; bit 0 skips the floppy signature check
DISK_TRANSLATION = 0x39
EQUIPMENT_FPU = 0x02
EQUIPMENT_PS2_MOUSE = 0x04
_BOOT_NIBBLES = {"a": 1, "b": 1, "c": 2, "d": 3, "n": 4}


class Cmos:
    """The MC146818 RTC and its 128 bytes of CMOS RAM (registered at port 0x70, 2 ports).

    ``clock()`` returns host time in seconds since the epoch (the guest's
    clock starts equal to it: QEMU's ``-rtc base=utc``).  ``interrupt(level)``
    drives IRQ 8 and is called whenever the level changes.
    """

    name = "cmos"
    length = 2

    def __init__(
        self,
        clock: Callable[[], float] = time.time,
        interrupt: Callable[[bool], None] | None = None,
    ) -> None:
        self.clock = clock
        self.interrupt = interrupt
        self._ram = bytearray(CMOS_SIZE)
        self._ram[REG_A] = RESET_A
        self._ram[REG_B] = RESET_B
        self._ram[REG_D] = D_VRT
        self._index = 0
        self._nmi_masked = False
        self._flags = 0  # register C
        self._irq_level = False
        now = _to_ns(clock())
        self._offset_ns = 0  # guest RTC time = host time + this
        self._latched_ns = now  # every event up to here is in register C
        self._periodic_next: int | None = None  # 32 kHz cycle of the next periodic event

    # -- snapshots (pykvm.state.snapshot) ----------------------------------------------
    def save_state(self) -> dict:
        """RAM, index, NMI mask, register C, the line, the clock's offset and latches (version 1).

        Times are host wall-clock ns: restored, the RTC follows the host's clock (QEMU's base=utc)."""
        return {"version": 1, "ram": bytes(self._ram), "index": self._index, "nmi_masked": self._nmi_masked,
                "flags": self._flags, "irq": self._irq_level, "offset_ns": self._offset_ns,
                "latched_ns": self._latched_ns, "periodic_next": self._periodic_next}

    def load_state(self, state: dict) -> None:
        from pykvm.devices import check_state

        s = check_state(self, state)
        self._ram[:] = s["ram"]
        self._index, self._nmi_masked, self._flags = s["index"], s["nmi_masked"], s["flags"]
        self._irq_level, self._offset_ns, self._latched_ns = s["irq"], s["offset_ns"], s["latched_ns"]
        self._periodic_next = s["periodic_next"]

    # -- the host's side -----------------------------------------------------------

    @property
    def nmi_masked(self) -> bool:
        """Bit 7 of the last index written to port 0x70."""
        return self._nmi_masked

    @property
    def index(self) -> int:
        return self._index

    def cmos_byte(self, index: int) -> int:
        """A stored byte, without the side effects of a guest read."""
        return self._ram[_check_index(index)]

    def set_cmos_byte(self, index: int, value: int) -> None:
        """Store a RAM byte from the host (QEMU's ``mc146818rtc_set_cmos_data``)."""
        self._ram[_check_index(index)] = value & 0xFF

    def set_pc_config(self, memory_size: int, cpus: int, boot_order: str = "cad") -> None:
        """The bytes QEMU's ``pc_cmos_init`` writes for ``-m memory_size -smp cpus -boot boot_order``.

        Memory below 4 GiB is what pykvm maps below its MMIO hole
        (``layout.ram_regions``); QEMU computes no checksum (0x2e/0x2f)
        and SeaBIOS checks none, so neither does this.
        """
        if memory_size < 0 or cpus < 1 or len(boot_order) > 3 or not set(boot_order) <= _BOOT_NIBBLES.keys():
            raise DeviceError(f"cannot describe memory {memory_size:#x}, {cpus} CPUs, boot order {boot_order!r}")
        regions = layout.ram_regions(memory_size)
        below_4g = regions[0][1]
        above_4g = regions[1][1] if len(regions) > 1 else 0
        self._store16(BASE_MEMORY_LO, min(below_4g // 1024, 640))
        extended = min(max(below_4g - 1024 * 1024, 0) // 1024, 0xFFFF)  # KiB above 1 MiB
        self._store16(EXTENDED_MEMORY_LO, extended)
        self._store16(EXTENDED_MEMORY_COPY_LO, extended)
        self._store16(MEMORY_ABOVE_16M_LO, min(max(below_4g - 16 * 1024 * 1024, 0) // 65536, 0xFFFF))
        for shift, index in enumerate(MEMORY_ABOVE_4G):
            self._ram[index] = (above_4g // 65536 >> 8 * shift) & 0xFF
        # More than 255 CPUs do not fit: QEMU stores 0 so that old BIOSes fail predictably.
        self._ram[CPU_COUNT] = cpus - 1 if cpus <= 0xFF else 0
        nibbles = [_BOOT_NIBBLES[device] for device in boot_order] + [0, 0, 0]
        self._ram[BOOT_DEVICES] = nibbles[1] << 4 | nibbles[0]
        self._ram[BOOT_DEVICE_3] = nibbles[2] << 4  # bit 0 clear: check the floppy boot signature
        self._ram[EQUIPMENT] = EQUIPMENT_FPU | EQUIPMENT_PS2_MOUSE  # no floppy drives
        self._ram[FLOPPY_TYPES] = 0
        self._ram[HARD_DISKS] = 0
        self._ram[DISK_TRANSLATION] = 0

    def _store16(self, low_index: int, value: int) -> None:
        self._ram[low_index] = value & 0xFF
        self._ram[low_index + 1] = value >> 8 & 0xFF

    def mark_s3_suspend(self) -> None:
        """What QEMU does on suspend to RAM: shutdown status 0xFE tells firmware to resume."""
        self._ram[SHUTDOWN_STATUS] = S3_RESUME

    def reset(self) -> None:
        """Machine reset (QEMU's rtc_reset): interrupts off, flags clear, the S3 mark kept."""
        if self._ram[SHUTDOWN_STATUS] != S3_RESUME:
            self._ram[SHUTDOWN_STATUS] = 0
        now = self._catch_up(None)
        old_period = self._period_cycles()
        self._ram[REG_B] &= ~(B_PIE | B_AIE | B_SQWE) & 0xFF
        self._flags &= ~(C_UF | C_IRQF | C_PF | C_AF) & 0xFF
        self._restart_periodic(now, old_period)
        self._update_line()

    # -- timing: what the platform's timer calls --------------------------------------

    def advance(self, now: float | None = None) -> None:
        """Latch every event up to ``now`` (host seconds; default the clock) and raise IRQ 8 if enabled."""
        self._catch_up(now)

    def alarm_interrupt_pending(self, now: float | None = None) -> bool:
        """AF set with AIE on: the alarm went off (QEMU's RTC wake-up source), read without clearing C."""
        self._catch_up(now)
        return bool(self._flags & C_AF and self._ram[REG_B] & B_AIE)

    def next_event(self, now: float | None = None) -> float | None:
        """Host time of the next event that raises IRQ 8, or None; events already due are latched first.

        The returned time is rounded up, so ``advance(next_event())`` always latches that event.
        """
        now_ns = self._catch_up(now)
        b = self._ram[REG_B]
        due = []
        if self._periodic_next is not None:
            due.append(_cycle_ns(self._periodic_next))
        if not self._dividers_reset:
            second = self._guest_second(now_ns)
            if b & B_UIE:
                due.append(self._host_ns_of(second + 1))
            alarm = self._next_alarm_second(second) if b & B_AIE and not b & B_SET else None
            if alarm is not None:
                due.append(self._host_ns_of(alarm))
        return _to_seconds_ceil(min(due)) if due else None

    def alarm_due(self, now: float | None = None) -> float | None:
        """Host time of the next alarm while AIE enables it (QEMU then wakes from S3), or None."""
        now_ns = self._catch_up(now)
        b = self._ram[REG_B]
        if not b & B_AIE or b & B_SET or self._dividers_reset:
            return None
        alarm = self._next_alarm_second(self._guest_second(now_ns))
        return None if alarm is None else _to_seconds_ceil(self._host_ns_of(alarm))

    # -- the guest's side --------------------------------------------------------------

    def read(self, offset: int, size: int) -> bytes:
        """Byte reads at consecutive ports (the PC splits wider ones); the index port reads 0xff."""
        _check_access(offset, size)
        return bytes(0xFF if port == 0 else self._read_data() for port in range(offset, offset + size))

    def write(self, offset: int, data: bytes) -> None:
        """Byte writes at consecutive ports: ``outw 0x70`` sets the index, then writes the data."""
        _check_access(offset, len(data))
        for port, value in enumerate(data, start=offset):
            if port == 0:
                self._index = value & 0x7F
                self._nmi_masked = bool(value & NMI_MASK)
            else:
                self._write_data(value)

    def _read_data(self) -> int:
        index = CENTURY if self._index == IBM_PS2_CENTURY else self._index
        # A read of C returns and clears what is latched now: latching it without driving the line
        # first keeps IRQ 8 from rising and falling inside the read, an edge the PIC would keep as
        # a request (an interrupt with no flag behind it).  The timer thread raises the line on time.
        now = self._latch(None) if index == REG_C else self._catch_up(None)
        if index in TIME_REGISTERS and self._running:
            self._store_time(now)
        if index == REG_A:
            uip = A_UIP if self._update_in_progress(now) else 0
            value = self._ram[REG_A] | uip
        elif index == REG_C:
            value = self._flags
            self._flags = 0  # reading C acknowledges every flag and lowers the line
        elif index == REG_D:
            value = D_VRT
        else:
            value = self._ram[index]
        self._update_line()
        return value

    def _write_data(self, value: int) -> None:
        now = self._catch_up(None)
        index = CENTURY if self._index == IBM_PS2_CENTURY else self._index
        if index in TIME_REGISTERS:
            if self._running:
                # The chip's registers are always current: write one, keep the others and the phase.
                self._store_time(now)
                self._ram[index] = value
                self._start_clock(now, self._phase_ns(now))
            else:
                self._ram[index] = value
        elif index == REG_A:
            self._write_a(now, value)
        elif index == REG_B:
            self._write_b(now, value)
        elif index not in (REG_C, REG_D):  # C and D are read-only
            self._ram[index] = value
        self._update_line()

    def _write_a(self, now: int, value: int) -> None:
        old_a, old_period = self._ram[REG_A], self._period_cycles()
        was_running = self._running
        will_run = not self._ram[REG_B] & B_SET and value & A_DIVIDER <= A_DIVIDER_NORMAL
        if was_running and not will_run:
            self._store_time(now)
        elif will_run and not was_running:
            # Out of divider reset, the first update comes half a second later.
            leaving_reset = old_a & A_DIVIDER_RESET == A_DIVIDER_RESET
            self._start_clock(now, NS // 2 if leaving_reset else self._phase_ns(now))
        self._ram[REG_A] = value & ~A_UIP & 0xFF  # UIP is read-only
        if (old_a ^ value) & A_RATE:
            self._restart_periodic(now, old_period)

    def _write_b(self, now: int, value: int) -> None:
        old_period = self._period_cycles()
        was_running = self._running
        if value & B_SET:
            value &= ~B_UIE  # as QEMU: no update interrupts while the time is being set
            if was_running:
                self._store_time(now)  # in the old format: B is not stored yet
        elif not was_running and self._ram[REG_A] & A_DIVIDER <= A_DIVIDER_NORMAL:
            self._start_clock(now, self._phase_ns(now))  # SET cleared: run from the registers
        # A flag already set when its interrupt becomes enabled interrupts at once.
        if value & self._flags & C_FLAGS:
            self._flags |= C_IRQF
        else:
            self._flags &= ~C_IRQF
        pie_changed = (self._ram[REG_B] ^ value) & B_PIE
        self._ram[REG_B] = value
        if pie_changed:
            self._restart_periodic(now, old_period)

    # -- the clock ------------------------------------------------------------------------

    @property
    def _running(self) -> bool:
        """The time registers follow the clock: SET clear and the divider at a running value."""
        return not self._ram[REG_B] & B_SET and self._ram[REG_A] & A_DIVIDER <= A_DIVIDER_NORMAL

    @property
    def _dividers_reset(self) -> bool:
        return self._ram[REG_A] & A_DIVIDER_RESET == A_DIVIDER_RESET

    def _guest_second(self, host_ns: int) -> int:
        return (host_ns + self._offset_ns) // NS

    def _host_ns_of(self, guest_second: int) -> int:
        return guest_second * NS - self._offset_ns

    def _phase_ns(self, host_ns: int) -> int:
        return (host_ns + self._offset_ns) % NS

    def _update_in_progress(self, now: int) -> bool:
        return self._running and self._phase_ns(now) >= NS - UIP_HOLD_NS

    def _store_time(self, now: int) -> None:
        """Write the guest's current time into the time registers, in B's format."""
        seconds = self._guest_second(now)
        days, second_of_day = divmod(seconds, SECONDS_PER_DAY)
        year, month, day = civil_from_days(days)
        hour, minute, second = second_of_day // 3600, second_of_day // 60 % 60, second_of_day % 60
        ram = self._ram
        ram[SECONDS] = self._encode(second)
        ram[MINUTES] = self._encode(minute)
        if ram[REG_B] & B_24H:
            ram[HOURS] = self._encode(hour)
        else:
            ram[HOURS] = self._encode(hour % 12 or 12) | (HOUR_PM if hour >= 12 else 0)
        ram[DAY_OF_WEEK] = self._encode((days + 4) % 7 + 1)  # 1970-01-01 was a Thursday
        ram[DAY_OF_MONTH] = self._encode(day)
        ram[MONTH] = self._encode(month)
        ram[YEAR] = self._encode(year % 100)
        ram[CENTURY] = self._encode(year // 100)

    def _start_clock(self, now: int, phase_ns: int) -> None:
        """Run the guest's clock from the time registers, ``phase_ns`` into their second."""
        ram = self._ram
        year = self._decode(ram[CENTURY]) * 100 + self._decode(ram[YEAR])
        days = days_from_civil(year, self._decode(ram[MONTH]), self._decode(ram[DAY_OF_MONTH]))
        hour = self._decode_hour(ram[HOURS])
        seconds = days * SECONDS_PER_DAY + hour * 3600 + self._decode(ram[MINUTES]) * 60 + self._decode(ram[SECONDS])
        self._offset_ns = seconds * NS + phase_ns - now

    def _encode(self, value: int) -> int:
        if self._ram[REG_B] & B_DM:
            return value & 0xFF
        return ((value // 10) << 4 | value % 10) & 0xFF

    def _decode(self, byte: int) -> int:
        """A register's value; -1 for "don't care" (both top bits set), as QEMU's rtc_from_bcd."""
        if byte & ALARM_DONT_CARE == ALARM_DONT_CARE:
            return -1
        if self._ram[REG_B] & B_DM:
            return byte
        return (byte >> 4) * 10 + (byte & 0x0F)

    def _decode_hour(self, byte: int) -> int:
        """0-23 from an hours register, honouring the PM bit in 12-hour mode."""
        if byte & ALARM_DONT_CARE == ALARM_DONT_CARE:
            return -1
        hour = self._decode(byte & ~HOUR_PM)
        if not self._ram[REG_B] & B_24H:
            hour = hour % 12 + (12 if byte & HOUR_PM else 0)
        return hour

    # -- events ---------------------------------------------------------------------------

    def _catch_up(self, now: float | None) -> int:
        """Latch the events up to ``now`` and drive the line: what a timely timer would have done."""
        now_ns = self._latch(now)
        self._update_line()
        return now_ns

    def _latch(self, now: float | None) -> int:
        """Latch the events up to ``now`` into register C; return ``now`` in host ns."""
        now_ns = _to_ns(self.clock() if now is None else now)
        start = self._latched_ns
        period = self._period_cycles()
        if now_ns < start:
            # The host clock went back: start counting again from here.
            self._latched_ns = now_ns
            if self._periodic_next is not None and self._periodic_next > _cycle_at(now_ns) + period:
                self._periodic_next = _cycle_at(now_ns) + period
            return now_ns
        raised = 0
        if self._periodic_next is not None and period and self._periodic_next <= _cycle_at(now_ns):
            missed = (_cycle_at(now_ns) - self._periodic_next) // period + 1
            self._periodic_next += missed * period
            raised |= C_PF
        first, last = self._guest_second(start), self._guest_second(now_ns)
        if last > first and not self._dividers_reset:
            raised |= C_UF
            alarm = None if self._ram[REG_B] & B_SET else self._next_alarm_second(first)
            if alarm is not None and alarm <= last:
                raised |= C_AF
        self._flags |= raised
        if raised & self._ram[REG_B] & C_FLAGS:
            self._flags |= C_IRQF
        self._latched_ns = now_ns
        return now_ns

    def _period_cycles(self) -> int:
        """The periodic interrupt's period in 32 kHz cycles; 0 when PIE is off (QEMU runs it only then)."""
        if not self._ram[REG_B] & B_PIE:
            return 0
        rate = self._ram[REG_A] & A_RATE
        if rate == 0:
            return 0
        # Rates 1 and 2 repeat rates 8 and 9 (256 and 128 Hz): datasheet Table 5.
        return 1 << (rate + 6 if rate <= 2 else rate - 1)

    def _restart_periodic(self, now: int, old_period: int) -> None:
        """Reschedule after PIE or the rate changed; a new rate counts from the last tick (QEMU)."""
        period = self._period_cycles()
        current = _cycle_at(now)
        if not period:
            self._periodic_next = None
        elif old_period and self._periodic_next is not None:
            last_tick = self._periodic_next - old_period
            self._periodic_next = current + period - min(max(current - last_tick, 0), period)
        else:
            self._periodic_next = current + period

    def _alarm_matches(self) -> tuple[list[int], list[int], list[int]] | None:
        """The hours, minutes and seconds the alarm registers accept; None if it can never ring."""
        hour = self._decode_hour(self._ram[HOURS_ALARM])
        minute = self._decode(self._ram[MINUTES_ALARM])
        second = self._decode(self._ram[SECONDS_ALARM])
        fields = []
        for value, limit in ((hour, 24), (minute, 60), (second, 60)):
            if value == -1:
                fields.append(list(range(limit)))
            elif 0 <= value < limit:
                fields.append([value])
            else:
                return None
        return fields[0], fields[1], fields[2]

    def _next_alarm_second(self, guest_second: int) -> int | None:
        """The first guest second after ``guest_second`` whose time of day the alarm matches."""
        matches = self._alarm_matches()
        if matches is None:
            return None
        hours, minutes, seconds = matches
        day, second_of_day = divmod(guest_second, SECONDS_PER_DAY)
        now = (second_of_day // 3600, second_of_day // 60 % 60, second_of_day % 60)
        for hour in hours:
            if hour < now[0]:
                continue
            for minute in minutes:
                if (hour, minute) < now[:2]:
                    continue
                for second in seconds:
                    if (hour, minute, second) > now:
                        return day * SECONDS_PER_DAY + hour * 3600 + minute * 60 + second
        return (day + 1) * SECONDS_PER_DAY + hours[0] * 3600 + minutes[0] * 60 + seconds[0]

    def _update_line(self) -> None:
        level = bool(self._flags & C_IRQF)
        if level != self._irq_level:
            self._irq_level = level
            if self.interrupt is not None:
                self.interrupt(level)


# -- time arithmetic -------------------------------------------------------------------


def _to_ns(seconds: float) -> int:
    """Host seconds to integer ns, to the nearest ns (``seconds * NS`` alone is off by up to 128 ns)."""
    whole = math.floor(seconds)
    return whole * NS + round((seconds - whole) * NS)


def _to_seconds_ceil(ns: int) -> float:
    """The smallest float ``t`` with ``_to_ns(t) >= ns``, so that advancing to it latches the event."""
    seconds = ns / NS
    while _to_ns(seconds) < ns:
        seconds = math.nextafter(seconds, math.inf)
    return seconds


def _cycle_at(host_ns: int) -> int:
    """The last 32 kHz cycle that has begun by ``host_ns``."""
    return host_ns * RTC_HZ // NS


def _cycle_ns(cycle: int) -> int:
    """The first host nanosecond at or after the start of ``cycle``."""
    return -(-cycle * NS // RTC_HZ)


def _check_index(index: int) -> int:
    if not 0 <= index < CMOS_SIZE:
        raise DeviceError(f"CMOS has bytes 0..{CMOS_SIZE - 1}, not {index}")
    return index


def _check_access(offset: int, size: int) -> None:
    if size < 1 or offset < 0 or offset + size > 2:
        raise DeviceError(f"cmos: a {size}-byte access at offset {offset} is outside ports 0x70-0x71")
