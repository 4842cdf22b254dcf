"""CMOS/RTC: time of day in every format, setting the clock, UIP, the three interrupts, PC bytes."""

from __future__ import annotations

import datetime

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pykvm.devices import cmos as rtc
from pykvm.devices.cmos import Cmos
from pykvm.errors import DeviceError

MiB = 1 << 20
GiB = 1 << 30
T0 = 1_700_000_000.25  # 2023-11-14 22:13:20.25 UTC, a Tuesday


class FakeClock:
    def __init__(self, t: float = T0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


class Line:
    """Records every level the device drives IRQ 8 to."""

    def __init__(self) -> None:
        self.levels: list[bool] = []

    def __call__(self, level: bool) -> None:
        self.levels.append(level)

    @property
    def high(self) -> bool:
        return bool(self.levels) and self.levels[-1]


@pytest.fixture
def clock():
    return FakeClock()


@pytest.fixture
def line():
    return Line()


@pytest.fixture
def chip(clock, line):
    return Cmos(clock=clock, interrupt=line)


def get(chip: Cmos, index: int) -> int:
    chip.write(0, bytes([index]))  # outb 0x70
    return chip.read(1, 1)[0]  # inb 0x71


def put(chip: Cmos, index: int, value: int) -> None:
    chip.write(0, bytes([index]))
    chip.write(1, bytes([value]))


def time_registers(chip: Cmos) -> tuple[int, ...]:
    return tuple(get(chip, index) for index in (rtc.CENTURY, rtc.YEAR, rtc.MONTH, rtc.DAY_OF_MONTH,
                                                rtc.DAY_OF_WEEK, rtc.HOURS, rtc.MINUTES, rtc.SECONDS))


def test_t0_is_what_the_tests_think_it_is():
    assert datetime.datetime.fromtimestamp(T0, datetime.timezone.utc).timetuple()[:6] == (2023, 11, 14, 22, 13, 20)


# -- reading the time -------------------------------------------------------------------


def test_power_on_registers(chip):
    assert get(chip, rtc.REG_A) == 0x26
    assert get(chip, rtc.REG_B) == 0x02  # 24-hour BCD
    assert get(chip, rtc.REG_C) == 0x00
    assert get(chip, rtc.REG_D) == 0x80


def test_time_in_bcd(chip):
    # century, year, month, day, weekday (Sunday = 1: Tuesday = 3), hours, minutes, seconds
    assert time_registers(chip) == (0x20, 0x23, 0x11, 0x14, 0x03, 0x22, 0x13, 0x20)
    assert get(chip, rtc.IBM_PS2_CENTURY) == 0x20


def test_time_in_binary(chip):
    put(chip, rtc.REG_B, rtc.B_DM | rtc.B_24H)
    assert time_registers(chip) == (20, 23, 11, 14, 3, 22, 13, 20)


@pytest.mark.parametrize("mode, hour, expected", [
    (0, 22, 0x90),  # BCD 10 PM
    (rtc.B_DM, 22, 0x8A),  # binary 10 PM
    (0, 0, 0x12),  # 12 AM is midnight
    (0, 12, 0x92),  # 12 PM is noon
    (0, 9, 0x09),
])
def test_twelve_hour_mode_and_the_pm_bit(clock, mode, hour, expected):
    clock.t = T0 + (hour - 22) * 3600
    chip = Cmos(clock=clock)
    put(chip, rtc.REG_B, mode)  # 24/12 bit clear: 12-hour mode
    assert get(chip, rtc.HOURS) == expected


def test_the_time_follows_the_clock(chip, clock):
    clock.t += 100  # 22:15:00.25
    assert (get(chip, rtc.HOURS), get(chip, rtc.MINUTES), get(chip, rtc.SECONDS)) == (0x22, 0x15, 0x00)


@settings(max_examples=200)
@given(st.integers(0, 4_102_444_799))  # 1970 .. 2099
def test_any_time_reads_as_python_computes_it(seconds):
    chip = Cmos(clock=FakeClock(seconds + 0.5))
    put(chip, rtc.REG_B, rtc.B_DM | rtc.B_24H)
    when = datetime.datetime.fromtimestamp(seconds, datetime.timezone.utc)
    assert time_registers(chip) == (when.year // 100, when.year % 100, when.month, when.day,
                                    when.isoweekday() % 7 + 1, when.hour, when.minute, when.second)


# -- setting the time -------------------------------------------------------------------


def set_time(chip: Cmos, values: dict[int, int]) -> None:
    b = get(chip, rtc.REG_B)
    put(chip, rtc.REG_B, b | rtc.B_SET)
    for index, value in values.items():
        put(chip, index, value)
    put(chip, rtc.REG_B, b)


NEW_YEARS_EVE = {rtc.CENTURY: 0x19, rtc.YEAR: 0x99, rtc.MONTH: 0x12, rtc.DAY_OF_MONTH: 0x31,
                 rtc.HOURS: 0x23, rtc.MINUTES: 0x59, rtc.SECONDS: 0x58}


def test_set_time_then_read_it_back_later(chip, clock):
    set_time(chip, NEW_YEARS_EVE)
    clock.t += 1.5  # the phase (.25) is kept: 23:59:59.75
    assert get(chip, rtc.SECONDS) == 0x59
    clock.t += 0.5  # 2000-01-01 00:00:00.25, a Saturday
    assert time_registers(chip) == (0x20, 0x00, 0x01, 0x01, 0x07, 0x00, 0x00, 0x00)


def test_registers_hold_still_while_set_is_on(chip, clock):
    put(chip, rtc.REG_B, rtc.B_24H | rtc.B_SET)
    put(chip, rtc.SECONDS, 0x42)
    clock.t += 10
    assert (get(chip, rtc.MINUTES), get(chip, rtc.SECONDS)) == (0x13, 0x42)
    assert get(chip, rtc.REG_A) & rtc.A_UIP == 0


def test_the_guest_offset_survives_the_host_clock(chip, clock):
    set_time(chip, NEW_YEARS_EVE)
    clock.t += 3600 * 24 * 365  # a year later on the host
    assert (get(chip, rtc.CENTURY), get(chip, rtc.YEAR), get(chip, rtc.MONTH)) == (0x20, 0x00, 0x12)


def test_writing_one_register_while_running_keeps_the_others(chip, clock):
    put(chip, rtc.MINUTES, 0x00)  # 22:00:20.25
    clock.t += 60
    assert (get(chip, rtc.HOURS), get(chip, rtc.MINUTES), get(chip, rtc.SECONDS)) == (0x22, 0x01, 0x20)


def test_leaving_divider_reset_starts_half_a_second_later(chip, clock):
    put(chip, rtc.REG_A, 0x66)  # dividers held in reset: the clock stops
    clock.t += 30
    assert get(chip, rtc.SECONDS) == 0x20
    put(chip, rtc.REG_A, 0x26)
    clock.t += 0.49
    assert get(chip, rtc.SECONDS) == 0x20
    clock.t += 0.02
    assert get(chip, rtc.SECONDS) == 0x21


def test_uip_is_set_in_the_last_244_microseconds_of_a_second(chip, clock):
    clock.t = 1_700_000_000.9999  # 100 us before the update
    assert get(chip, rtc.REG_A) == 0x26 | rtc.A_UIP
    clock.t = 1_700_000_000.9997  # 300 us before
    assert get(chip, rtc.REG_A) == 0x26
    put(chip, rtc.REG_A, 0xA6)  # UIP is read-only
    assert chip.cmos_byte(rtc.REG_A) == 0x26


def test_registers_c_and_d_cannot_be_written(chip):
    put(chip, rtc.REG_D, 0x00)
    put(chip, rtc.REG_C, 0xF0)
    assert (get(chip, rtc.REG_C), get(chip, rtc.REG_D)) == (0x00, 0x80)


# -- interrupts ---------------------------------------------------------------------------


@pytest.mark.parametrize("rate, cycles", [(1, 128), (2, 256), (3, 4), (6, 32), (15, 16384)])
def test_periodic_rate_from_register_a(chip, clock, rate, cycles):
    put(chip, rtc.REG_A, 0x20 | rate)
    put(chip, rtc.REG_B, rtc.B_24H | rtc.B_PIE)
    assert chip.next_event() == pytest.approx(T0 + cycles / 32768, abs=1e-6)


def test_periodic_interrupt_raises_and_reading_c_lowers(chip, clock, line):
    put(chip, rtc.REG_B, rtc.B_24H | rtc.B_PIE)  # 1024 Hz
    due = chip.next_event()
    chip.advance(due - 1e-5)
    assert line.levels == [] and chip.cmos_byte(rtc.REG_C) == 0
    chip.advance(due)
    assert line.levels == [True]
    clock.t = due
    assert get(chip, rtc.REG_C) == rtc.C_IRQF | rtc.C_PF
    assert line.levels == [True, False]
    assert get(chip, rtc.REG_C) == 0


def test_periodic_events_are_latched_lazily_when_c_is_read(chip, clock, line):
    put(chip, rtc.REG_B, rtc.B_24H | rtc.B_PIE)
    clock.t += 0.5  # no timer ran meanwhile
    assert get(chip, rtc.REG_C) == rtc.C_IRQF | rtc.C_PF
    # The read takes the flag it latches: IRQ 8 must not rise and fall inside it (the PIC would keep
    # that edge as a request, and the guest would get an interrupt with C already clear).
    assert line.levels == []
    next_due = chip.next_event()
    assert clock.t < next_due <= clock.t + 1 / 1024 + 1e-6  # the schedule kept up


def test_no_periodic_flag_without_pie_as_in_qemu(chip, clock):
    clock.t += 1.5
    assert get(chip, rtc.REG_C) == rtc.C_UF  # only the update-ended flag


def test_update_ended_interrupt(chip, clock, line):
    put(chip, rtc.REG_B, rtc.B_24H | rtc.B_UIE)
    due = chip.next_event()
    assert due == pytest.approx(T0 + 0.75, abs=1e-6)
    chip.advance(due)
    assert line.high
    assert chip.cmos_byte(rtc.REG_C) == 0  # C's flags are not stored in the RAM array
    clock.t = due
    assert get(chip, rtc.REG_C) == rtc.C_IRQF | rtc.C_UF


def test_set_clears_uie(chip):
    put(chip, rtc.REG_B, rtc.B_24H | rtc.B_UIE | rtc.B_SET)
    assert get(chip, rtc.REG_B) == rtc.B_24H | rtc.B_SET


def test_alarm_interrupt_at_the_alarm_time(chip, clock, line):
    put(chip, rtc.HOURS_ALARM, 0x22)
    put(chip, rtc.MINUTES_ALARM, 0x13)
    put(chip, rtc.SECONDS_ALARM, 0x25)
    put(chip, rtc.REG_B, rtc.B_24H | rtc.B_AIE)
    assert chip.alarm_due() == pytest.approx(T0 + 4.75, abs=1e-6)
    assert chip.next_event() == chip.alarm_due()
    chip.advance(T0 + 4.7)
    assert not line.high
    chip.advance(T0 + 4.75)
    assert line.high
    clock.t = T0 + 4.75
    assert get(chip, rtc.REG_C) == rtc.C_IRQF | rtc.C_AF | rtc.C_UF


def test_alarm_with_dont_care_fields(chip, clock):
    put(chip, rtc.HOURS_ALARM, 0xC0)
    put(chip, rtc.MINUTES_ALARM, 0xFF)
    put(chip, rtc.SECONDS_ALARM, 0x00)  # every minute at :00
    put(chip, rtc.REG_B, rtc.B_24H | rtc.B_AIE)
    assert chip.alarm_due() == pytest.approx(T0 + 39.75, abs=1e-6)  # 22:14:00
    put(chip, rtc.SECONDS_ALARM, 0xC0)  # every second
    assert chip.alarm_due() == pytest.approx(T0 + 0.75, abs=1e-6)


def test_alarm_in_twelve_hour_mode_uses_its_own_pm_bit(chip):
    put(chip, rtc.REG_B, rtc.B_AIE)  # 12-hour BCD
    put(chip, rtc.HOURS_ALARM, 0x90)  # 10 PM
    put(chip, rtc.MINUTES_ALARM, 0x14)
    put(chip, rtc.SECONDS_ALARM, 0x00)
    assert chip.alarm_due() == pytest.approx(T0 + 39.75, abs=1e-6)
    put(chip, rtc.HOURS_ALARM, 0x10)  # 10 AM: tomorrow
    assert chip.alarm_due() == pytest.approx(T0 + 39.75 + 12 * 3600, abs=1e-6)


def test_alarm_tomorrow_and_impossible_alarms(chip):
    put(chip, rtc.HOURS_ALARM, 0x22)
    put(chip, rtc.MINUTES_ALARM, 0x13)
    put(chip, rtc.SECONDS_ALARM, 0x20)  # now: next time is tomorrow
    put(chip, rtc.REG_B, rtc.B_24H | rtc.B_AIE)
    assert chip.alarm_due() == pytest.approx(T0 - 0.25 + 86400, abs=1e-6)
    put(chip, rtc.SECONDS_ALARM, 0x75)  # no such second
    assert chip.alarm_due() is None
    assert chip.next_event() is None


def test_alarm_due_needs_aie(chip, clock):
    put(chip, rtc.SECONDS_ALARM, 0xC0)
    put(chip, rtc.MINUTES_ALARM, 0xC0)
    put(chip, rtc.HOURS_ALARM, 0xC0)
    assert chip.alarm_due() is None
    clock.t += 2
    assert get(chip, rtc.REG_C) == rtc.C_AF | rtc.C_UF  # latched all the same, without IRQF


def test_enabling_an_interrupt_whose_flag_is_set_raises_at_once(chip, clock, line):
    clock.t += 1  # UF is now latched, no interrupt enabled
    put(chip, rtc.REG_B, rtc.B_24H | rtc.B_UIE)
    assert line.levels == [True]
    put(chip, rtc.REG_B, rtc.B_24H)  # disabling it lowers the line; the flag stays
    assert line.levels == [True, False]
    assert get(chip, rtc.REG_C) == rtc.C_UF


def test_no_updates_while_the_dividers_are_reset(chip, clock):
    put(chip, rtc.REG_A, 0x66)
    put(chip, rtc.REG_B, rtc.B_24H | rtc.B_UIE)
    assert chip.next_event() is None
    clock.t += 5
    assert get(chip, rtc.REG_C) == 0


def test_next_event_is_the_earliest_source(chip):
    put(chip, rtc.REG_A, 0x2F)  # 2 Hz periodic
    put(chip, rtc.REG_B, rtc.B_24H | rtc.B_PIE | rtc.B_UIE)
    assert chip.next_event() == pytest.approx(T0 + 0.5, abs=1e-6)
    chip.advance(T0 + 0.5)
    assert chip.next_event(T0 + 0.5) == pytest.approx(T0 + 0.75, abs=1e-6)  # the update


def test_a_new_rate_counts_from_the_last_tick(chip, clock):
    put(chip, rtc.REG_A, 0x2F)  # 2 Hz
    put(chip, rtc.REG_B, rtc.B_24H | rtc.B_PIE)
    clock.t = T0 + 0.2
    put(chip, rtc.REG_A, 0x2E)  # 4 Hz: next tick 0.25 s after the last one (at T0)
    assert chip.next_event() == pytest.approx(T0 + 0.25, abs=1e-6)


def test_a_clock_going_back_does_not_stall_the_periodic_interrupt(chip, clock):
    put(chip, rtc.REG_B, rtc.B_24H | rtc.B_PIE)
    clock.t = T0 - 3600
    due = chip.next_event()
    assert clock.t < due <= clock.t + 1 / 1024 + 1e-6


def test_the_line_is_driven_only_on_changes(chip, line):
    put(chip, rtc.REG_B, rtc.B_24H | rtc.B_UIE)
    chip.advance(T0 + 1)
    chip.advance(T0 + 2)
    assert line.levels == [True]


# -- ports, NMI, host access --------------------------------------------------------------


def test_nmi_mask_bit_is_kept_apart_from_the_index(chip):
    chip.write(0, b"\x8d")
    assert chip.nmi_masked and chip.index == 0x0D
    assert chip.read(1, 1) == b"\x80"
    chip.write(0, b"\x0d")
    assert not chip.nmi_masked


def test_index_port_reads_all_ones_and_word_accesses_split(chip):
    chip.write(0, b"\x40\x55")  # outw 0x70: index 0x40, then data 0x55
    assert chip.cmos_byte(0x40) == 0x55
    assert chip.read(0, 2) == b"\xff\x55"


@pytest.mark.parametrize("wrong_call", [
    lambda chip: chip.read(1, 2),  # past port 0x71
    lambda chip: chip.write(0, b""),
    lambda chip: chip.cmos_byte(128),
    lambda chip: chip.set_pc_config(64 * MiB, 0),
    lambda chip: chip.set_pc_config(64 * MiB, 1, boot_order="x"),
])
def test_host_errors(chip, wrong_call):
    with pytest.raises(DeviceError):
        wrong_call(chip)


def test_reset_turns_interrupts_off_and_keeps_the_s3_mark(chip, clock, line):
    put(chip, rtc.REG_B, rtc.B_24H | rtc.B_PIE | rtc.B_AIE | rtc.B_UIE)
    clock.t += 1
    chip.advance()
    assert line.high
    chip.mark_s3_suspend()
    chip.reset()
    assert not line.high
    assert get(chip, rtc.REG_B) == rtc.B_24H | rtc.B_UIE
    assert get(chip, rtc.REG_C) == 0
    assert chip.cmos_byte(rtc.SHUTDOWN_STATUS) == 0xFE
    chip.set_cmos_byte(rtc.SHUTDOWN_STATUS, 0x05)
    chip.reset()
    assert chip.cmos_byte(rtc.SHUTDOWN_STATUS) == 0


# -- pc_cmos_init's bytes ---------------------------------------------------------------


def config_bytes(memory_size: int, cpus: int = 1) -> dict[int, int]:
    chip = Cmos(clock=FakeClock())
    chip.set_pc_config(memory_size, cpus)
    indexes = (0x10, 0x14, 0x15, 0x16, 0x17, 0x18, 0x30, 0x31, 0x34, 0x35, 0x38, 0x3D, 0x5B, 0x5C, 0x5D, 0x5F)
    return {index: chip.cmos_byte(index) for index in indexes}


def test_pc_config_64_mib():
    # base 640 KiB = 0x280; 63 MiB above 1 MiB = 64512 KiB = 0xfc00; 48 MiB above 16 MiB = 768 x 64 KiB = 0x300
    assert config_bytes(64 * MiB, 2) == {
        0x10: 0x00, 0x14: 0x06, 0x15: 0x80, 0x16: 0x02, 0x17: 0x00, 0x18: 0xFC, 0x30: 0x00, 0x31: 0xFC,
        0x34: 0x00, 0x35: 0x03, 0x38: 0x30, 0x3D: 0x12, 0x5B: 0, 0x5C: 0, 0x5D: 0, 0x5F: 0x01}


def test_pc_config_3_5_gib():
    # 3 GiB below the hole: extended memory capped at 65535 KiB; (3 GiB - 16 MiB) / 64 KiB = 48896 = 0xbf00;
    # 512 MiB above 4 GiB = 8192 x 64 KiB = 0x2000
    assert config_bytes(3 * GiB + 512 * MiB) == {
        0x10: 0x00, 0x14: 0x06, 0x15: 0x80, 0x16: 0x02, 0x17: 0xFF, 0x18: 0xFF, 0x30: 0xFF, 0x31: 0xFF,
        0x34: 0x00, 0x35: 0xBF, 0x38: 0x30, 0x3D: 0x12, 0x5B: 0x00, 0x5C: 0x20, 0x5D: 0x00, 0x5F: 0x00}


def test_pc_config_6_gib():
    # 3 GiB above 4 GiB = 49152 x 64 KiB = 0xc000
    config = config_bytes(6 * GiB, 4)
    assert (config[0x34], config[0x35]) == (0x00, 0xBF)
    assert (config[0x5B], config[0x5C], config[0x5D]) == (0x00, 0xC0, 0x00)
    assert config[0x5F] == 0x03


def test_pc_config_tiny_memory_and_many_cpus():
    config = config_bytes(512 * 1024, 300)
    assert (config[0x15], config[0x16]) == (0x00, 0x02)  # 512 KiB
    assert (config[0x17], config[0x18], config[0x34], config[0x35]) == (0, 0, 0, 0)
    assert config[0x5F] == 0  # more than 255 CPUs: QEMU writes 0


# -- fuzzing ------------------------------------------------------------------------------

operations = st.lists(
    st.one_of(
        st.tuples(st.just("write"), st.integers(0, 1), st.integers(0, 255)),
        st.tuples(st.just("read"), st.integers(0, 1), st.just(0)),
        st.tuples(st.just("time"), st.just(0), st.integers(-2000, 400_000)),  # ms; may go back
    ),
    max_size=60,
)


@settings(max_examples=200, deadline=None)
@given(operations)
def test_any_sequence_of_accesses_never_raises_and_d_stays_0x80(ops):
    clock, line = FakeClock(), Line()
    chip = Cmos(clock=clock, interrupt=line)
    for kind, port, value in ops:
        if kind == "write":
            chip.write(port, bytes([value]))
        elif kind == "read":
            assert len(chip.read(port, 1)) == 1
        else:
            clock.t += value / 1000
        due = chip.next_event()
        if due is not None:
            assert due > clock.t
            chip.advance(due)
            follow = chip.next_event(due)
            assert follow is None or follow > due  # the platform's timer always makes progress
    assert get(chip, rtc.REG_D) == 0x80
    assert line.high == bool(chip._flags & rtc.C_IRQF)
