"""SeaBIOS -> memtest86+ (Debian bookworm's package, pinned by SHA-256) runs a whole pass over
the guest's memory, in the lab (real SVM KVM).

memtest86+x64.bin speaks the Linux boot protocol, so SeaBIOS starts it as QEMU's
`-bios bios-256k.bin -kernel memtest86+x64.bin` does: corral serves the image's setup and body
through fw_cfg, SeaBIOS runs QEMU's linuxboot option ROM from fw_cfg's genroms/, which loads
them and enters the setup code in real mode. memtest86+ then switches to long mode itself, reads
the memory map from the BIOS (e820), and tests the RAM above its own image with its default
test list. Its console is on the serial line (`console=ttyS0,115200`): the test replays that
VT100 stream onto an 80x25 screen (tests/support/lab_memtest.py) and reads the status block:
the pass counter reaches 1 with no errors. 64 MiB keeps a pass inside the lab's speed
(nested SVM under TCG).
"""

from __future__ import annotations

from pathlib import Path

from support.lab_debian import LAB_CPU, need
from support.lab_memtest import Screen, passes
from support.labhost import CORRAL, PYTHON

WATCHER = Path(__file__).parent.parent / "support" / "lab_memtest.py"
CMDLINE = "console=ttyS0,115200 nosmp"  # one vCPU: no SMP start-up to wait through
MEMORY = "64M"
LIMIT_S = 480


def test_seabios_boots_memtest86_through_a_whole_pass(lab, memtest_build):
    binary = need(memtest_build)
    d = "/tmp/labmemtest"
    script = f"""
rm -rf {d}; mkdir -p {d}
timeout {LIMIT_S + 60} {CORRAL} run --firmware seabios --kernel {binary} --cmdline '{CMDLINE}' \
  --memory {MEMORY} {LAB_CPU} --no-reboot </dev/null > {d}/out 2>&1 &
VM=$!
{PYTHON} {WATCHER} {d}/out $VM {LIMIT_S}; echo "watcher: $?"
kill $VM; wait $VM
echo ---GUEST; cat {d}/out
"""
    out = lab.run(script, timeout=LIMIT_S + 120).output
    guest = out.split("---GUEST", 1)[-1]
    screen = Screen().feed(guest)
    shown = f"{out[:3000]}\n--- final screen:\n{screen.text()}"
    assert "Booting from ROM" in guest, shown  # SeaBIOS ran the linuxboot option ROM
    assert "Memtest86+" in screen.text(), shown  # memtest86+ drew its screen on the serial line
    assert passes(screen) >= 1, shown  # a whole pass over the test list finished
    assert screen.field("Errors:") == "0", shown
