"""Captions and their tokens: a caption manifest (CSV, TSV, JSONL or Parquet) and WordPiece tokenization.

A manifest has one row per caption: `image_id` (the shard record's id), `caption`, and an optional
`split` (e.g. train / val). An image may have any number of captions.
"""

from __future__ import annotations

import os

import numpy as np
import pandas as pd
from tokenizers import BertWordPieceTokenizer, Tokenizer

SPECIAL = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


class Text:
    """WordPiece tokenization from a BERT vocab.txt or a tokenizers tokenizer.json.

    encode() returns [CLS] words [SEP] as int64, truncated to max_len tokens in all."""

    def __init__(self, path: str | os.PathLike, max_len: int = 60, lowercase: bool = True):
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: tokenizer file not found (a BERT vocab.txt or a tokenizer.json)")
        if path.endswith(".json"):
            self.tok = Tokenizer.from_file(path)
        else:
            with open(path, encoding="utf-8") as f:
                words = {line.rstrip("\n") for line in f}
            missing = [s for s in SPECIAL if s not in words]
            if missing:
                raise ValueError(f"{path}: vocabulary lacks the special tokens {missing}")
            self.tok = BertWordPieceTokenizer(path, lowercase=lowercase)
        self.tok.no_padding()  # a tokenizer.json may carry its own padding and truncation: we do both
        self.tok.no_truncation()
        self.path, self.max_len, self.lowercase = path, max_len, lowercase
        if max_len < 3:
            raise ValueError(f"max text length {max_len} leaves no room for a word between [CLS] and [SEP]")
        ids = {s: self.tok.token_to_id(s) for s in SPECIAL}
        missing = [s for s, i in ids.items() if i is None]
        if missing:
            raise ValueError(f"{path}: vocabulary lacks the special tokens {missing}")
        self.pad_id, self.unk_id, self.cls_id, self.sep_id, self.mask_id = (ids[s] for s in SPECIAL)
        self.vocab_size = self.tok.get_vocab_size()
        special = set(ids.values())
        vocab = self.tok.get_vocab()
        # a random replacement is a real word: no special tokens and no BERT [unusedN] slots
        self.random_ids = np.array(sorted(i for t, i in vocab.items() if i not in special
                                          and not (t.startswith("[") and t.endswith("]"))), dtype=np.int64)
        self.special_ids = frozenset(special)

    def encode(self, captions: list[str]) -> list[np.ndarray]:
        out = []
        for enc in self.tok.encode_batch([str(c) for c in captions], add_special_tokens=False):
            words = enc.ids[: self.max_len - 2]
            out.append(np.array([self.cls_id, *words, self.sep_id], dtype=np.int64))
        return out

    def encode_flat(self, captions) -> tuple[np.ndarray, np.ndarray]:
        """encode() of many captions as two flat arrays: every caption's ids one after the other (int64) and
        each caption's length, without one array per caption (the captions table is built from these)."""
        encs = self.tok.encode_batch([str(c) for c in captions], add_special_tokens=False)
        keep, cls, sep = self.max_len - 2, self.cls_id, self.sep_id
        flat: list[int] = []
        lengths = np.empty(len(encs), dtype=np.int64)
        for i, enc in enumerate(encs):
            words = enc.ids[:keep]
            flat.append(cls)
            flat.extend(words)
            flat.append(sep)
            lengths[i] = len(words) + 2
        return np.array(flat, dtype=np.int64), lengths

    def decode(self, ids) -> str:
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=False)


def read_manifest(path: str | os.PathLike, split: str | None = None) -> pd.DataFrame:
    """The manifest's rows (image_id, caption[, split]) as strings, only those of `split` if given."""
    path = os.fspath(path)
    ext = _manifest_ext(path)
    readers = {".csv": pd.read_csv, ".tsv": lambda p, **k: pd.read_csv(p, sep="\t", **k),
               ".jsonl": lambda p, **k: pd.read_json(p, lines=True, dtype=False),
               ".parquet": lambda p, **k: pd.read_parquet(p)}
    kw = {} if ext == ".parquet" else {"dtype": str}
    if ext in (".csv", ".tsv"):
        kw["keep_default_na"] = False
    try:
        df = readers[ext](path, **kw)
    except READ_ERRORS as e:
        # pandas' and pyarrow's messages (ParserError, UnicodeDecodeError, ArrowInvalid) do not name the file
        raise ValueError(f"{path}: cannot read the caption manifest ({type(e).__name__}: {e})") from None
    df = _checked_rows(path, df, 0, split)
    if split is not None and df.empty:
        raise NoRows(f"{path}: no rows with split == {split!r}")
    return df.reset_index(drop=True)


class NoRows(ValueError):
    """The manifest has no rows of the split asked for (or no split column): a held-out evaluation is
    skipped with a note, training stops with this message."""


READ_ERRORS = (ValueError, OSError, TypeError, RecursionError, pd.errors.ParserError)


def _manifest_ext(path: str) -> str:
    ext = os.path.splitext(path)[1].lower()
    if ext not in (".csv", ".tsv", ".jsonl", ".parquet"):
        raise ValueError(f"{path}: caption manifest must be .csv, .tsv, .jsonl or .parquet")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: caption manifest not found")
    return ext


def _checked_rows(path: str, df: pd.DataFrame, start: int, split: str | None) -> pd.DataFrame:
    """Rows start.. of the manifest as strings, refused naming the data row if an id or caption is empty;
    only those of `split` if given. The index keeps each row's number in the file (start + i)."""
    missing = [c for c in ("image_id", "caption") if c not in df.columns]
    if missing:
        raise ValueError(f"{path}: manifest lacks column(s) {missing}; it has {list(df.columns)}")
    # missing (NaN/None) or blank: a CSV read with keep_default_na=False gives "" for an empty field, and an
    # empty caption would train ITM and MLM on [CLS] [SEP] alone
    bad = np.array(df["image_id"].isna() | df["caption"].isna(), dtype=bool)  # a copy: to_numpy() is read-only
    bad |= np.array([not str(v).strip() for v in df["image_id"]], bool)
    bad |= np.array([not str(v).strip() for v in df["caption"]], bool)
    if bad.any():
        row = start + int(np.flatnonzero(bad)[0])
        raise ValueError(f"{path}: data row {row} has an empty image_id or caption ({int(bad.sum())} such rows"
                         f"{'' if start == 0 else ' in its block of rows'})")
    df = df.assign(image_id=df["image_id"].astype(str), caption=df["caption"].astype(str))
    df.index = pd.RangeIndex(start, start + len(df))
    if split is not None:
        if "split" not in df.columns:
            raise NoRows(f"{path}: split {split!r} requested but the manifest has no 'split' column")
        df = df[df["split"].astype(str) == split]
    return df


def iter_manifest(path: str | os.PathLike, split: str | None = None, chunk_rows: int = 65536):
    """read_manifest in blocks of chunk_rows file rows: DataFrames (image_id, caption[, split]) whose index is
    each row's data row in the file, so that memory does not grow with the manifest. The same strings and
    the same errors as read_manifest, except that `no rows with split` is the caller's to say."""
    path = os.fspath(path)
    ext = _manifest_ext(path)
    try:
        if ext == ".parquet":
            import pyarrow.parquet as pq

            chunks = (b.to_pandas() for b in pq.ParquetFile(path).iter_batches(batch_size=chunk_rows))
        elif ext == ".jsonl":
            chunks = pd.read_json(path, lines=True, dtype=False, chunksize=chunk_rows)
        else:
            chunks = pd.read_csv(path, sep="\t" if ext == ".tsv" else ",", dtype=str, keep_default_na=False,
                                 chunksize=chunk_rows)
        start = 0
        for df in _reading(path, chunks):
            rows = len(df)
            yield _checked_rows(path, df, start, split)
            start += rows
        if start == 0:  # no rows at all (a reader may yield no block): the columns are still checked
            read_manifest(path)
    except READ_ERRORS as e:
        if isinstance(e, ValueError) and str(e).startswith(f"{path}: "):
            raise
        raise ValueError(f"{path}: cannot read the caption manifest ({type(e).__name__}: {e})") from None


def _reading(path: str, chunks):
    """The blocks of a pandas/pyarrow reader, its own errors (raised while iterating) named by the file."""
    it = iter(chunks)
    while True:
        try:
            df = next(it)
        except StopIteration:
            return
        except READ_ERRORS as e:
            raise ValueError(f"{path}: cannot read the caption manifest ({type(e).__name__}: {e})") from None
        yield df
