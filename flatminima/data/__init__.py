"""Data sets in their standard file formats, and a loader that keeps them on the device.

``get_dataset(name, root, ...)`` reads (or downloads, with checksum verification) a data set and
returns an :class:`ArrayData` of CPU tensors; :class:`DeviceLoader` moves it to the training
device once and yields normalized, augmented batches with batched tensor ops.
:class:`ImageFolderStream` streams image folders too large for memory through worker processes
into the same augmentation. Every missing or malformed file raises a one-line :class:`DataError`.

Example::

    from flatminima.data import get_dataset, DeviceLoader
    data = get_dataset("cifar10", "data/")
    train = DeviceLoader.from_data(data, "train", 128, augment="cutout", device="cuda", seed=0)
    for epoch in range(200):
        train.set_epoch(epoch)
        for x, y in train:
            ...
"""

from flatminima.data.arraydata import ArrayData
from flatminima.data.augment import (
    Augment,
    center_crop,
    color_jitter,
    crop_and_resize,
    cutout,
    hflip,
    make_augment,
    normalize,
    random_crop,
    random_resized_crop,
    resized_crop_boxes,
)
from flatminima.data.download import download_url, file_digest, safe_extract, verify_checksum
from flatminima.data.errors import DataError
from flatminima.data.loader import DeviceLoader
from flatminima.data.registry import (
    add_label_noise,
    describe_datasets,
    get_dataset,
    list_datasets,
    register_dataset,
    subset,
)
from flatminima.data.stream import ImageFolderStream

__all__ = [
    "ArrayData", "DataError", "DeviceLoader", "ImageFolderStream", "get_dataset", "list_datasets",
    "describe_datasets", "register_dataset", "subset", "add_label_noise", "Augment",
    "make_augment", "random_crop", "hflip", "cutout", "random_resized_crop", "resized_crop_boxes",
    "crop_and_resize", "center_crop", "color_jitter", "normalize", "download_url", "file_digest",
    "safe_extract", "verify_checksum",
]
