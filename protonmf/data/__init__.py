"""Images in, features out: decoding, preprocessing, image sources, batching, and the feature store.

- :mod:`~protonmf.data.decode`: bytes or a file to an RGB image, or the reason it cannot be read;
- :mod:`~protonmf.data.preprocess`: resize, crop, normalise (and back, for display);
- :mod:`~protonmf.data.sources`: ImageFolder, CUB, digits and the synthetic part set, one interface;
- :mod:`~protonmf.data.batching`: decoded, preprocessed batches with the files that were skipped;
- :mod:`~protonmf.data.extract`: the black box's features of whole classes into the store;
- :mod:`~protonmf.data.store`: the Zarr feature store.
"""

from protonmf.data.batching import iter_batches, load_images
from protonmf.data.decode import ALPHA_BACKGROUND, READ_RETRY, ImageReadError, ReadRetry, decode_image, load_image, to_rgb
from protonmf.data.preprocess import IMAGENET_MEAN, IMAGENET_STD, Preprocess
from protonmf.data.records import Batch, Record, Skipped
from protonmf.data.sources import SOURCE_KINDS, CUBSource, DigitsSource, ImageFolderSource, ImageSource, make_source
from protonmf.data.sources.imagefolder import IMAGE_EXTENSIONS
from protonmf.data.sources.in_memory import SyntheticSource
from protonmf.data.sources.relabel import relabel_by_name
from protonmf.data.store import FeatureStore, StoreError

__all__ = [
    "ALPHA_BACKGROUND", "IMAGENET_MEAN", "READ_RETRY", "ImageReadError", "ReadRetry", "IMAGENET_STD", "IMAGE_EXTENSIONS", "SOURCE_KINDS", "Batch", "CUBSource",
    "DigitsSource", "FeatureStore", "ImageFolderSource", "ImageSource", "Preprocess", "Record", "Skipped", "StoreError", "SyntheticSource",
    "decode_image", "iter_batches", "load_image", "load_images", "make_source", "relabel_by_name", "to_rgb",
]
