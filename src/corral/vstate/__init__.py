"""Everything that holds a KVM fd (Firecracker's vstate): the VM (capabilities, memory slots,
dirty log, clock), vCPU threads and their exit dispatch, interrupt lines and MSI routing,
ioeventfd doorbells, vCPU kicks, and the capture of KVM's own state for snapshots.

Above it, the builder and the machine speak in verbs; below it, devices see only the narrow
Protocols of corral.devices.base (IrqLine, VmControl, Doorbells) and never KVM.
"""
