"""What users hand cnnflow, generated the way a fuzzer would (Hypothesis): each input is answered
correctly or refused in one line (a UserError), never a traceback, never silently altered."""

from __future__ import annotations

import functools
import io

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from cnnflow.components.errors import DataError
from cnnflow.components.images import read_image

HEIGHT, WIDTH = 5, 7
LOSSLESS = ("PNG", "TIFF", "BMP", "PPM")  # what they store is what they give back
FORMATS = LOSSLESS + ("GIF", "JPEG", "WEBP")
MODES = ("1", "L", "LA", "P", "RGB", "RGBA", "I;16", "I", "F", "CMYK")
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _image(mode: str, values: np.ndarray):
    """A PIL image of `mode` from random values of the right range for the mode."""
    from PIL import Image

    if mode == "1":
        return Image.fromarray(values[..., 0] > 127)
    if mode in ("L", "P"):
        return Image.fromarray(values[..., 0].astype(np.uint8), "L").convert(mode)
    if mode == "I;16":
        return Image.frombytes("I;16", (WIDTH, HEIGHT), (values[..., 0] * 257).astype("<u2").tobytes())
    if mode == "I":
        return Image.fromarray((values[..., 0] * 257).astype(np.int32), "I")
    if mode == "F":
        return Image.fromarray(values[..., 0].astype(np.float32) / 255, "F")
    if mode == "LA":
        return Image.fromarray(values[..., :2].astype(np.uint8), "LA")
    if mode == "RGBA":
        return Image.fromarray(values.astype(np.uint8), "RGBA")
    return Image.fromarray(values[..., :3].astype(np.uint8), "RGB").convert(mode)


def _saved(image, fmt: str) -> bytes:
    out = io.BytesIO()
    try:
        image.save(out, fmt)
    except (OSError, ValueError, KeyError):
        assume(False)  # a combination the format cannot hold: nothing a user could send
    return out.getvalue()


@FUZZ
@given(mode=st.sampled_from(MODES), fmt=st.sampled_from(FORMATS), channels=st.sampled_from([1, 3]),
       values=arrays(np.int64, (HEIGHT, WIDTH, 4), elements=st.integers(0, 255)), opaque=st.booleans())
def test_an_image_of_any_mode_and_format_is_read_as_it_means_or_refused_in_one_line(mode, fmt, channels, values,
                                                                                     opaque):
    from PIL import Image

    if opaque:
        values[..., 3] = 255
    if mode == "LA" and opaque:
        values[..., 1] = 255
    data = _saved(_image(mode, values), fmt)
    with Image.open(io.BytesIO(data)) as stored:  # what the file holds, as PIL reads it back
        stored_mode = stored.mode
        stored.load()
        stored_array = np.asarray(stored)
    try:
        pixels = read_image(data, (HEIGHT, WIDTH, channels), name="sent.img")
    except DataError as error:
        assert "\n" not in str(error) and str(error).startswith("sent.img")
        return
    assert pixels.dtype == np.uint8 and pixels.shape == (HEIGHT, WIDTH, channels)
    if fmt not in LOSSLESS:
        return  # lossy: the pixels are the decoder's; the shape and type are what is checked
    if stored_mode in ("I;16", "I"):  # 16-bit grayscale: scaled to 8 bits, never clipped at 255
        assert np.array_equal(pixels[..., 0], ((stored_array.astype(np.int64) * 255 + 32767) // 65535))
        assert np.array_equal(pixels[..., 0], values[..., 0])  # 257 * v scales back to v exactly
    elif stored_mode in ("L", "1"):
        assert np.array_equal(pixels[..., 0], stored_array.astype(np.uint8) * (255 if stored_mode == "1" else 1))
    elif stored_mode == "RGB" and channels == 3:
        assert np.array_equal(pixels, stored_array)
    assert stored_mode not in ("F",) and not (stored_mode in ("LA", "RGBA") and (stored_array[..., -1] < 255).any())


def test_a_16_bit_grayscale_png_is_scaled_not_clipped():
    """The regression the fuzzing found: PIL's convert("L") clips 16-bit values at 255, so a 16-bit
    scan reached the model almost white."""
    from PIL import Image

    ramp = np.linspace(0, 65535, HEIGHT * WIDTH).astype("<u2").reshape(HEIGHT, WIDTH)
    data = _saved(Image.frombytes("I;16", (WIDTH, HEIGHT), ramp.tobytes()), "PNG")
    pixels = read_image(data, (HEIGHT, WIDTH, 1))[..., 0]
    assert pixels.min() == 0 and pixels.max() == 255 and len(np.unique(pixels)) == HEIGHT * WIDTH


@pytest.mark.parametrize("mode", ["LA", "RGBA"])
def test_transparent_pixels_are_refused_and_opaque_ones_read(mode):
    from PIL import Image

    bands = len(mode)
    pixels = np.full((HEIGHT, WIDTH, bands), 200, np.uint8)
    pixels[..., -1] = 255  # opaque
    assert read_image(_saved(Image.fromarray(pixels, mode), "PNG"), (HEIGHT, WIDTH, 1)).max() == 200
    pixels[0, 0, -1] = 0
    with pytest.raises(DataError, match="has transparent pixels"):
        read_image(_saved(Image.fromarray(pixels, mode), "PNG"), (HEIGHT, WIDTH, 1))


SPLIT_TEXT = st.one_of(
    st.text(max_size=30),  # anything at all
    st.builds(lambda name, a, b: f"{name}[{a}:{b}]", st.sampled_from(["train", "test", "valid", "tr ain", "x-y"]),
              st.sampled_from(["", "0", "-3", "5", "50%", "-10%", "150%", "99999999999999999999", "1.5", "%"]),
              st.sampled_from(["", "0", "-3", "5", "50%", "-10%", "150%", "99999999999999999999", "1.5", "a"])))


@FUZZ
@given(split=SPLIT_TEXT, size=st.integers(0, 300))
def test_a_split_string_selects_a_slice_of_the_partition_or_is_refused_in_one_line(split, size):
    from cnnflow.components.data.core import parse_split, split_positions

    try:
        name, bounds = parse_split(split)
    except DataError as error:
        assert "\n" not in str(error) and repr(split) in str(error)
        return
    positions = split_positions(split, size)
    assert name and positions.dtype.kind == "i"
    assert list(positions) == list(range(size))[slice(*(_resolved(b, size) for b in (bounds.start, bounds.stop)))]


def _resolved(bound: str | None, size: int) -> int | None:  # TFDS's meaning: a percent of the partition
    return None if bound is None else round(int(bound[:-1]) * size / 100) if bound.endswith("%") else int(bound)


SETTING_VALUES = st.one_of(st.text(max_size=20), st.integers(-10**12, 10**12).map(str),
                           st.floats(allow_nan=True, allow_infinity=True).map(repr),
                           st.sampled_from(["null", "[]", "{}", "[1,2]", "{a: 1}", "true", "'quoted'", "${oops}", "1e999"]))


@functools.cache
def _every_key() -> list[str]:
    """Every key the settings of the two recipes accept: the schema's and each component's arguments."""
    from cnnflow.flows.setup.config import compose_config
    from cnnflow.flows.setup.settings import known_keys

    return sorted({key for recipe in ("mnist", "celeba") for key in known_keys(compose_config(recipe, []))})


@settings(max_examples=100, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])  # capsys: read each time
@given(key=st.deferred(lambda: st.sampled_from(_every_key())), value=SETTING_VALUES)
@example(key="search", value="0")  # found by this test: `search` was missing from the list of groups
@example(key="plots", value="0")  # found by this test: Hydra's ValueError for a group given a number
@example(key="plots", value="[1,2]")  # found by this test in CI: Hydra's TypeError for a list of numbers
@example(key="plots", value="{}")  # merged away unseen: every figure stayed on
@example(key="data.batch_size", value="\x85")  # found by this test: NEL broke the one line in two
def test_any_value_of_a_setting_is_taken_or_refused_in_one_line(key, value, capsys):
    """`cnnflow train --cfg job KEY=VALUE`: the composed, checked settings, or exit 2 with one line."""
    from cnnflow.flows import cli

    code = cli.main(["train", "--cfg", "job", "experiment=mnist", f"{key}={value}"])
    out, err = capsys.readouterr()
    assert code in (0, 2), (code, err)
    if code == 2:
        lines = [line for line in err.splitlines() if line.strip()]
        assert len(lines) <= 2 and lines[0].startswith("cnnflow: error:") and "Traceback" not in err, err
    else:
        assert "Traceback" not in err and out.strip()


@functools.cache
def _classifier():
    import keras

    from cnnflow.components.serving import ImageClassifier

    classifier = ImageClassifier()
    classifier.settings = {"image_shape": [HEIGHT, WIDTH, 1], "class_names": ["a", "b", "c"],
                           "eval_transforms": [{"name": "rescale"}], "from_logits": False, "one_logit": False}
    classifier.model = keras.Sequential([keras.Input((HEIGHT, WIDTH, 1)), keras.layers.Flatten(),
                                         keras.layers.Dense(3, activation="softmax")])
    return classifier


def _png(values: np.ndarray) -> str:
    import base64

    from PIL import Image

    return base64.b64encode(_saved(Image.fromarray(values.astype(np.uint8), "L"), "PNG")).decode()


REQUEST_ROWS = st.one_of(
    st.none(), st.integers(), st.floats(), st.binary(max_size=40), st.text(max_size=40),
    st.binary(max_size=200).map(lambda raw: __import__("base64").b64encode(raw).decode()),  # base64 of junk
    arrays(np.uint8, (HEIGHT, WIDTH)).map(_png),  # a good image
    arrays(np.uint8, (WIDTH, HEIGHT)).map(_png))  # the wrong size


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rows=st.lists(REQUEST_ROWS, min_size=1, max_size=6))
def test_a_served_request_answers_each_row_or_says_what_is_wrong_with_it(rows):
    """Whatever a request's `image` column holds, each row gets a label or one line of error, and one
    bad row never fails the others."""
    import pandas as pd

    answer = _classifier().predict(None, pd.DataFrame({"image": pd.Series(rows, dtype=object)}))
    assert len(answer) == len(rows) and list(answer.columns) == ["label", "probability", "error"]
    for number, (row, label, error) in enumerate(zip(rows, answer["label"], answer["error"])):
        assert (label is None) != (error is None)
        if error is not None:
            assert error.startswith(f"image {number}") and "\n" not in error
        else:
            assert label in ("a", "b", "c")
        if isinstance(row, str) and row.startswith("iVBOR") and "valid base64" not in (error or ""):
            assert (label is not None) == (_decoded_size(row) == (WIDTH, HEIGHT))  # a PNG: answered iff it fits


def _decoded_size(text: str) -> tuple[int, int]:
    import base64

    from PIL import Image

    return Image.open(io.BytesIO(base64.b64decode(text))).size



ENTRIES = st.sampled_from(["good.png", "broken.png", "loop.png", "empty.png", "folder.png", "notes.txt", "fifo.png"])


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(entries=st.lists(ENTRIES, max_size=5, unique=True), name_it=st.booleans())
def test_a_folder_of_anything_gives_its_image_files_or_one_line(entries, name_it, tmp_path_factory):
    """`cnnflow predict RUN FOLDER` (or the files named one by one): links that lead nowhere, loops,
    empty files, folders and FIFOs named like images, other files: the images, or one line."""
    import os

    from cnnflow.flows.inference import image_files

    folder = tmp_path_factory.mktemp("sent")
    for entry in entries:
        path = folder / entry
        {"good.png": lambda: path.write_bytes(_saved(__import__("PIL.Image").Image.new("L", (WIDTH, HEIGHT)), "PNG")),
         "broken.png": lambda: path.symlink_to(folder / "deleted.png"),
         "loop.png": lambda: path.symlink_to(path),
         "empty.png": lambda: path.write_bytes(b""),
         "folder.png": lambda: path.mkdir(),
         "notes.txt": lambda: path.write_text("not an image"),
         "fifo.png": lambda: os.mkfifo(path)}[entry]()
    asked = [str(folder)] if name_it else [str(folder / entry) for entry in entries] or [str(folder)]
    # named one by one, any regular file is taken (reading it refuses what is no image); in a folder, images by name
    bad = {"broken.png", "loop.png", "fifo.png"} | ({"folder.png"} if name_it else set())
    expected = set(entries) & ({"good.png", "empty.png"} | (set() if name_it else {"notes.txt"}))
    try:
        files = image_files(asked)
    except DataError as error:
        assert "\n" not in str(error) and (set(entries) & bad or not expected), str(error)
        return
    assert not set(entries) & bad and {f.name for f in files} == expected
