"""The Unix sockets corral listens on (corral/backends/unix_socket.py): 0600 whatever the
umask, so another local user cannot even connect; a stale socket is replaced, a live one or
another file is refused with one line."""

from __future__ import annotations

import os
import socket
import stat

import pytest
from support.hostile import NOBODY, knock_as, open_dir, umask

from corral.backends.unix_socket import listen_unix
from corral.errors import ConfigError


@pytest.mark.skipif(os.geteuid() != 0, reason="becoming another user needs root")
def test_a_socket_is_its_owners_alone_whatever_the_umask():
    with open_dir() as d, umask(0):
        s = listen_unix(d / "vm.sock", "control socket", "path")
        try:
            assert stat.S_IMODE(os.stat(d / "vm.sock").st_mode) == 0o600
            assert knock_as(NOBODY, d / "vm.sock") == "connect: EACCES"
        finally:
            s.close()


def test_a_stale_socket_is_replaced_and_a_live_one_or_a_file_refused(tmp_path):
    path = tmp_path / "v.sock"
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(str(path))
    dead.close()  # left behind by a VMM that died
    live = listen_unix(path, "vsock socket", "vsock.uds_path")
    try:
        with pytest.raises(ConfigError, match=r"^vsock socket .* is in use by another program: give another"):
            listen_unix(path, "vsock socket", "vsock.uds_path")
    finally:
        live.close()
    other = tmp_path / "notes.txt"
    other.write_text("keep me")
    with pytest.raises(ConfigError, match="in use by another program"):
        listen_unix(other, "vsock socket", "vsock.uds_path")
    assert other.read_text() == "keep me"
