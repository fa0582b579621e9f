"""What the jail attack tests run inside a jailed VMM (through the source tree's debug hook):
the helpers every attack script starts with. `attempt` records "ALLOWED" or "refused ERRNO" per
attack; `report` publishes the results atomically for the test to read."""

PRELUDE = r"""
import ctypes, errno, json, os, resource, socket, stat, time
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
out = {}

def attempt(name, fn):
    try:
        fn()
        out[name] = "ALLOWED"
    except OSError as e:
        out[name] = "refused " + errno.errorcode.get(e.errno, str(e.errno))

def c(ret):
    if ret < 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))

def in_child(fn):  # single-threaded, as an exploit's payload would be: fork, try, report
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            fn()
            os.write(w, b"ok")
        except OSError as e:
            os.write(w, str(e.errno).encode())
        os._exit(0)
    os.close(w)
    res = os.read(r, 64)
    os.close(r)
    os.waitpid(pid, 0)
    if res != b"ok":
        raise OSError(int(res), "in the child")

def connect(path):
    def go():
        s = socket.socket(socket.AF_UNIX)
        try:
            s.connect(path)
        finally:
            s.close()
    return go

def report(out):
    with open("/debug/report.json.tmp", "w") as f:
        json.dump(out, f)
    os.rename("/debug/report.json.tmp", "/debug/report.json")
"""
