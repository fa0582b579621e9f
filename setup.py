"""Build configuration beyond pyproject.toml: the optional compiled virtqueue fast path.

`corral.devices.virtio._fastring` (C, CPython API only) is built by `pip install` when a C
compiler and Python's headers are there. It is optional: when the build fails the install
still succeeds and corral runs its Python path (`corral doctor` says which one is active).
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "corral.devices.virtio._fastring",
            ["src/corral/devices/virtio/_fastring.c"],
            extra_compile_args=["-O2", "-fno-strict-aliasing", "-Wall"],
            optional=True,
        )
    ]
)
