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
        self.path, self.max_len = path, max_len
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

    def decode(self, ids) -> str:
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=False)


def read_manifest(path: str | os.PathLike, split: str | None = None) -> pd.DataFrame:
    """The manifest's rows (image_id, caption[, split]) as strings, only those of `split` if given."""
    path = os.fspath(path)
    readers = {".csv": pd.read_csv, ".tsv": lambda p, **k: pd.read_csv(p, sep="\t", **k),
               ".jsonl": lambda p, **k: pd.read_json(p, lines=True, dtype=False),
               ".parquet": lambda p, **k: pd.read_parquet(p)}
    ext = os.path.splitext(path)[1].lower()
    if ext not in readers:
        raise ValueError(f"{path}: caption manifest must be .csv, .tsv, .jsonl or .parquet")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: caption manifest not found")
    kw = {} if ext == ".parquet" else {"dtype": str}
    if ext in (".csv", ".tsv"):
        kw["keep_default_na"] = False
    try:
        df = readers[ext](path, **kw)
    except (ValueError, OSError, TypeError, RecursionError, pd.errors.ParserError) as e:
        # pandas' and pyarrow's messages (ParserError, UnicodeDecodeError, ArrowInvalid) do not name the file
        raise ValueError(f"{path}: cannot read the caption manifest ({type(e).__name__}: {e})") from None
    missing = [c for c in ("image_id", "caption") if c not in df.columns]
    if missing:
        raise ValueError(f"{path}: manifest lacks column(s) {missing}; it has {list(df.columns)}")
    # missing (NaN/None) or blank: a CSV read with keep_default_na=False gives "" for an empty field, and an
    # empty caption would train ITM and MLM on [CLS] [SEP] alone
    bad = np.array(df["image_id"].isna() | df["caption"].isna(), dtype=bool)  # a copy: to_numpy() is read-only
    bad |= np.array([not str(v).strip() for v in df["image_id"]], bool)
    bad |= np.array([not str(v).strip() for v in df["caption"]], bool)
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise ValueError(f"{path}: data row {row} has an empty image_id or caption ({int(bad.sum())} such rows)")
    df = df.assign(image_id=df["image_id"].astype(str), caption=df["caption"].astype(str))
    if split is not None:
        if "split" not in df.columns:
            raise ValueError(f"{path}: split {split!r} requested but the manifest has no 'split' column")
        df = df[df["split"].astype(str) == split]
        if df.empty:
            raise ValueError(f"{path}: no rows with split == {split!r}")
    return df.reset_index(drop=True)
