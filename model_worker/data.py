"""Long documents as streams of consecutive segments.

A corpus is a folder of long plain-text documents (every non-hidden file under it, UTF-8),
or, by default, the Python standard library's own `.py` sources: long documents whose
names are defined far from where they are used, present on every machine with Python.

Training reads B streams at once: row b of every batch is the next segment of stream b,
so stream b's memory bank always holds the earlier segments of the document it is reading.
When a stream's document ends it takes the next one and its bank must be reset
(`Batch.new_document[b]`).
"""

from __future__ import annotations

import random
import sysconfig
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import torch

# Default corpus: stdlib files of at least this many bytes per segment token (code is about
# 3-4 bytes a token), so most hold several segments.
DEFAULT_MIN_BYTES_PER_TOKEN = 12
EVAL_SHARE = 20  # 1 document in EVAL_SHARE (by a hash of its name) is held out for eval


class DataError(ValueError):
    """Bad input data, reported as one line by the CLI."""


@dataclass
class Document:
    name: str
    tokens: torch.Tensor  # (N,) int64


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _is_eval(name: str) -> bool:
    return zlib.crc32(name.encode()) % EVAL_SHARE == 0


class Corpus:
    """The documents of a folder (or of the standard library when `path` is None).

    `split` is "train", "eval" or "all"; with the default corpus "eval" is a fixed 1/20
    of the files (by a hash of their names) and "train" the rest. Documents are tokenized
    when first read. In a user's folder every file must be UTF-8 text holding more than
    one segment (DataError otherwise); the default corpus skips the files that are not.
    """

    def __init__(self, path: str | Path | None, tokenizer, segment_len: int, split: str = "all"):
        self.tokenizer, self.segment_len = tokenizer, segment_len
        self.default = path is None
        root = stdlib_dir() if path is None else Path(path)
        if not root.is_dir():
            raise DataError(f"data folder {root} does not exist (give a folder of text files)")
        if self.default:
            min_bytes = DEFAULT_MIN_BYTES_PER_TOKEN * segment_len
            files = [
                f
                for f in root.rglob("*.py")
                if "site-packages" not in f.parts and f.stat().st_size >= min_bytes
            ]
        else:
            files = [
                f
                for f in root.rglob("*")
                if f.is_file() and not any(p.startswith(".") for p in f.relative_to(root).parts)
            ]
        files = sorted(files)
        if split != "all":
            keep = split == "eval"
            files = [f for f in files if _is_eval(str(f.relative_to(root))) == keep]
        if not files:
            raise DataError(f"data folder {root} holds no documents ({split} split)")
        self.root, self.files = root, files
        self._cache: dict[Path, Document | None] = {}

    def __len__(self) -> int:
        return len(self.files)

    def document(self, i: int) -> Document | None:
        """Document i, tokenized; None for a default-corpus file too short or not text."""
        f = self.files[i]
        if f not in self._cache:
            self._cache[f] = self._read(f)
        return self._cache[f]

    def _read(self, f: Path) -> Document | None:
        name = str(f.relative_to(self.root))
        try:
            text = f.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            if self.default:
                return None
            raise DataError(
                f"{f} is not a UTF-8 text file; the data folder must hold only text"
            ) from None
        tokens = torch.tensor(encode(self.tokenizer, text), dtype=torch.long)
        if len(tokens) <= self.segment_len:
            if self.default:
                return None
            raise DataError(
                f"{f} has {len(tokens)} tokens, shorter than one segment plus one "
                f"({self.segment_len + 1}); use longer documents or a smaller --segment-len"
            )
        return Document(name, tokens)

    def check(self) -> None:
        """Read every document now (a user's folder: fail before training starts)."""
        for i in range(len(self)):
            self.document(i)

    def documents(self, limit: int | None = None) -> list[Document]:
        """The first `limit` readable documents, in file order."""
        docs = []
        for i in range(len(self)):
            if limit is not None and len(docs) >= limit:
                break
            if (d := self.document(i)) is not None:
                docs.append(d)
        return docs


def encode(tokenizer, text: str) -> list[int]:
    """Token ids of arbitrarily long text, without special tokens or length warnings."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:  # fast tokenizers: no model_max_length warning
        return backend.encode(text, add_special_tokens=False).ids
    return tokenizer.encode(text, add_special_tokens=False)


@dataclass
class Batch:
    input_ids: torch.Tensor  # (B, T)
    targets: torch.Tensor  # (B, T) next tokens
    new_document: list[bool]  # row b starts a new document: reset stream b's bank first
    documents: list[str]  # row b's document name


@dataclass
class StreamState:
    doc: int = -1  # index into the stream order, -1 before the first document
    segment: int = 0  # next segment to read


@dataclass
class Streams:
    """B streams over a corpus; this worker (`rank` of `world`) reads its own documents.

    The document order is a seeded shuffle; worker r takes documents r, r + world, ...;
    when stream b's document ends it takes the next untaken one (cycling for more epochs).
    `state_dict()`/`load_state_dict()` make the position resumable.
    """

    corpus: Corpus
    batch_size: int
    seed: int = 0
    rank: int = 0
    world: int = 1
    next_doc: int = 0
    streams: list[StreamState] = field(default_factory=list)

    def __post_init__(self):
        order = list(range(len(self.corpus)))
        random.Random(self.seed).shuffle(order)
        self.order = order[self.rank :: self.world] or order[: 1]
        if not self.streams:
            self.streams = [StreamState() for _ in range(self.batch_size)]

    def _doc(self, k: int) -> Document | None:
        return self.corpus.document(self.order[k % len(self.order)])

    def _take_next(self, s: StreamState) -> None:
        for _ in range(len(self.order)):
            k, self.next_doc = self.next_doc, self.next_doc + 1
            if self._doc(k) is not None:
                s.doc, s.segment = k, 0
                return
        raise DataError(f"no document in {self.corpus.root} is longer than one segment")

    def current(self, b: int) -> Document:
        return self._doc(self.streams[b].doc)

    def next_batch(self) -> Batch:
        T = self.corpus.segment_len
        ids, targets, new, names = [], [], [], []
        for s in self.streams:
            doc = self._doc(s.doc) if s.doc >= 0 else None
            if doc is None or (s.segment + 1) * T + 1 > len(doc.tokens):
                self._take_next(s)
                doc = self._doc(s.doc)
            start = s.segment * T
            chunk = doc.tokens[start : start + T + 1]  # (T + 1,)
            ids.append(chunk[:-1])
            targets.append(chunk[1:])
            new.append(s.segment == 0)
            names.append(doc.name)
            s.segment += 1
        return Batch(torch.stack(ids), torch.stack(targets), new, names)

    def state_dict(self) -> dict:
        return {
            "next_doc": self.next_doc,
            "streams": [[s.doc, s.segment] for s in self.streams],
        }

    def load_state_dict(self, state: dict) -> None:
        if len(state["streams"]) != self.batch_size:
            raise DataError(
                f"checkpoint has {len(state['streams'])} streams, --batch-size is {self.batch_size}"
            )
        self.next_doc = state["next_doc"]
        self.streams = [StreamState(d, s) for d, s in state["streams"]]
