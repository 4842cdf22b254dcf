"""ACPI PM1 event/control blocks, the PM timer and the SMI command port."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pykvm.devices import DeviceStop
from pykvm.devices import acpi_pm as pm
from pykvm.devices.acpi_pm import AcpiPm, SmiCommand
from pykvm.errors import DeviceError

NS = 1_000_000_000
HZ = 3_579_545


class FakeClock:
    """Monotonic nanoseconds the test sets by hand."""

    ns = 0

    def __call__(self) -> int:
        return self.ns


def ns_of_tick(tick: int) -> int:
    """The first clock value at which the timer shows ``tick`` (computed independently: ceil)."""
    ns = tick * NS // HZ
    while ns * HZ // NS < tick:
        ns += 1
    return ns


@pytest.fixture
def clock():
    return FakeClock()


@pytest.fixture
def sci():
    return []  # every level the device drove the SCI to


@pytest.fixture
def sleeps():
    return []


@pytest.fixture
def device(clock, sci, sleeps):
    return AcpiPm(clock_ns=clock, interrupt=sci.append, on_sleep=sleeps.append)


def timer(device: AcpiPm) -> int:
    return int.from_bytes(device.read(pm.PM_TMR, 4), "little")


def status(device: AcpiPm) -> int:
    return int.from_bytes(device.read(pm.PM1_STS, 2), "little")


def write16(device: AcpiPm, offset: int, value: int) -> None:
    device.write(offset, value.to_bytes(2, "little"))


# -- the PM timer ----------------------------------------------------------------------


def test_one_second_of_clock_is_3579545_ticks_mod_2_24(device, clock):
    clock.ns = 7 * NS + 123_456
    before = timer(device)
    clock.ns += NS
    assert (timer(device) - before) % (1 << 24) == HZ


def test_timer_counts_from_the_clock(device, clock):
    assert timer(device) == 0
    clock.ns = 1_000  # 1 us: 3.58 ticks
    assert timer(device) == 3
    clock.ns = NS // 2
    assert timer(device) == HZ // 2


def test_timer_wraps_at_2_24_and_its_top_byte_reads_zero(device, clock):
    clock.ns = ns_of_tick((1 << 24) - 1)
    assert device.read(pm.PM_TMR, 4) == b"\xff\xff\xff\x00"
    clock.ns = ns_of_tick(1 << 24)
    assert timer(device) == 0
    clock.ns = ns_of_tick((1 << 24) + 5)
    assert timer(device) == 5


def test_timer_is_read_only(device, clock):
    clock.ns = NS
    device.write(pm.PM_TMR, b"\0\0\0\0")
    assert timer(device) == HZ


def test_tmr_sts_is_set_when_bit_23_toggles(device, clock):
    clock.ns = ns_of_tick(1 << 23) - 1
    assert status(device) & pm.TMR_STS == 0
    clock.ns += 1
    assert status(device) & pm.TMR_STS
    write16(device, pm.PM1_STS, pm.TMR_STS)  # write 1 to clear
    assert status(device) & pm.TMR_STS == 0
    clock.ns = ns_of_tick(1 << 24) - 1  # the next toggle (1 -> 0) is at 2**24
    assert status(device) & pm.TMR_STS == 0
    clock.ns += 1
    assert status(device) & pm.TMR_STS


def test_timer_sci_and_next_event(device, clock, sci):
    write16(device, pm.PM1_EN, pm.TMR_EN)
    due = device.next_event()
    assert due == ns_of_tick(1 << 23)
    device.advance(due - 1)
    assert sci == []
    device.advance(due)
    assert sci == [True]
    assert device.next_event(due) is None  # already set: nothing more to raise
    clock.ns = due
    write16(device, pm.PM1_STS, pm.TMR_STS)
    assert sci == [True, False]
    assert device.next_event() == ns_of_tick(1 << 24)


# -- PM1 status and enable ----------------------------------------------------------------


def test_status_is_write_one_to_clear(device):
    device.wake()  # WAK_STS | PWRBTN_STS, as QEMU's "other" wakeup
    assert status(device) == pm.WAK_STS | pm.PWRBTN_STS
    write16(device, pm.PM1_STS, 0)
    assert status(device) == pm.WAK_STS | pm.PWRBTN_STS
    write16(device, pm.PM1_STS, pm.WAK_STS)
    assert status(device) == pm.PWRBTN_STS
    device.write(pm.PM1_STS + 1, b"\x01")  # a byte write to the high half clears bit 8
    assert status(device) == 0


@pytest.mark.parametrize("reason, bits", [
    (pm.WAKE_RTC, pm.WAK_STS | pm.RTC_STS),
    (pm.WAKE_TIMER, pm.WAK_STS | pm.TMR_STS),
    (pm.WAKE_OTHER, pm.WAK_STS | pm.PWRBTN_STS),
])
def test_wake_reasons(device, reason, bits):
    device.wake(reason)
    assert status(device) == bits


def test_enable_register_reads_back_and_byte_writes_merge(device):
    write16(device, pm.PM1_EN, pm.PWRBTN_EN | pm.TMR_EN)
    device.write(pm.PM1_EN + 1, b"\x05")  # high byte: PWRBTN_EN | RTC_EN
    assert device.read(pm.PM1_EN, 2) == (pm.RTC_EN | pm.PWRBTN_EN | pm.TMR_EN).to_bytes(2, "little")
    assert device.rtc_wake_enabled


def test_a_dword_write_at_0_sets_status_and_enable_lanes(device, sci):
    device.wake()
    device.write(pm.PM1_STS, (pm.PWRBTN_EN << 16 | pm.WAK_STS).to_bytes(4, "little"))
    assert status(device) == pm.PWRBTN_STS
    assert sci == [True]  # PWRBTN_STS is set and now enabled


def test_power_button_needs_its_enable_as_in_qemu(device, sci):
    assert device.power_button() is False
    assert status(device) == 0
    write16(device, pm.PM1_EN, pm.PWRBTN_EN)
    assert device.power_button() is True
    assert status(device) == pm.PWRBTN_STS
    assert sci == [True]
    write16(device, pm.PM1_STS, pm.PWRBTN_STS)
    assert sci == [True, False]


def test_sci_follows_status_and_enable_not_sci_en(device, sci):
    device.wake()  # PWRBTN_STS set but not enabled
    assert sci == []
    write16(device, pm.PM1_EN, pm.PWRBTN_EN)
    assert sci == [True]
    assert not device.sci_enabled  # QEMU's level ignores SCI_EN
    write16(device, pm.PM1_EN, 0)
    assert sci == [True, False]
    device.write(pm.PM1_STS, (pm.WAK_STS | pm.PWRBTN_STS).to_bytes(2, "little"))
    write16(device, pm.PM1_EN, pm.WAK_STS)  # WAK_STS never raises the SCI
    assert sci == [True, False]


def test_reset_clears_everything(device, sci):
    write16(device, pm.PM1_EN, pm.PWRBTN_EN)
    device.power_button()
    device.set_sci_enabled(True)
    device.reset()
    assert device.read(0, 6) == bytes(6)
    assert sci == [True, False]


# -- PM1 control and sleep ------------------------------------------------------------------


def test_slp_en_calls_on_sleep_with_the_sleep_type(device, sleeps):
    write16(device, pm.PM1_CNT, pm.SCI_EN | pm.SLP_TYP_S3 << pm.SLP_TYP_SHIFT)
    assert sleeps == []  # SLP_TYP alone does nothing
    write16(device, pm.PM1_CNT, pm.SCI_EN | pm.SLP_EN | pm.SLP_TYP_S3 << pm.SLP_TYP_SHIFT)
    assert sleeps == [1]
    # SLP_EN is write-only; the rest reads back.
    assert device.read(pm.PM1_CNT, 2) == (pm.SCI_EN | 1 << 10).to_bytes(2, "little")
    device.write(pm.PM1_CNT + 1, bytes([(pm.SLP_EN | pm.SLP_TYP_S4 << pm.SLP_TYP_SHIFT) >> 8]))
    assert sleeps == [1, 2]
    assert device.sci_enabled  # the low byte was not touched
    write16(device, pm.PM1_CNT, pm.SLP_EN | 7 << pm.SLP_TYP_SHIFT)
    assert sleeps == [1, 2, 7]  # any type: the platform decides


def test_s5_may_stop_the_machine_from_on_sleep(clock):
    def power_off(slp_typ: int) -> None:
        if slp_typ == pm.SLP_TYP_S5:
            raise DeviceStop("poweroff")

    device = AcpiPm(clock_ns=clock, on_sleep=power_off)
    with pytest.raises(DeviceStop):
        write16(device, pm.PM1_CNT, pm.SLP_EN | pm.SLP_TYP_S5 << pm.SLP_TYP_SHIFT)
    assert device.read(pm.PM1_CNT, 2) == b"\0\0"


def test_the_hole_at_6_reads_all_ones(device):
    assert device.read(6, 2) == b"\xff\xff"
    device.write(6, b"\0\0")
    assert device.read(4, 4) == b"\0\0\xff\xff"


def test_host_errors(device):
    with pytest.raises(DeviceError):
        device.read(10, 4)
    with pytest.raises(DeviceError):
        device.write(0, b"")
    with pytest.raises(DeviceError):
        device.wake("lid")
    with pytest.raises(DeviceError):
        SmiCommand().read(1, 2)


# -- the SMI command port ------------------------------------------------------------------


def test_smi_acpi_enable_and_disable(device):
    smi = SmiCommand(device.set_sci_enabled)
    smi.write(0, bytes([pm.ACPI_ENABLE]))
    assert device.sci_enabled
    assert device.read(pm.PM1_CNT, 2) == b"\x01\x00"
    smi.write(0, b"\x42")  # another command: stored, no effect
    assert device.sci_enabled
    smi.write(0, bytes([pm.ACPI_DISABLE]))
    assert not device.sci_enabled
    assert smi.read(0, 1) == bytes([pm.ACPI_DISABLE])


def test_smi_status_port_is_storage_and_words_split():
    calls = []
    smi = SmiCommand(calls.append)
    smi.write(0, bytes([pm.ACPI_ENABLE, 0x5A]))  # outw 0xb2
    assert smi.read(0, 2) == bytes([pm.ACPI_ENABLE, 0x5A])
    assert calls == [True]


# -- fuzzing ------------------------------------------------------------------------------

accesses = st.lists(
    st.one_of(
        st.tuples(st.integers(0, 11), st.binary(min_size=1, max_size=4)).filter(lambda a: a[0] + len(a[1]) <= 12),
        st.tuples(st.just(-1), st.integers(0, 10 * NS).map(lambda n: n.to_bytes(8, "little"))),  # time passes
    ),
    max_size=40,
)


@settings(max_examples=200, deadline=None)
@given(accesses)
def test_fuzzed_register_writes(ops):
    clock, sci, sleeps = FakeClock(), [], []
    device = AcpiPm(clock_ns=clock, interrupt=sci.append, on_sleep=sleeps.append)
    for offset, data in ops:
        if offset < 0:
            clock.ns += int.from_bytes(data, "little")
            continue
        device.write(offset, data)
        block = device.read(0, 12)
        sts, en, cnt = (int.from_bytes(block[i:i + 2], "little") for i in (0, 2, 4))
        assert cnt & pm.SLP_EN == 0
        assert block[6:8] == b"\xff\xff" and block[11] == 0
        assert (sci[-1] if sci else False) == bool(sts & en & pm.SCI_SOURCES)
        assert all(0 <= slp_typ <= 7 for slp_typ in sleeps)
        due = device.next_event()
        assert due is None or due > clock.ns


# --- GPE0 ---------------------------------------------------------------------------------

def test_gpe0_reads_zero_status_keeps_enable_bits_and_clears_by_writing_one():
    from pykvm.devices.acpi_gpe import AcpiGpe

    gpe = AcpiGpe(4)
    assert gpe.read(0, 4) == bytes(4)  # no event pending: not the all-ones of an unmapped port
    gpe.write(2, b"\x05\x80")  # GPE0_EN
    gpe.write(0, b"\xff\xff")  # writing 1s to the status clears nothing that is set (nothing is)
    assert gpe.read(0, 4) == b"\x00\x00\x05\x80" and gpe.read(3, 1) == b"\x80"
    restored = AcpiGpe(4)
    restored.load_state(gpe.save_state())
    assert restored.read(0, 4) == gpe.read(0, 4)
    with pytest.raises(DeviceError):
        gpe.read(3, 2)
    with pytest.raises(DeviceError):
        AcpiGpe(3)


@pytest.mark.kvm
def test_gpe0_answers_at_the_fadts_port_on_the_pc():
    from pykvm.platform.machine import Machine

    # mov dx, 0xafe0 ; in eax, dx (GPE0_STS and GPE0_EN) ; out 0xf4, eax (debug-exit) ; jmp $
    code = bytes([0x66, 0xBA, 0xE0, 0xAF, 0xED, 0xE7, 0xF4, 0xEB, 0xFE])
    with Machine(memory="32M", platform="pc") as m:
        m.load_image(code, format="flat", mode="protected")
        result = m.run(timeout=30)
    assert result.ended == "debug-exit" and result.exit_status == 1  # (0 << 1) | 1: every bit clear
