"""Reading an index file (spec section 4) and keeping its entries inside the index's folder.

An index is a small JSON file that often travels apart from whoever wrote it. Its shard paths are
relative to its folder; an entry that is absolute, climbs out with `..`, or resolves through a symlink
to a place outside that folder is refused unless the caller allows it (`allow_outside=True`,
`--allow-outside`): whoever hands out an index should not be able to point readers anywhere on disk.
Each entry carries the shard's record count and content hash, which readers compare at open with what
the shard itself stores (handles.py, reader.ShardSet).

Containment covers the shard's files too: a folder inside whose data.mdb or lock.mdb is a link elsewhere
is refused by every reader, index or not (handles.py opens them with O_NOFOLLOW). One shard may not be
listed twice, under two names that reach the same folder (a name and a symlink to it inside the index's
folder): entries are told apart by the folder's identity (device and inode), so its records are not read
twice. An index that lists no shards is refused: regionbert never writes one, and `verify` of it would
otherwise check nothing and say nothing.
"""

from __future__ import annotations

import json
import os

from .errors import ShardError

INDEX_FORMAT = "regionbert-index"
INDEX_VERSION = 1
HASH_PREFIX = "xxh3_128:"


def outside_reason(base: str, rel: str) -> str | None:
    """Why the path `rel`, taken relative to the folder `base`, is not inside it; None if it is."""
    if "\0" in rel:
        return "contains a NUL character"
    if os.path.isabs(rel):
        return "is absolute"
    norm = os.path.normpath(rel)
    if norm == ".." or norm.startswith(".." + os.sep):
        return "climbs out of the index's folder with '..'"
    real_base = os.path.realpath(base)
    real = os.path.realpath(os.path.join(base, rel))
    if os.path.commonpath([real_base, real]) != real_base:
        return f"resolves through a symlink to {real}, outside the index's folder"
    return None


def check_inside(base: str, rel: str, what: str, allow_outside: bool) -> None:
    """ShardError unless `rel` stays inside `base` (or allow_outside)."""
    if allow_outside:
        return
    reason = outside_reason(base, rel)
    if reason:
        raise ShardError(f"{what}: shard path {rel!r} {reason}; an index may only name shards inside its own "
                         f"folder ({base}); pass --allow-outside (allow_outside=True) if you trust it")


def load_index(path: str, allow_outside: bool = False) -> dict:
    """Read and check an index; shard paths come back absolute. Every entry must name a shard inside the
    index's folder (unless allow_outside) and carry its record count and content hash."""
    try:
        with open(path, "rb") as f:
            index = json.loads(f.read().decode("utf-8"))
    except (OSError, ValueError, RecursionError) as e:
        raise ShardError(f"{path}: cannot read index: {str(e)[:200]}") from None
    if not isinstance(index, dict) or index.get("format") != INDEX_FORMAT:
        raise ShardError(f"{path}: not a {INDEX_FORMAT} file")
    if index.get("version") != INDEX_VERSION:
        raise ShardError(f"{path}: index version {index.get('version')!r}, this regionbert reads {INDEX_VERSION}")
    base = os.path.dirname(os.path.abspath(path))
    shards = index.get("shards")
    if not isinstance(shards, list):
        raise ShardError(f"{path}: index has no list of shards")
    if not shards:
        raise ShardError(f"{path}: index lists no shards; nothing to read or verify (rebuild it with "
                         "`regionbert-shards index`)")
    seen = {}
    for i, s in enumerate(shards):
        count = s.get("count") if isinstance(s, dict) else None
        if not (isinstance(s, dict) and isinstance(s.get("path"), str) and s["path"]
                and isinstance(count, int) and not isinstance(count, bool) and count >= 0):
            raise ShardError(f"{path}: shard entry {i} needs a non-empty string 'path' and a non-negative "
                             "integer 'count'")
        digest = s.get("content_hash")
        if not (isinstance(digest, str) and digest.startswith(HASH_PREFIX)):
            raise ShardError(f"{path}: shard entry {i} ({s['path']!r}) has no content_hash "
                             f"('{HASH_PREFIX}...'); rebuild the index with `regionbert-shards index`")
        check_inside(base, s["path"], f"{path}: shard entry {i}", allow_outside)
        s["path"] = os.path.normpath(os.path.join(base, s["path"]))
        ident = shard_identity(s["path"])
        if ident in seen:
            j = seen[ident]
            raise ShardError(f"{path}: shard entries {j} ({shards[j]['path']}) and {i} ({s['path']}) name the same "
                             "shard; each shard may be listed once (its records would be read twice)")
        seen[ident] = i
    return index


def shard_identity(folder: str) -> tuple:
    """What tells two shard folders apart however they are reached: device and inode (a symlink, a second
    name), or the normalised path of one that cannot be looked at (the reader then says what is wrong)."""
    try:
        st = os.stat(folder)
    except OSError:
        return ("path", os.path.normpath(os.path.abspath(folder)))
    return ("inode", st.st_dev, st.st_ino)
