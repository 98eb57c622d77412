"""Data sources (one module each, found by the registry) and the split/pipeline code they all share."""

from cnnflow.components.data.core import (  # noqa: F401
    CLASS_NAMES,
    DataError,
    checked_partitions,
    DataInfo,
    Partition,
    Split,
    cache_needs,
    class_counts,
    examples,
    fewer_images,
    make_dataset,
    make_split,
    model_input_shape,
    parse_split,
    read_in_full,
    source_from,
    steps_per_epoch,
    training_pool_size,
)
