"""Host sides of the devices: disk images and overlays, taps, pty/file consoles, Unix sockets.

A backend owns host resources (files, fds, sockets) and knows nothing of the guest. The machine
assembly opens each one from the config, so a bad path or a busy image is refused before any
device exists, and hands it to its device, which sees it only through a small Protocol
(`DiskImage`, `NetBackend`, `ConsolePort` in the device modules). Nothing here imports devices.
"""
