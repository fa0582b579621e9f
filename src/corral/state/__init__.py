"""VM state as data: what pause, snapshot, restore, clone and live migration carry.

One walk serves all of them: `Machine.save_state` gathers KVM's VM and vCPU state (captured by
corral.vstate.kvm_state) and every component's declared state model into a `MachineState`;
restore and incoming migration load the same models back. `snapshot` writes the walk and guest
RAM to a directory; corral.migration sends it over a socket after the memory.
"""
