"""Build configuration beyond pyproject.toml: the optional compiled fast paths.

`corral.devices.virtio._fastring` (the virtqueue walk and the net and blk data paths) and
`corral.vstate._exitloop` (the vCPU loop's KVM_RUN and port-I/O/MMIO dispatch), C with the
CPython API only, are built by `pip install` when a C compiler and Python's headers are there.
Both are optional: when a build fails the install still succeeds and corral runs its Python
path (`corral doctor` says which ones are active).
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "corral.devices.virtio._fastring",
            ["src/corral/devices/virtio/_fastring.c"],
            extra_compile_args=["-O2", "-fno-strict-aliasing", "-Wall"],
            optional=True,
        ),
        Extension(
            "corral.vstate._exitloop",
            ["src/corral/vstate/_exitloop.c"],
            extra_compile_args=["-O2", "-fno-strict-aliasing", "-Wall"],
            optional=True,
        ),
    ]
)
