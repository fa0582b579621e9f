"""Fixtures the unit tests of several modules share."""

import pytest
from support.virtio_driver import Driver, blk_image_file

from corral.backends.disk import open_disk
from corral.devices.virtio.blk import VirtioBlock


@pytest.fixture
def blk_image(tmp_path):
    """A raw image whose every sector starts with its number (support.virtio_driver)."""
    return blk_image_file(tmp_path / "disk.img")


@pytest.fixture
def blk(blk_image):
    """A virtio-blk on that image behind a set-up driver, serial "corral-disk-7"."""
    d = Driver(VirtioBlock(open_disk(str(blk_image)), serial="corral-disk-7"))
    d.setup()
    yield d
    d.close()
