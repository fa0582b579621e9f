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


class FieldError(ConfigError):
    """Config fields hold bad values. `problems` pairs each field's path (`cpus`,
    `disks[0].serial`) with what is wrong and the fix, so a front end can name the field in its
    own words (the CLI shows the flag the user typed); the message names the fields themselves."""

    def __init__(self, field: str, reason: str, *more: tuple[str, str]) -> None:
        self.problems: tuple[tuple[str, str], ...] = ((field, reason), *more)
        super().__init__("; ".join(f"{f}: {r}" for f, r in self.problems))

    @property
    def field(self) -> str:
        return self.problems[0][0]
