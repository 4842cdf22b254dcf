"""QEMU's command-line grammar and every spelling ``pykvm run`` takes, checked into a RunConfig (no VM)."""

from __future__ import annotations

import pytest

from pykvm.cli.config import input_bytes, run_config
from pykvm.cli.grammar import parse, split_suboptions
from pykvm.cli.options import RUN_OPTIONS, RUN_TABLE, help_text
from pykvm.errors import UsageError


def config(*argv):
    return run_config(parse(list(argv), RUN_TABLE))


def refused(*argv) -> str:
    with pytest.raises(UsageError) as info:
        config(*argv)
    message = str(info.value)
    assert "\n" not in message
    return message


K = ("-kernel", "k.elf")


# --- the grammar -------------------------------------------------------------------------
def test_single_and_double_dash_are_the_same_option():
    assert config("-kernel", "a").kernel == config("--kernel", "a").kernel == "a"
    assert config(*K, "--m", "64").memory == config(*K, "-m", "64").memory == 64 << 20


def test_no_prefix_matching():
    # -s is the GDB shorthand (not -serial), -machine is not "-m achine", -mem is unknown (not -m em or -mem-path)
    assert config(*K, "-s").gdb == "tcp::1234"
    assert config(*K, "-machine", "q35").machine == "pc"
    assert "unknown option -mem" in refused(*K, "-mem", "/dev/hugepages")
    assert "unknown option -ser" in refused(*K, "-ser", "stdio")


def test_a_value_is_the_next_word_whatever_it_looks_like():
    # QEMU hands "-64M" to -m, which refuses it
    assert refused(*K, "-m", "-64M").startswith("-m -64M:")
    assert config(*K, "-append", "-v --x=1").append == "-v --x=1"


def test_equals_is_for_pykvms_double_dash_options_only():
    assert config(*K, "--timeout=2").timeout == 2.0
    assert "not QEMU's spelling: write -m 64" in refused(*K, "-m=64")
    assert "--strict takes no value" in refused(*K, "--strict=yes")


def test_missing_value_and_stray_words():
    assert refused(*K, "-m") == "-m needs a value (SIZE)"
    assert "unexpected argument 'disk.img'" in refused("disk.img")


def test_suboptions_implied_key_flags_and_double_comma():
    assert split_suboptions("4,cores=2", "cpus") == [("cpus", "4"), ("cores", "2")]
    assert split_suboptions("virtconsole,nowait", "driver") == [("driver", "virtconsole"), ("nowait", "on")]
    assert split_suboptions("file,path=a,,b", "backend") == [("backend", "file"), ("path", "a,b")]
    assert split_suboptions("k=", None) == [("k", "")]
    with pytest.raises(UsageError):
        split_suboptions("a,,,=b", "x")


def test_repeated_options_keep_every_occurrence_and_the_last_wins_where_qemu_says():
    c = config(*K, "-m", "64", "-m", "256", "-device", "isa-debug-exit", "-device", "virtio-serial-device",
               "-initrd", "a", "-initrd", "b")
    assert c.memory == 256 << 20
    assert [d.driver for d in c.devices] == ["isa-debug-exit", "virtio-serial-device"]
    assert c.initrd == ["a", "b"]


# --- each option -------------------------------------------------------------------------
@pytest.mark.parametrize("text, size", [
    ("64", 64 << 20), ("64M", 64 << 20), ("1G", 1 << 30), ("2048K", 2 << 20), ("size=512", 512 << 20),
    ("256M,slots=2,maxmem=1G", 256 << 20),
])
def test_memory(text, size):
    assert config(*K, "-m", text).memory == size


@pytest.mark.parametrize("text, cpus, topology", [
    ("4", 4, {"maxcpus": 4}),
    ("cpus=2", 2, {"maxcpus": 2}),
    ("4,cores=2,threads=2", 4, {"cores": 2, "threads": 2, "maxcpus": 4}),
    ("2,sockets=2,cores=2,maxcpus=4", 2, {"sockets": 2, "cores": 2, "maxcpus": 4}),
    ("sockets=2,cores=4", 8, {"sockets": 2, "cores": 4, "maxcpus": 8}),
])
def test_smp(text, cpus, topology):
    c = config(*K, "-smp", text)
    assert (c.cpus, c.topology) == (cpus, topology)


@pytest.mark.parametrize("args, message", [
    (("-smp", "0"), "cpus must be at least 1"),
    (("-smp", "4,cores=3"), "= 3, not 4 CPUs"),
    (("-smp", "8,maxcpus=4"), "exceed maxcpus=4"),
    (("-smp", "300"), "at most 255 CPUs"),
    (("-smp", "2,nodes=2"), "unknown key 'nodes'"),
    (("-m", "lots"), "-m lots:"),
    (("-m", "64,slotz=2"), "unknown key 'slotz'"),
])
def test_bad_sizes_and_counts(args, message):
    assert message in refused(*K, *args)


def test_machine_types_and_properties():
    assert config(*K, "-M", "microvm").machine == "microvm"
    assert config(*K, "-machine", "pc-i440fx-7.2").machine == "pc"
    c = config(*K, "-machine", "pc,accel=kvm,kernel_irqchip=split")
    assert (c.machine, c.irqchip) == ("pc", "split")
    assert config(*K, "-M", "pc", "-machine", "kernel_irqchip=off").irqchip == "off"
    assert "pykvm has only kvm" in refused(*K, "-machine", "pc,accel=tcg")
    assert "pykvm has pc, microvm" in refused(*K, "-M", "isapc")
    assert "unknown property 'frob'" in refused(*K, "-M", "pc,frob=1")
    assert "the machine types are pc, microvm" in refused(*K, "-M", "help")


def test_accelerator_spellings():
    for argv in (("-accel", "kvm"), ("-enable-kvm",), ("-machine", "accel=kvm")):
        config(*K, *argv)  # accepted: kvm is the only accelerator
    assert "pykvm has only kvm" in refused(*K, "-accel", "tcg")


def test_cpu_model_and_features():
    c = config(*K, "-cpu", "host,+x2apic,-pdpe1gb,vmx=off")
    assert c.cpu_features == [("x2apic", True), ("pdpe1gb", False), ("vmx", False)]
    assert "only host" in refused(*K, "-cpu", "qemu64")
    assert "'bogus' is not +feature" in refused(*K, "-cpu", "host,bogus")


def test_devices_globals_chardevs():
    c = config(*K, "-device", "isa-debug-exit,iobase=0xf4,iosize=0x04", "-device", "virtio-serial-device",
               "-chardev", "pty,id=con0", "-device", "virtconsole,chardev=con0",
               "-global", "kvm-pit.lost_tick_policy=discard")
    assert [(d.driver, d.props) for d in c.devices] == [
        ("isa-debug-exit", {"iobase": "0xf4", "iosize": "0x04"}), ("virtio-serial-device", {}),
        ("virtconsole", {"chardev": "con0"})]
    assert c.chardevs == {"con0": ("pty", {})}
    assert c.globals == [("kvm-pit", "lost_tick_policy", "discard")]
    assert "not a device pykvm has" in refused(*K, "-device", "e1000")
    assert "needs id=" in refused(*K, "-chardev", "pty")
    assert "id 'a' is used twice" in refused(*K, "-chardev", "null,id=a", "-chardev", "pty,id=a")
    assert "use DRIVER.PROP=VALUE" in refused(*K, "-global", "nodot=1")


def test_serial_monitor_display_and_run_control():
    c = config(*K, "-serial", "stdio", "-serial", "file:com2.txt", "-monitor", "none", "-nographic",
               "-display", "none", "-nodefaults", "-no-reboot", "-S", "-name", "vm0")
    assert c.serials == ["stdio", "file:com2.txt"] and c.monitor == "none"
    assert (c.nographic, c.nodefaults, c.freeze, c.name) == (True, True, True, "vm0")
    assert "four COM ports" in refused(*K, *["-serial", "null"] * 5)
    assert "no display" in refused(*K, "-display", "gtk")


def test_gdb_addresses():
    assert config(*K, "-gdb", "tcp::4321").gdb == "tcp::4321"
    assert config(*K, "-gdb", "unix:/tmp/g.sock").gdb == "unix:/tmp/g.sock"
    assert refused(*K, "-gdb", "tcp::99999").startswith("-gdb tcp::99999:")


def test_ignored_options_are_accepted_and_listed_as_ignored():
    config(*K, "-no-user-config", "-vga", "none", "-net", "none", "-nic", "none", "-boot", "n", "-rtc",
           "base=utc", "-k", "en-us", "-usb", "-msg", "timestamp=on")
    text = help_text("run", RUN_OPTIONS, "")
    ignored = text.split("accepted for QEMU command lines, and ignored:")[1]
    for name in ("-no-user-config", "-vga", "-net", "-nic", "-boot", "-rtc", "-usb", "-msg"):
        assert f"\n  {name}" in ignored


def test_help_lists_every_option_once():
    text = help_text("run", RUN_OPTIONS, "")
    for option in RUN_OPTIONS:
        assert sum(line.lstrip().startswith(option.names[0] + " ") or line.strip() == option.names[0]
                   or line.lstrip().startswith(option.names[0] + " |")
                   for line in text.splitlines()) == 1, option.names


# --- pykvm's own ---------------------------------------------------------------------------
def test_pykvms_options():
    c = config("--guest", "hello64", "--args", "1,0x2", "--timeout", "1.5", "--strict", "--no-c-loop",
               "--summary", "--stats", "--stats-json", "s.json")
    assert (c.guest, c.args, c.timeout, c.strict, c.c_loop) == ("hello64", (1, 2), 1.5, True, False)
    assert (c.summary, c.stats, c.stats_json) == (True, True, "s.json")
    c = config(*K, "--mode", "long", "--load-addr", "0x200000", "--format", "flat")
    assert (c.mode, c.load_addr, c.format) == ("long", 0x200000, "flat")


@pytest.mark.parametrize("args, message", [
    ((), "give a -kernel FILE or a --guest NAME"),
    (("--guest", "a", "-kernel", "b"), "give a -kernel FILE or a --guest NAME"),
    (("--guest", "hello64", "--mode", "long"), "--mode and --load-addr go with -kernel"),
    ((*K, "--mode", "unreal"), "--mode unreal: use one of"),
    ((*K, "--format", "pe"), "--format pe:"),
    ((*K, "--timeout", "nan"), "finite number of seconds above 0"),
    ((*K, "--timeout", "0"), "finite number of seconds above 0"),
    ((*K, "--args", "1,2,3"), "one or two numbers"),
    ((*K, "--args", "0x1" + "0" * 16), "does not fit a 64-bit register"),
    ((*K, "--load-addr", "x"), "not a number"),
])
def test_pykvms_options_refused(args, message):
    assert message in refused(*args)


def test_input_escapes():
    assert input_bytes(r"a\n\r\t\0\x41\\€") == b"a\n\r\t\0A\\" + "€".encode()
    for bad in (r"\q", "\\", r"\x4"):
        with pytest.raises(UsageError):
            input_bytes(bad)
