"""TensorFlow Datasets: downloads for users with internet, reads a prepared `data_dir`, and takes the
original files from `manual_dir` for users who fetched them by hand."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cnnflow.components.argtypes import PositiveInt
from cnnflow.components.data.core import DataError, DataInfo, Partition, Records, attribute_classes, two_sides
from cnnflow.components.errors import SettingsError, TransientError, first_line, is_transient
from cnnflow.components.registry import register


class TfdsSource:
    def __init__(self, name: str, data_dir: str | None, manual_dir: str | None, attribute: str | None = None,
                 image_size: list[int] | None = None):
        import tensorflow_datasets as tfds

        try:
            self.builder = tfds.builder(name, data_dir=data_dir)
        except tfds.core.registered.DatasetNotFoundError:
            raise DataError(f"TFDS has no dataset {name!r}; check data.name (e.g. mnist, fashion_mnist)") from None
        if not _is_prepared(self.builder) and not _online():
            missing = _missing_files(self.builder, manual_dir)
            if not manual_dir:
                raise DataError(f"TFDS needs internet to download {name!r} and this machine has none; " + _local_hint(name))
            if missing:  # TFDS would retry the download of each for minutes, and leave parts of them behind
                raise DataError(f"data.manual_dir={manual_dir} lacks {', '.join(missing)} for TFDS {name!r}, and this "
                                f"machine has no internet to download them; put the original files there, or "
                                + _local_hint(name))
        try:
            with _preparing(self.builder):
                if _is_prepared(self.builder):  # by another process while this one waited: read what it wrote
                    self.builder = tfds.builder(name, data_dir=data_dir)
                self.builder.download_and_prepare(
                    download_config=tfds.download.DownloadConfig(manual_dir=manual_dir, try_download_gcs=False)
                )
        except Exception as error:  # TFDS raises many types for a failed download
            if is_transient(error):  # the load-data task retries it (5 s, then 30 s)
                raise TransientError(f"TFDS could not download {name!r}, maybe for a moment ({type(error).__name__}: "
                                     f"{first_line(error)}); if it persists, " + _local_hint(name)) from error
            raise DataError(
                f"TFDS could not download or prepare {name!r} ({type(error).__name__}: {first_line(error)}); "
                + _local_hint(name)
            ) from error
        features = self.builder.info.features
        self.attribute, self.fit_to = attribute, None
        if attribute:  # datasets labelled by binary attributes, like celeb_a
            known = list(features["attributes"].keys()) if "attributes" in features else []
            if attribute not in known:
                raise DataError(f"TFDS {name!r} has no attribute {attribute!r}; it has: {', '.join(known) or 'none'}")
            self.info = DataInfo(tuple(features["image"].shape), 2, attribute_classes(attribute))
        else:
            image_key, label_key = self.builder.info.supervised_keys or ("image", "label")
            shape, self.keys = tuple(features[image_key].shape), (image_key, label_key)
            if None in shape and not image_size:
                raise SettingsError(f"TFDS {name!r} holds images of several sizes ({shape}); set "
                                    f"data.options.image_size=[height, width] to train on them resized, like [128, 128]")
            self.fit_to = (*image_size, shape[-1] or 3) if image_size else None
            self.info = DataInfo(self.fit_to or shape, features[label_key].num_classes, tuple(features[label_key].names),
                                 any_size=self.fit_to is not None)

    def partition(self, name: str) -> Partition:
        """Small images (MNIST) as pixel arrays in memory; large ones (CelebA) stay in TFDS's files,
        streamed by tf.data (`Records`): only the labels are read now."""
        import tensorflow_datasets as tfds

        def examples(**how):
            try:
                return self.builder.as_dataset(split=name, shuffle_files=False, **how)
            except (KeyError, ValueError) as error:
                raise DataError(f"TFDS {self.builder.name!r} has partitions {sorted(self.builder.info.splits)}, "
                                f"not {name!r} ({first_line(error)})") from None

        if not self.attribute and not self.fit_to:
            images, labels = self._arrays(examples(as_supervised=True))
            return Partition(images, labels.astype(np.int64))
        image_key = "image" if self.attribute else self.keys[0]
        label = (lambda ex: ex["attributes"][self.attribute]) if self.attribute else (lambda ex: ex[self.keys[1]])
        encoded = {image_key: tfds.decode.SkipDecoding()}
        _, labels = self._arrays(examples(decoders=encoded).map(lambda ex: (0, label(ex))))
        records = Records(lambda: examples(decoders=encoded).map(lambda ex: ex[image_key]), np.arange(len(labels)))
        return Partition(records, labels.astype(np.int64), encoded="bytes", fit_to=self.fit_to)

    def _arrays(self, dataset) -> tuple[np.ndarray, np.ndarray]:
        import tensorflow_datasets as tfds

        batches = list(tfds.as_numpy(dataset.batch(4096)))
        if not batches:
            raise DataError(f"TFDS {self.builder.name!r}: the partition is empty")
        return np.concatenate([batch[0] for batch in batches]), np.concatenate([batch[1] for batch in batches])


def _local_hint(name: str) -> str:
    """Where the same data can come from without a download: the source that reads this dataset's
    original files, TFDS's manual_dir, or a prepared data_dir."""
    if name == "celeb_a":
        files = ("data.source=celeba_folder data.path=<folder with img_align_celeba/, list_attr_celeba.txt "
                 "and list_eval_partition.txt>")
    else:
        files = "data.source=idx data.path=<folder with the original *-ubyte.gz files>"
    return (f"point cnnflow at local files: {files}, or data.manual_dir=<that folder> to let TFDS use them, "
            "or data.data_dir=<an already prepared TFDS data_dir>.")


def _missing_files(builder, manual_dir: str | None) -> list[str]:
    """The original files TFDS would download for `builder` that `manual_dir` does not hold."""
    infos = getattr(builder, "url_infos", None) or {}
    names = sorted({info.filename or url.rsplit("/", 1)[-1] for url, info in infos.items()})
    return [name for name in names if not manual_dir or not (Path(manual_dir).expanduser() / name).is_file()]


def _preparing(builder):
    """One preparer of a dataset at a time, across processes: a second waits, then finds it prepared
    (TFDS writes into a temporary folder and renames it when complete, so a crash leaves no half)."""
    from filelock import FileLock

    lock = Path(str(builder.data_path)).parent / f".{Path(str(builder.data_path)).name}.cnnflow.lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    return FileLock(lock)


def _is_prepared(builder) -> bool:
    import tensorflow as tf

    return tf.io.gfile.exists(str(builder.data_path / "dataset_info.json"))


def _online(host: str = "storage.googleapis.com") -> bool:
    """Whether the TFDS download host resolves: fails in milliseconds where TFDS would retry for minutes."""
    import socket

    try:
        socket.getaddrinfo(host, 443)
        return True
    except OSError:
        return False


@register("dataset", "tfds")
def tfds_dataset(name: str, path=None, data_dir: str | None = None, manual_dir: str | None = None,
                 attribute: str | None = None, image_size: list[PositiveInt] | None = None) -> TfdsSource:
    """The TFDS dataset `name` (mnist, fashion_mnist, cifar10, celeb_a with attribute=Male, ...); one
    of images of several sizes (tf_flowers) trains on them resized to `image_size`."""
    return TfdsSource(name, data_dir, manual_dir, attribute, two_sides(image_size))
