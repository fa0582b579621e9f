"""`corral serve`, the host daemon: one per host, it creates, lists, pauses, snapshots, stops
and deletes VMs over a REST API on a Unix socket (and TCP with a bearer token, off by default).

Each VM is its own `corral firecracker` process (started through a Launcher, in its own
session), driven through its per-VM Firecracker API socket, so VMs keep running when the daemon
is restarted or killed; the daemon finds them again in its state directory. As root, each VM
runs in a jail of its own (corral.jail: its own uid, namespaces, a minimal read-only root),
entered inside the fork server's child with no exec, so jailed VMs keep the template's shared
pages; `--no-jail` turns that off, and a daemon that is not root runs VMs unjailed and says so.

    launcher.py  how a VM process is started (a Protocol: the fork server, jailed or not, or
                 posix_spawn of `python -m corral`)
    cgroups.py   per-VM resource limits on cgroup v2 or v1, whichever the host mounts
    statedir.py  STATE/vms/ID/: config, pid (with its start time), console, log, exit record
    vmapi.py     HTTP/1.1 over a Unix socket: the client of a VM's API and of the daemon
    models.py    the daemon's request and reply bodies
    fleet.py     the VMs: create (boot or clone), inspect, pause, resume, snapshot, stop, rm
    metrics.py   Prometheus text: CPU time, memory, state, cgroup and VM counters per VM
    server.py    the REST routes, on a Unix socket (peer uid checked) and optionally TCP
"""
