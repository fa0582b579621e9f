# Types of the compiled fast path (_fastring.c); fastpath.py is its only user.
# regions: packed "<QQQ" (gpa, size, host address) per RAM slot (fastpath.regions).

Buffers = list[tuple[int, int]]

def take(
    regions: bytes,
    desc: int,
    avail: int,
    used: int,
    size: int,
    index: int,
    indirect: bool,
    last_avail: int,
    count: int,
    /,
) -> tuple[list[tuple[int, Buffers, Buffers]], int, str | None]: ...
def net_tx(
    regions: bytes,
    desc: int,
    avail: int,
    used: int,
    size: int,
    index: int,
    indirect: bool,
    event_idx: bool,
    last_avail: int,
    used_idx: int,
    budget: int,
    fd: int,
    /,
) -> tuple[int, int, int, int, int, str | None, int]: ...
def blk_rw(
    regions: bytes,
    desc: int,
    avail: int,
    used: int,
    size: int,
    index: int,
    indirect: bool,
    event_idx: bool,
    last_avail: int,
    used_idx: int,
    budget: int,
    fd: int,
    read_only: bool,
    sectors: int,
    /,
) -> tuple[int, int, int, int, int, int, str | None, int, int]: ...
def net_rx(
    regions: bytes,
    desc: int,
    avail: int,
    used: int,
    size: int,
    index: int,
    indirect: bool,
    event_idx: bool,
    last_avail: int,
    used_idx: int,
    budget: int,
    fd: int,
    bounce: memoryview,
    /,
) -> tuple[int, int, int, int, int, int, int]: ...
