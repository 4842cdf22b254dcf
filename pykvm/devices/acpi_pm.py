"""ACPI fixed hardware: the PM1a event and control blocks and the PM timer, plus the SMI command port.

The registers are ACPI 6.4 section 4.8 ("ACPI Hardware Specification",
4.8.3 "Fixed Hardware Registers"), laid out as QEMU's PIIX4 power
management function places them (``hw/acpi/piix4.c`` on ``hw/acpi/core.c``)
and SeaBIOS maps them, at I/O base 0x600::

    offset 0   PM1_STS  16-bit, write 1 to clear: TMR_STS 0, BM_STS 4, GBL_STS 5, PWRBTN_STS 8,
                        SLPBTN_STS 9, RTC_STS 10, PCIEXP_WAKE_STS 14, WAK_STS 15
    offset 2   PM1_EN   16-bit: the same bits enable the SCI
    offset 4   PM1_CNT  16-bit: SCI_EN 0, BM_RLD 1, GBL_RLS 2, SLP_TYP 10-12, SLP_EN 13 (write-only)
    offset 6   nothing (reads all-ones)
    offset 8   PM_TMR   32-bit read-only: a 24-bit counter at 3.579545 MHz (TMR_VAL_EXT = 0)

The FADT (the lead's builder) describes this block with PM1_EVT_LEN 4,
PM1_CNT_LEN 2, PM_TMR_LEN 4, SCI_INT 9 and the SMI command values below.

TMR_STS is set each time bit 23 of the counter toggles (every 2**23 ticks,
about 2.34 s); like the counter it is computed from the clock when read,
and :meth:`AcpiPm.next_event` says when it will next be set while TMR_EN
wants an SCI.  The SCI's level is QEMU's: some status bit set whose enable
(TMR, GBL, PWRBTN, RTC) is set, whatever SCI_EN says.

Writing SLP_EN calls ``on_sleep(slp_typ)``; what a sleep type means is the
DSDT's business.  QEMU's DSDT says ``_S3 = 1``, ``_S4 = 2``, ``_S5 = 0``
(:data:`SLP_TYP_S3` ...), and the platform maps them: S5 powers off, S3
suspends and, on resume, calls :meth:`AcpiPm.wake`.

Accesses of any width are taken byte lane by byte lane (QEMU accepts only
the widths above; a guest using them sees the same).

:class:`SmiCommand` is the APM control and status pair at 0xb2/0xb3
(QEMU's ``hw/isa/apm.c``): OSPM writes ACPI_ENABLE there to move the
machine into ACPI mode, which on QEMU simply sets SCI_EN (ACPI 6.4
section 4.8.2.1.1, "Legacy/ACPI Select and the SCI Interrupt").
"""

from __future__ import annotations

import time
from collections.abc import Callable

from pykvm.errors import DeviceError

# PM1_STS and PM1_EN bits (ACPI 6.4 tables 4.16 and 4.17).
TMR_STS = TMR_EN = 1 << 0
BM_STS = 1 << 4
GBL_STS = GBL_EN = 1 << 5
PWRBTN_STS = PWRBTN_EN = 1 << 8
SLPBTN_STS = SLPBTN_EN = 1 << 9
RTC_STS = RTC_EN = 1 << 10
PCIEXP_WAKE_STS = PCIEXP_WAKE_DIS = 1 << 14
WAK_STS = 1 << 15
#: Status bits whose enable raises the SCI (QEMU's ACPI_BITMASK_PM1_COMMON_ENABLED).
SCI_SOURCES = TMR_EN | GBL_EN | PWRBTN_EN | RTC_EN

# PM1_CNT bits (ACPI 6.4 table 4.18).
SCI_EN = 1 << 0
BM_RLD = 1 << 1
GBL_RLS = 1 << 2
SLP_TYP_SHIFT = 10
SLP_TYP_MASK = 0x7 << SLP_TYP_SHIFT
SLP_EN = 1 << 13

# The sleep types QEMU's DSDT gives its \_Sx packages.
SLP_TYP_S3 = 1
SLP_TYP_S4 = 2
SLP_TYP_S5 = 0

# What the guest writes to the SMI command port (the FADT's ACPI_ENABLE / ACPI_DISABLE).
ACPI_ENABLE = 0xF1
ACPI_DISABLE = 0xF0

PM_TIMER_HZ = 3_579_545
TIMER_BITS = 24
TIMER_STATUS_BIT = 1 << 23  # TMR_STS is set when this bit of the counter toggles
NS = 1_000_000_000

# Register offsets in the 12-port block.
PM1_STS = 0
PM1_EN = 2
PM1_CNT = 4
PM_TMR = 8
BLOCK_LENGTH = 12

# Why the machine woke (QEMU's wakeup reasons), and the status bits each sets beside WAK_STS.
WAKE_RTC = "rtc"
WAKE_TIMER = "timer"
WAKE_OTHER = "other"  # QEMU pretends the power button did it
_WAKE_STATUS = {WAKE_RTC: RTC_STS, WAKE_TIMER: TMR_STS, WAKE_OTHER: PWRBTN_STS}


class AcpiPm:
    """PM1a_EVT_BLK, PM1a_CNT_BLK and PM_TMR_BLK in one 12-port range (at 0x600 on pykvm's PC).

    ``clock_ns()`` is the time base of the PM timer (monotonic ns);
    ``interrupt(level)`` drives the SCI (IRQ 9) and is called when the level
    changes; ``on_sleep(slp_typ)`` is called when the guest writes SLP_EN.
    """

    name = "acpi-pm"
    length = BLOCK_LENGTH

    def __init__(
        self,
        clock_ns: Callable[[], int] = time.monotonic_ns,
        interrupt: Callable[[bool], None] | None = None,
        on_sleep: Callable[[int], None] | None = None,
    ) -> None:
        self.clock_ns = clock_ns
        self.interrupt = interrupt
        self.on_sleep = on_sleep
        self._sci_level = False
        self.reset()

    def save_state(self) -> dict:
        """PM1 status, enable, control, the next TMR_STS toggle, the SCI level (version 1).

        The timer counts host monotonic time, so a restore on the same host
        finds it advanced by the time the machine was away (a real timer would
        have counted on too); no guest shipped with pykvm reads it across one.
        """
        return {"version": 1, "status": self._status, "enable": self._enable, "control": self._control,
                "next_toggle": self._next_toggle, "sci": self._sci_level}

    def load_state(self, state: dict) -> None:
        from pykvm.devices import check_state

        s = check_state(self, state)
        self._status, self._enable, self._control = s["status"], s["enable"], s["control"]
        self._next_toggle, self._sci_level = s["next_toggle"], s["sci"]

    def reset(self) -> None:
        """Power-on state: no status, nothing enabled, SCI_EN clear (legacy mode)."""
        self._status = 0  # PM1_STS, except TMR_STS while it is still due
        self._enable = 0
        self._control = 0
        self._next_toggle = self._toggle_after(self._ticks())
        self._update_sci()

    # -- the timer ------------------------------------------------------------------

    def _ticks(self, now_ns: int | None = None) -> int:
        """Timer ticks since the clock's zero (the 24-bit register is the low bits)."""
        return (self.clock_ns() if now_ns is None else now_ns) * PM_TIMER_HZ // NS

    @staticmethod
    def _toggle_after(ticks: int) -> int:
        """The tick count at which bit 23 next toggles (QEMU's overflow_time)."""
        return (ticks + TIMER_STATUS_BIT) & ~(TIMER_STATUS_BIT - 1)

    def _current_status(self, now_ns: int | None = None) -> int:
        """PM1_STS with TMR_STS brought up to date."""
        if self._ticks(now_ns) >= self._next_toggle:
            self._status |= TMR_STS
        return self._status

    def next_event(self, now: int | None = None) -> int | None:
        """Host ns at which TMR_STS will raise the SCI, or None (TMR_EN off or the status already set)."""
        self.advance(now)
        if not self._enable & TMR_EN or self._status & TMR_STS:
            return None
        return -(-self._next_toggle * NS // PM_TIMER_HZ)  # the first ns whose tick count reaches it

    def advance(self, now: int | None = None) -> None:
        """Latch TMR_STS if its time has come by ``now`` (host ns; default the clock) and drive the SCI."""
        self._current_status(now)
        self._update_sci()

    # -- events from the platform -------------------------------------------------------

    def power_button(self) -> bool:
        """Press the power button; True if PWRBTN_EN let it through (QEMU drops it otherwise)."""
        if not self._enable & PWRBTN_EN:
            return False
        self._status |= PWRBTN_STS
        self._update_sci()
        return True

    def wake(self, reason: str = WAKE_OTHER) -> None:
        """The machine resumed from S3: WAK_STS and the cause's status bit, as QEMU sets them."""
        if reason not in _WAKE_STATUS:
            raise DeviceError(f"wake reason must be one of {sorted(_WAKE_STATUS)}, not {reason!r}")
        self._status |= WAK_STS | _WAKE_STATUS[reason]
        self._update_sci()

    def set_sci_enabled(self, enabled: bool) -> None:
        """Set or clear SCI_EN: what the SMI handler does for ACPI_ENABLE / ACPI_DISABLE."""
        self._control = self._control | SCI_EN if enabled else self._control & ~SCI_EN

    @property
    def sci_enabled(self) -> bool:
        return bool(self._control & SCI_EN)

    @property
    def rtc_wake_enabled(self) -> bool:
        """RTC_EN: the RTC alarm may wake the machine from S3 (QEMU's wakeup source)."""
        return bool(self._enable & RTC_EN)

    # -- the guest's side -----------------------------------------------------------------

    def read(self, offset: int, size: int) -> bytes:
        """Any width, by byte lanes of the 12-byte block."""
        _check_access(offset, size)
        status = self._current_status()
        self._update_sci()
        timer = self._ticks() & ((1 << TIMER_BITS) - 1)
        block = (status.to_bytes(2, "little") + self._enable.to_bytes(2, "little")
                 + self._control.to_bytes(2, "little") + b"\xff\xff" + timer.to_bytes(4, "little"))
        return block[offset:offset + size]

    def write(self, offset: int, data: bytes) -> None:
        """Write 1 to clear PM1_STS, set PM1_EN, set PM1_CNT; PM_TMR is read-only."""
        _check_access(offset, len(data))
        lanes = dict(enumerate(data, start=offset))
        if PM1_STS in lanes or PM1_STS + 1 in lanes:
            self._clear_status(lanes.get(PM1_STS, 0) | lanes.get(PM1_STS + 1, 0) << 8)
        if PM1_EN in lanes or PM1_EN + 1 in lanes:
            self._enable = _merge(self._enable, lanes, PM1_EN)
        self._update_sci()
        if PM1_CNT in lanes or PM1_CNT + 1 in lanes:
            self._write_control(_merge(self._control, lanes, PM1_CNT))

    def _clear_status(self, ones: int) -> None:
        if self._current_status() & ones & TMR_STS:
            self._next_toggle = self._toggle_after(self._ticks())  # TMR_STS counts again from now
        self._status &= ~ones

    def _write_control(self, value: int) -> None:
        self._control = value & ~SLP_EN  # SLP_EN is write-only: it reads 0
        if value & SLP_EN and self.on_sleep is not None:
            self.on_sleep((value & SLP_TYP_MASK) >> SLP_TYP_SHIFT)

    def _update_sci(self) -> None:
        level = bool(self._status & self._enable & SCI_SOURCES)
        if level != self._sci_level:
            self._sci_level = level
            if self.interrupt is not None:
                self.interrupt(level)


class SmiCommand:
    """The APM control (0xb2) and status (0xb3) ports; ``set_sci_enabled`` is usually ``AcpiPm.set_sci_enabled``.

    There is no SMM here: the only commands with an effect are QEMU's
    ACPI_ENABLE and ACPI_DISABLE.  Both ports read back what was last written.
    """

    name = "apm-smi"
    length = 2

    def __init__(self, set_sci_enabled: Callable[[bool], None] | None = None) -> None:
        self.set_sci_enabled = set_sci_enabled
        self.control = 0  # APMC
        self.status = 0  # APMS

    def save_state(self) -> dict:
        """APMC and APMS (version 1)."""
        return {"version": 1, "control": self.control, "status": self.status}

    def load_state(self, state: dict) -> None:
        from pykvm.devices import check_state

        s = check_state(self, state)
        self.control, self.status = s["control"], s["status"]

    def read(self, offset: int, size: int) -> bytes:
        _check_access(offset, size, self.length, self.name)
        return bytes([self.control, self.status][offset:offset + size])

    def write(self, offset: int, data: bytes) -> None:
        _check_access(offset, len(data), self.length, self.name)
        for port, value in enumerate(data, start=offset):
            if port == 1:
                self.status = value
                continue
            self.control = value
            if value in (ACPI_ENABLE, ACPI_DISABLE) and self.set_sci_enabled is not None:
                self.set_sci_enabled(value == ACPI_ENABLE)


def _merge(old: int, lanes: dict[int, int], offset: int) -> int:
    """A 16-bit register at ``offset`` after a write that covered some of its bytes."""
    low = lanes.get(offset, old & 0xFF)
    high = lanes.get(offset + 1, old >> 8)
    return high << 8 | low


def _check_access(offset: int, size: int, length: int = BLOCK_LENGTH, device: str = AcpiPm.name) -> None:
    if size < 1 or offset < 0 or offset + size > length:
        raise DeviceError(f"{device}: a {size}-byte access at offset {offset} is outside its {length} ports")
