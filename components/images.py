"""Reading images a user sends to a trained model (`cnnflow predict`, the served `serving` model):
untrusted files or bytes, checked before they are decoded, then preprocessed as the model's
evaluation images were."""

from __future__ import annotations

import io
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from cnnflow.components.errors import DataError

MAX_IMAGE_PIXELS = 50_000_000  # bigger is no photo a CNN here takes; refused from the header, never decoded
GRAY_SPREAD = 8  # channels this close are a gray picture: lossy WebP and JPEG store gray in colour, a little off


def readable_suffixes() -> tuple[str, ...]:
    """The file name endings of every format PIL reads here (PNG, JPEG, WebP, TIFF, BMP, GIF, ...): what a
    folder's scan takes is what a file named alone takes."""
    from PIL import Image

    Image.init()
    return tuple(sorted(ext for ext, kind in Image.registered_extensions().items()
                        if kind in Image.OPEN and kind not in _NOT_PICTURES))


# formats PIL names but reads only with tools it lacks (a stub, Ghostscript) or that hold no picture
_NOT_PICTURES = ("BUFR", "GRIB", "HDF5", "WMF", "EPS", "MPEG", "FITS")


def fitted(image, shape: tuple[int, int, int]):
    """uint8 pixels (a tensor, height x width x 1-4 channels) made `shape`: alpha dropped, gray made
    colour or colour gray, resized where the size differs. A folder's training images went through
    this in tf.data (components/data/pipeline.py), and what `predict` and the served model get of its
    model goes through it too: one function, the same pixels."""
    import tensorflow as tf

    image = tf.convert_to_tensor(image, tf.uint8)
    image = tf.cond(tf.shape(image)[-1] == 4, lambda: image[..., :3], lambda: image)
    image = tf.cond(tf.shape(image)[-1] == 2, lambda: image[..., :1], lambda: image)  # gray with alpha
    if shape[-1] == 1:
        image = tf.cond(tf.shape(image)[-1] == 3, lambda: tf.image.rgb_to_grayscale(image), lambda: image)
    else:
        image = tf.cond(tf.shape(image)[-1] == 1, lambda: tf.image.grayscale_to_rgb(image), lambda: image)
    image = tf.ensure_shape(image, (None, None, shape[-1]))
    same = tf.reduce_all(tf.shape(image)[:2] == shape[:2])
    image = tf.cond(same, lambda: image, lambda: tf.cast(tf.round(tf.clip_by_value(
        tf.image.resize(image, shape[:2], antialias=True), 0, 255)), tf.uint8))
    return tf.ensure_shape(image, shape)


def read_image(source: Path | bytes, shape: tuple[int, int, int], name: str | None = None,
               any_size: bool = False) -> np.ndarray:
    """The image (a file, or the bytes of one) as uint8 pixels, if it has the size and the channels
    the model was trained on. The size is read from the header first: an image of another size, or a
    decompression bomb, is refused without being decoded. `any_size` (a model trained on a folder of
    images of several sizes): any size and colour is taken and `fitted` as its training images were."""
    from PIL import Image, UnidentifiedImageError

    name = name or ("the image" if isinstance(source, bytes) else str(source))
    height, width, channels = shape
    wanted = f"{'grayscale' if channels == 1 else 'RGB'} {width}x{height} images"
    Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS
    try:
        with warnings.catch_warnings():  # PIL's warning of a big image: refused below, in one line, not printed
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as image:  # the header only
                if image.size != (width, height) and not any_size:
                    raise DataError(f"{name} is {image.size[0]}x{image.size[1]}; the model takes {wanted} "
                                    f"(as in its training data)")
                image.load()
                rgb, gray = _pixels(image, name)
    except DataError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise DataError(f"{name}: too large to decode safely (over {MAX_IMAGE_PIXELS:,} pixels); the model takes "
                        f"{wanted}") from None
    except (UnidentifiedImageError, OSError, ValueError) as error:
        why = "not an image file PIL can read: PNG, JPEG, ..." if isinstance(error, UnidentifiedImageError) else error
        raise DataError(f"{name}: not a readable image ({why})") from None
    if any_size:
        return fitted(gray[..., np.newaxis] if rgb is None else rgb, shape).numpy()
    if channels == 3 and rgb is None:
        raise DataError(f"{name} is grayscale; the model takes {wanted}")
    # A grayscale picture saved as RGB (three equal channels, or all but equal in a lossy format) is fine;
    # real colour is not.
    if channels == 1 and rgb is not None and np.ptp(rgb.astype(np.int16), axis=-1).max(initial=0) > GRAY_SPREAD:
        raise DataError(f"{name} is a colour image; the model takes {wanted}")
    return rgb if channels == 3 else gray[..., np.newaxis]


GRAY_16_BIT = ("I;16", "I;16B", "I;16L", "I;16N", "I")  # PNG, TIFF and PGM grayscale of 16 bits


def _pixels(image, name: str) -> tuple[np.ndarray | None, np.ndarray]:
    """(RGB pixels, or None for a grayscale mode; 8-bit grayscale), each converted as the format
    means it: 16-bit values scaled to 8 bits, not clipped at 255 as PIL's convert("L") does. What has
    no one meaning is refused: transparent pixels (over which background?) and floating-point pixels."""
    if image.mode in ("LA", "PA", "RGBA") or "transparency" in image.info:
        if (np.asarray(image.convert("RGBA"))[..., 3] < 255).any():
            raise DataError(f"{name} has transparent pixels; the model takes opaque images (flatten it onto its "
                            f"background first)")
    if image.mode == "F":
        raise DataError(f"{name} has floating-point pixels; the model takes 8- or 16-bit images")
    if image.mode in GRAY_16_BIT:
        values = np.asarray(image).astype(np.int64)
        if values.size and (values.min() < 0 or values.max() > 65535):
            raise DataError(f"{name} has pixel values from {values.min()} to {values.max()}; the model takes 8- or "
                            f"16-bit images")
        return None, ((values * 255 + 32767) // 65535).astype(np.uint8)
    rgb = None if image.mode in ("1", "L", "LA") else np.asarray(image.convert("RGB"))
    return rgb, np.asarray(image.convert("L"))


def preprocessed(images: list[np.ndarray], eval_transforms: Any):
    """A batch of images through the run's evaluation transforms (`data.transforms.eval`)."""
    import tensorflow as tf

    from cnnflow.components.augment import compose

    transform = compose(eval_transforms)
    return tf.stack([transform(tf.constant(image), tf.zeros(2, tf.int64)) for image in images])
