"""SeaBIOS -> memtest86+ (Debian bookworm's package, pinned by SHA-256) runs a whole pass over
the guest's memory, in the lab (real SVM KVM).

memtest86+x64.bin speaks the Linux boot protocol, so SeaBIOS starts it as QEMU's
`-bios bios-256k.bin -kernel memtest86+x64.bin` does: corral serves the image's setup and body
through fw_cfg, SeaBIOS runs QEMU's linuxboot option ROM from fw_cfg's genroms/, which loads
them and enters the setup code in real mode. memtest86+ then switches to long mode itself, reads
the memory map from the BIOS (e820), and runs its default test list over the RAM. Its console
is on the serial line (`console=ttyS0,115200`): the test replays that VT100 stream onto an
80x25 screen (tests/support/lab_memtest.py) and reads the status block.

A whole pass: 16 MiB (the least corral gives; memtest86+ tests the ~12 MiB above itself) keeps
it inside the lab's speed. Measured 2026-11-30 in the lab: tests #0-#9 took 44 s of memtest86+'s
own clock; the last, #10 (bit fade), writes a pattern, sleeps 80 s, checks it, and again with
the inverse, about 3 minutes whatever the memory size; the whole pass ended 292 s after the
watcher started (319 s for the pytest session with the lab's boot). The test waits for the pass counter to
reach 1 with no errors (UNTIL = "#10" would stop at the bit fade test instead, #0-#9 done).
"""

from __future__ import annotations

from pathlib import Path

from support.lab_debian import LAB_CPU, need
from support.lab_memtest import Screen, current_test, pass_percent, passes
from support.labhost import CORRAL, PYTHON

WATCHER = Path(__file__).parent.parent / "support" / "lab_memtest.py"
CMDLINE = "console=ttyS0,115200 nosmp nobench"  # one vCPU; no bandwidth benchmark before the tests
MEMORY = "16M"
LIMIT_S = 540
UNTIL = ""  # the whole pass ("#10": stop when the bit fade test starts, #0-#9 done)


def test_seabios_boots_memtest86_through_a_whole_pass(lab, memtest_build, until: str = UNTIL):
    binary = need(memtest_build)
    d = "/tmp/labmemtest"
    script = f"""
rm -rf {d}; mkdir -p {d}
timeout {LIMIT_S + 60} {CORRAL} run --firmware seabios --kernel {binary} --cmdline '{CMDLINE}' \
  --memory {MEMORY} {LAB_CPU} --no-reboot </dev/null > {d}/out 2>&1 &
VM=$!
{PYTHON} {WATCHER} {d}/out $VM {LIMIT_S} "{until}"; echo "watcher: $?"
kill $VM  # timeout passes SIGTERM on; a VMM that outlives it leaves its threads' state here
for i in $(seq 20); do kill -0 $VM 2>/dev/null || break; sleep 1; done
if kill -0 $VM 2>/dev/null; then
    echo "corral outlived SIGTERM by 20 s:"
    for t in /proc/$(pgrep -P $VM)/task/*; do echo "$t $(cat $t/comm) $(cut -d' ' -f3 $t/stat)"; cat $t/stack; done
    pkill -9 -P $VM
fi
wait $VM
echo ---GUEST; head -c 4000000 {d}/out
"""
    out = lab.run(script, timeout=LIMIT_S + 120).output
    timeline, _, guest = out.partition("---GUEST")
    screen = Screen().feed(guest)
    print(f"{timeline}\n{screen.text()}")  # when each test started, the last screen (pytest -rP)
    shown = f"{out[:3000]}\n--- final screen:\n{screen.text()}"
    assert "Booting from ROM" in guest, shown  # SeaBIOS ran the linuxboot option ROM
    assert "Memtest86+" in screen.text(), shown  # memtest86+ drew its screen on the serial line
    assert "watcher: 0" in out, shown  # it got there inside the time limit
    if until:
        assert current_test(screen).startswith(until + " "), shown
        assert pass_percent(screen) >= 50, shown  # the bar counts the tests behind it
    else:
        assert passes(screen) >= 1, shown  # a whole pass over the test list finished
    assert screen.field("Errors:") == "0", shown
