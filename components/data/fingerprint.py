"""What a split holds, named by its bytes: the one identity that caches, resume, `continue`, `data diff`
and the MLflow dataset digest compare (a path says where data is, never what it is).

Each example's digest is the SHA-256 of its image as the source holds it (the pixels, or the encoded
JPEG/PNG bytes, whether in a file or in TFDS's records) followed by its label (int64, little-endian).
A role's fingerprint (train, valid, test) is the SHA-256 of a header (the pixels' shape and type, or
"encoded") and its examples' digests, in the order the run reads them. Byte-identical data in two
folders or on two machines gives the same fingerprint; one changed pixel, label or order another.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

import numpy as np

from cnnflow.components.data.core import Partition, Records

DIGEST_BYTES = 32  # SHA-256


@dataclass(frozen=True)
class Fingerprint:
    digest: str  # hex SHA-256 of the header and the examples' digests
    examples: np.ndarray  # (n, 32) uint8: each example's SHA-256, in the role's order


def of_partition(partition: Partition) -> Fingerprint:
    """The fingerprint of a partition's images and labels, in their order."""
    labels = np.asarray(partition.labels, dtype="<i8")
    images = partition.images
    if isinstance(images, Records):  # streamed from their files
        header: dict[str, Any] = {"encoded": True}
        digests = _digests(_streamed(images), labels)
    elif partition.encoded == "path":
        header = {"encoded": True}
        # one after the other: for small files a thread pool was 3x slower here (16,000 faces: 1.1 s, not 0.38 s)
        found = b"".join(_file_digest(path, label) for path, label in zip(images, labels))
        digests = np.frombuffer(found, dtype=np.uint8).reshape(-1, DIGEST_BYTES).copy()
    elif partition.encoded == "bytes":
        header = {"encoded": True}
        digests = _digests(iter(images), labels)
    else:
        pixels = np.ascontiguousarray(images)
        header = {"shape": list(pixels.shape[1:]), "dtype": pixels.dtype.str}
        digests = _digests((pixels[i].tobytes() for i in range(len(pixels))), labels)
    whole = hashlib.sha256(json.dumps(header, sort_keys=True).encode())
    whole.update(digests.tobytes())
    return Fingerprint(whole.hexdigest(), digests)


def _digests(encoded, labels: np.ndarray) -> np.ndarray:
    out = np.empty((len(labels), DIGEST_BYTES), dtype=np.uint8)
    for i, (item, label) in enumerate(zip(encoded, labels)):
        out[i] = np.frombuffer(hashlib.sha256(bytes(item) + label.tobytes()).digest(), dtype=np.uint8)
    return out


def file_hash(path) -> "hashlib._Hash":
    """The SHA-256 of a file's bytes, read a MiB at a time (callers may add more before the digest)."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while block := file.read(1 << 20):
            digest.update(block)
    return digest


def _file_digest(path: str, label: np.int64) -> bytes:
    digest = file_hash(path)
    digest.update(label.tobytes())
    return digest.digest()


def _streamed(records):
    """The selected encoded images of TFDS records, in file order, as bytes."""
    for batch in records.dataset().batch(1024).as_numpy_iterator():
        yield from batch

