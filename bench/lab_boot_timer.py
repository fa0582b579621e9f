"""Runs inside the lab: launch a VMM command, timestamp the guest's first `/proc/uptime` line.

Prints one JSON object: wall seconds from launch to that line, the guest uptime it reports
(the guest's own clock when its first command starts), and wall seconds to the VMM's exit.
"""

import json
import os
import re
import subprocess
import sys
import time

UPTIME = re.compile(rb"^\s*(\d+\.\d+) \d+\.\d+\s*$")


def main() -> int:
    timeout = float(sys.argv[1])
    cmd = sys.argv[2:]
    t0 = time.monotonic()
    p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    buf, seen, uptime = b"", None, None
    fd = p.stdout.fileno()
    while time.monotonic() - t0 < timeout:
        chunk = os.read(fd, 65536)
        if not chunk:
            break
        buf += chunk
        if seen is None:
            for line in buf.split(b"\n"):
                m = UPTIME.match(line.replace(b"\r", b""))
                if m:
                    seen, uptime = time.monotonic() - t0, float(m.group(1))
                    break
    try:
        p.wait(max(1.0, timeout - (time.monotonic() - t0)))
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()
    end = time.monotonic() - t0
    print(
        json.dumps(
            {
                "to_command_s": seen,
                "guest_uptime_s": uptime,
                "exit_s": end,
                "rc": p.returncode,
                "tail": buf[-600:].decode(errors="replace") if seen is None else "",
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
