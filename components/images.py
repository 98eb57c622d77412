"""Reading images a user sends to a trained model (`cnnflow predict`, the served `serving` model):
untrusted files or bytes, checked before they are decoded, then preprocessed as the model's
evaluation images were."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np

from cnnflow.components.errors import DataError

MAX_IMAGE_PIXELS = 50_000_000  # bigger is no photo a CNN here takes; refused from the header, never decoded


def read_image(source: Path | bytes, shape: tuple[int, int, int], name: str | None = None) -> np.ndarray:
    """The image (a file, or the bytes of one) as uint8 pixels, if it has the size and the channels
    the model was trained on. The size is read from the header first: an image of another size, or a
    decompression bomb, is refused without being decoded."""
    from PIL import Image, UnidentifiedImageError

    name = name or str(source)
    height, width, channels = shape
    wanted = f"{'grayscale' if channels == 1 else 'RGB'} {width}x{height} images"
    Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS
    try:
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as image:  # the header only
            if image.size != (width, height):
                raise DataError(f"{name} is {image.size[0]}x{image.size[1]}; the model takes {wanted} "
                                f"(as in its training data)")
            image.load()
            gray_mode = image.mode in ("1", "L", "I", "I;16", "F")
            rgb = None if gray_mode else np.asarray(image.convert("RGB"))
            gray = np.asarray(image.convert("L"))
    except DataError:
        raise
    except Image.DecompressionBombError:
        raise DataError(f"{name}: too large to decode safely (over {MAX_IMAGE_PIXELS:,} pixels); the model takes "
                        f"{wanted}") from None
    except (UnidentifiedImageError, OSError, ValueError) as error:
        why = "not an image file PIL can read: PNG, JPEG, ..." if isinstance(error, UnidentifiedImageError) else error
        raise DataError(f"{name}: not a readable image ({why})") from None
    if channels == 3 and rgb is None:
        raise DataError(f"{name} is grayscale; the model takes {wanted}")
    # A grayscale picture saved as RGB (three equal channels) is fine; real colour is not.
    if channels == 1 and rgb is not None and not (np.array_equal(rgb[..., 0], rgb[..., 1])
                                                  and np.array_equal(rgb[..., 1], rgb[..., 2])):
        raise DataError(f"{name} is a colour image; the model takes {wanted}")
    return rgb if channels == 3 else gray[..., np.newaxis]


def preprocessed(images: list[np.ndarray], eval_transforms: Any):
    """A batch of images through the run's evaluation transforms (`data.transforms.eval`)."""
    import tensorflow as tf

    from cnnflow.components.augment import compose

    transform = compose(eval_transforms)
    return tf.stack([transform(tf.constant(image), tf.zeros(2, tf.int64)) for image in images])
