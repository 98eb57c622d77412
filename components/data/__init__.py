"""Data sources (one module each, found by the registry) and what they all share: core.py (features,
partitions, sources), splits.py (which examples train, validate and test) and pipeline.py (tf.data)."""

from cnnflow.components.data.core import (  # noqa: F401
    CLASS_NAMES,
    DataError,
    DataInfo,
    Partition,
    checked_partitions,
    fewer_images,
    parse_split,
    read_ahead,
    read_in_full,
    source_from,
)
from cnnflow.components.data.pipeline import (  # noqa: F401
    cache_needs,
    make_dataset,
    model_input_shape,
    steps_per_epoch,
)
from cnnflow.components.data.splits import (  # noqa: F401
    Split,
    changes,
    check_same_data,
    class_counts,
    examples,
    fingerprint_of,
    fingerprinted,
    make_split,
    training_pool_size,
)
