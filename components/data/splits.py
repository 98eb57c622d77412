"""Which examples train, validate and test: TFDS-style split strings (`train`, `test[:8000]`,
`train[10%:]`) and sizes, the same for every source, carved with a fixed seed, and what each role
held when a run recorded it (its fingerprint), so a run is never continued on other data.

    train_split: train     valid_split: null (carve valid_size from the shuffled train pool)
    train_size: 50000      valid_size: 10000     shuffle_buffer: 10000     test_split: test
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from cnnflow.components.data import fingerprint
from cnnflow.components.data.core import Partition, parse_split, partition_of, source_from, split_positions
from cnnflow.components.errors import DataError


@dataclass(frozen=True)
class Split:
    """Which examples of which partition each of train/valid/test uses, and, once a run has recorded
    them, what they held (fingerprint.py): each role's fingerprint and each example's digest."""

    partitions: dict[str, str]  # role -> partition name
    indices: dict[str, np.ndarray]  # role -> positions in that partition
    fingerprints: dict[str, str] = field(default_factory=dict)  # role -> hex SHA-256 of its examples and labels
    digests: dict[str, np.ndarray] = field(default_factory=dict)  # role -> (n, 32) uint8, one SHA-256 per example

    def sizes(self) -> dict[str, int]:
        return {role: len(positions) for role, positions in self.indices.items()}

    def save(self, path: str | Path) -> str:
        np.savez(path, **{f"{role}_indices": pos for role, pos in self.indices.items()},
                 **{f"{role}_partition": np.array(name) for role, name in self.partitions.items()},
                 **{f"{role}_fingerprint": np.array(value) for role, value in self.fingerprints.items()},
                 **{f"{role}_digests": value for role, value in self.digests.items()})
        return str(path)

    @classmethod
    def load(cls, path: str | Path) -> Split:
        with np.load(path) as saved:
            roles = [key.removesuffix("_indices") for key in saved.files if key.endswith("_indices")]
            recorded = [r for r in roles if f"{r}_fingerprint" in saved.files]  # splits saved before 0.2 have none
            return cls({r: str(saved[f"{r}_partition"]) for r in roles}, {r: saved[f"{r}_indices"] for r in roles},
                       {r: str(saved[f"{r}_fingerprint"]) for r in recorded},
                       {r: saved[f"{r}_digests"] for r in recorded})


def shuffled(positions: np.ndarray, buffer_size: int, seed: int) -> np.ndarray:
    """The order the chapter's `tf.random.set_seed(seed)` then `shuffle(buffer_size,
    reshuffle_each_iteration=False)` gives, so the same seed carves the book's validation images.

    Like the chapter, no op seed is passed: tf.data draws it from the global seed, and setting that
    seed first makes the draw the same whatever ran before in the process. A buffer smaller than the
    data shuffles only locally, exactly like the chapter's pipeline. The order depends only on the
    seeds, the buffer and the count, never on the images, so shuffling positions gives it.
    """
    if buffer_size <= 1 or len(positions) <= 1:
        return positions
    import tensorflow as tf

    tf.random.set_seed(seed)
    order = tf.data.Dataset.range(len(positions)).shuffle(buffer_size, reshuffle_each_iteration=False)
    return positions[next(iter(order.batch(len(positions)))).numpy()]


def _size(data: dict[str, Any], key: str) -> int | None:
    """A subset size: a count, or null / "full" for everything."""
    value = data.get(key)
    if value is None or value == "full":
        return None
    if not isinstance(value, int) or value < 0:
        raise DataError(f"data.{key}={value!r}; use a count of examples, or null / full for all of them")
    return value


def training_pool_size(data: dict[str, Any]) -> int:
    """How many examples a training subset can draw from: the train split, less the validation
    examples carved from it (when there is no valid_split)."""
    pool_name, _ = parse_split(data["train_split"])
    pool = len(split_positions(data["train_split"], len(partition_of(data, pool_name).labels)))
    return pool if data.get("valid_split") else pool - (_size(data, "valid_size") or 0)


def make_split(data: dict[str, Any], seed: int) -> Split:
    """Train, validation and test positions as `data` configures them; same settings, same split."""
    pool_name, _ = parse_split(data["train_split"])
    pool = shuffled(split_positions(data["train_split"], len(partition_of(data, pool_name).labels)),
                    data.get("shuffle_buffer") or 0, seed)
    valid_size, train_size = _size(data, "valid_size"), _size(data, "train_size")
    if data.get("valid_split"):
        valid_name, _ = parse_split(data["valid_split"])
        valid = split_positions(data["valid_split"], len(partition_of(data, valid_name).labels))[:valid_size]
        train = pool[:train_size]
    else:
        valid_name, valid_size = pool_name, valid_size or 0
        if valid_size >= len(pool):
            raise DataError(f"data.valid_size={valid_size} leaves no training examples: "
                            f"{data['train_split']!r} has only {len(pool)}")
        valid = pool[:valid_size]
        train = pool[valid_size:][:train_size]
    test_name, _ = parse_split(data["test_split"])
    test = split_positions(data["test_split"], len(partition_of(data, test_name).labels))
    wanted = {"train": (train, train_size), "valid": (valid, valid_size)}
    for role, (positions, size) in wanted.items():
        if size is not None and len(positions) < size:
            raise DataError(f"data.{role}_size={size} but only {len(positions)} examples are available "
                            f"for {role}; lower data.{role}_size or widen the split")
    return Split({"train": pool_name, "valid": valid_name, "test": test_name},
                 {"train": train, "valid": valid, "test": test})


def changes(before: Split, after: Split, role: str) -> dict[str, int]:
    """How `role` differs between two recorded splits, example by example, each named by its place
    (partition, position): added, removed, changed (the same place, other bytes) and kept."""
    def placed(split: Split) -> dict[tuple[str, int], bytes]:
        if role not in split.digests:
            raise DataError(f"a split of role {role!r} without recorded examples (cnnflow before 0.2 did not record "
                            f"them): train the run again to compare it")
        partition = split.partitions[role]
        return {(partition, int(position)): digest.tobytes()
                for position, digest in zip(split.indices[role], split.digests[role])}

    old, new = placed(before), placed(after)
    common = old.keys() & new.keys()
    changed = sum(1 for place in common if old[place] != new[place])
    return {"added": len(new.keys() - old.keys()), "removed": len(old.keys() - new.keys()), "changed": changed,
            "kept": len(common) - changed}


def class_counts(data: dict[str, Any], split: Split, class_names: tuple[str, ...]) -> dict[str, dict[str, int]]:
    """role -> class name -> number of examples."""
    counts = {}
    for role in split.indices:
        labels = examples(data, split, role).labels
        counts[role] = {name: int(n) for name, n in zip(class_names, np.bincount(labels, minlength=len(class_names)))}
    return counts


def examples(data: dict[str, Any], split: Split, role: str) -> Partition:
    """The images and labels of one role (train, valid or test) of a split."""
    return partition_of(data, split.partitions[role]).take(split.indices[role])


_fingerprints: dict[tuple, fingerprint.Fingerprint] = {}  # once per process for the same examples


def fingerprint_of(data: dict[str, Any], split: Split, role: str) -> fingerprint.Fingerprint:
    """What one role of a split holds now, as read from the source (fingerprint.py)."""
    key = (source_from(data), split.partitions[role],
           hashlib.sha256(np.ascontiguousarray(split.indices[role], dtype=np.int64).tobytes()).hexdigest())
    if key not in _fingerprints:
        if len(_fingerprints) >= 32:  # a long-lived worker: keep the newest
            _fingerprints.pop(next(iter(_fingerprints)))
        _fingerprints[key] = fingerprint.of_partition(examples(data, split, role))
    return _fingerprints[key]


def fingerprinted(data: dict[str, Any], split: Split) -> Split:
    """`split` with what each of its roles holds now recorded in it."""
    found = {role: fingerprint_of(data, split, role) for role in split.indices}
    return replace(split, fingerprints={role: f.digest for role, f in found.items()},
                   digests={role: f.examples for role, f in found.items()})


def check_same_data(data: dict[str, Any], split: Split, run_id: str, roles: tuple[str, ...] | None = None) -> None:
    """Refuses, in one line naming both fingerprints, to go on training, or to evaluate, a run on data
    other than what it recorded (a file overwritten, another folder that holds something else); only
    `roles` when given."""
    for role, recorded in split.fingerprints.items():
        if roles is not None and role not in roles:
            continue
        now = fingerprint_of(data, split, role).digest
        if now != recorded:
            where = data.get("path") or data.get("data_dir") or data.get("manual_dir") or data["source"]
            raise DataError(f"run {run_id} used other data: its {role} examples had fingerprint {recorded[:16]}, "
                            f"{where} now gives {now[:16]}; point data.path at the data it used, or start a new run "
                            f"on this data (cnnflow train ... resume=false)")
