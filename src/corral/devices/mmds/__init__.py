"""MMDS, the microVM metadata service, answered inside the VMM on the guest's own network
interface (Firecracker's MMDS, V1 and V2): `Mmds` serves HTTP requests from a data store,
`MmdsStack` is the frame filter a virtio-net device runs its guest's transmitted frames through.
No KVM and no host resource: frames in, frames out."""

from corral.devices.mmds.service import Mmds
from corral.devices.mmds.stack import DEFAULT_IPV4, MMDS_MAC, MmdsStack

__all__ = ["DEFAULT_IPV4", "MMDS_MAC", "Mmds", "MmdsStack"]
