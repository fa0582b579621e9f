"""VM state: what pause, snapshot, restore, clone and live migration carry.

One walk serves all of them: `machine_state` captures every component (vCPUs, the in-kernel
irqchip, PIT and clock, each device) into plain pydantic models; `apply_machine_state` puts them
back into a freshly built machine. Snapshots write that walk to a directory; migration sends it
over a socket after the memory.
"""
