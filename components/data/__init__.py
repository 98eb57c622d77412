"""Data sources (one module each) and the split/pipeline code they all share."""

from cnnflow.components.data import digits, idx, tfds_source  # noqa: F401  (register the sources)
from cnnflow.components.data.core import (  # noqa: F401
    CLASS_NAMES,
    DataError,
    DataInfo,
    Partition,
    Split,
    examples,
    make_dataset,
    make_split,
    parse_split,
    source_from,
)
