"""Errors corral raises. Each carries a one-line message that names the problem and the fix."""


class CorralError(Exception):
    """Base class: anything the CLI reports as a one-line error."""


class ConfigError(CorralError):
    """The user asked for something impossible (bad size, missing file, ...)."""


class KernelFormatError(CorralError):
    """The kernel file is not a format corral can boot."""


class GuestMemoryError(CorralError):
    """A guest-physical access fell outside guest RAM (hostile or buggy guest)."""


class HostError(CorralError):
    """The host cannot run corral as asked (no /dev/kvm, no permission, missing capability)."""
