"""regionbert.data: the region-feature shard format (docs/shard-format.md), its writer and readers.

    from regionbert.data import ShardWriter, ShardReader, ShardSet
"""

from .errors import CorruptRecordError, ShardError, ShardMismatchError, ShardWriteError
from .format import Record, location_vectors
from .index import build_index, content_hash, load_index, verify_shard
from .reader import ShardReader, ShardSet
from .writer import ShardWriter

__all__ = [
    "CorruptRecordError", "Record", "ShardError", "ShardMismatchError", "ShardReader", "ShardSet",
    "ShardWriteError", "ShardWriter", "build_index", "content_hash", "load_index", "location_vectors", "verify_shard",
]
