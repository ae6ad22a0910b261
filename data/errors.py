"""The errors data/ raises. Every one names the shard, key or row it is about."""


class ShardError(Exception):
    """Anything wrong with a shard, its metadata, or what is being written to it."""


class CorruptRecordError(ShardError):
    """A stored record that does not decode or whose checksum does not match."""

    def __init__(self, key: str, reason: str, path: str | None = None):
        self.key, self.reason, self.path = key, reason, path
        where = f"{path}: " if path else ""
        super().__init__(f"{where}record {key!r}: {reason}")

    def at(self, path: str) -> "CorruptRecordError":
        """The same error, naming the shard it came from."""
        return CorruptRecordError(self.key, self.reason, path)


class ShardMismatchError(ShardError):
    """A record or a shard whose feature dim, dtype or class set differ from the shard's."""


class ShardWriteError(ShardError):
    """The shard could not be written (a full disk, the file size limit, an I/O error): not the record's
    fault. Stop, and rerun the same command to resume from the last commit."""
