"""A Firecracker-compatible API for corral: `corral firecracker --api-sock PATH` serves
Firecracker's REST API (HTTP/1.1 on a Unix socket), so clients written for Firecracker drive a
corral microVM unchanged.

    models.py   the request and reply bodies, with Firecracker's field names
    vmm.py      pre-boot resources -> a corral Machine; the post-boot verbs on it
    snapshot.py Firecracker's snapshot_path + mem_file_path <-> corral's snapshot directory
    logs.py     the logger and metrics settings
    routes.py   paths and methods -> the VMM, replies shaped as Firecracker's
    server.py   HTTP/1.1 on a Unix socket (stdlib), bounded and keep-alive
    main.py     the process: flags, --config-file, the API, exit with the guest
"""
