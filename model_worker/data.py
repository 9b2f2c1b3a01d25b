"""Long documents as streams of consecutive segments.

A corpus is a folder of long plain-text documents (every non-hidden file under it, UTF-8),
or, by default, the Python standard library's own `.py` sources: long documents whose
names are defined far from where they are used, present on every machine with Python.
`RecallCorpus` turns a corpus into training documents with far-past dependencies
(`model_worker.recall`).

Reading grid: the first `context` tokens of a document are context only; segment k is
tokens `[context + k*T, context + (k+1)*T)`, read in a window that starts `context` tokens
earlier (`windows`), so no segment is encoded from position 0 and no segment start (an
attention sink) is written to memory.

Training reads B streams at once: row b of every batch is the next segment of stream b,
so stream b's memory bank always holds the earlier segments of the document it is reading.
When a stream's document ends it takes the next one and its bank must be reset
(`Batch.new_document[b]`).
"""

from __future__ import annotations

import os
import random
import sysconfig
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import torch

from model_worker.recall import RecallConfig, recall_document

# Default corpus: stdlib files of at least this many bytes per segment token (code is about
# 3-4 bytes a token), so most hold several segments.
DEFAULT_MIN_BYTES_PER_TOKEN = 12
EVAL_SHARE = 20  # 1 document in EVAL_SHARE (by a hash of its name) is held out for eval
RECALL_DOCUMENTS = 1_000_000  # a recall corpus is this long (generated on demand)


class DataError(ValueError):
    """Bad input data, reported as one line by the CLI."""


@dataclass
class Document:
    name: str
    tokens: torch.Tensor  # (N,) int64
    recall: torch.Tensor | None = None  # (N,) bool: tokens only memory can predict


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _is_eval(name: str) -> bool:
    return zlib.crc32(name.encode()) % EVAL_SHARE == 0


class Corpus:
    """The documents of a folder, of a comma-separated list of files, or of the standard
    library when `path` is None.

    `split` is "train", "eval" or "all"; with the default corpus "eval" is a fixed 1/20
    of the files (by a hash of their names) and "train" the rest. Documents are tokenized
    when first read. In a user's folder every file must be UTF-8 text holding more than
    one segment (DataError otherwise); the default corpus skips the files that are not.
    """

    def __init__(self, path: str | Path | None, tokenizer, segment_len: int, split: str = "all"):
        self.tokenizer, self.segment_len = tokenizer, segment_len
        self.default = path is None
        listed = [Path(p) for p in str(path).split(",")] if path is not None else []
        if len(listed) > 1 or (listed and listed[0].is_file()):  # a list of files
            missing = [str(f) for f in listed if not f.is_file()]
            if missing:
                raise DataError(f"data file(s) {', '.join(missing)} do not exist")
            root, files = Path(os.path.commonpath([f.resolve().parent for f in listed])), [
                f.resolve() for f in listed
            ]
        else:
            root = stdlib_dir() if path is None else Path(path)
            if not root.is_dir():
                raise DataError(
                    f"data folder {root} does not exist (give a folder of text files)"
                )
            files = self._folder_files(root, segment_len)
        files = sorted(files)
        if split != "all":
            keep = split == "eval"
            files = [f for f in files if _is_eval(str(f.relative_to(root))) == keep]
        if not files:
            raise DataError(f"data folder {root} holds no documents ({split} split)")
        self.root, self.files = root, files
        self._cache: dict[Path, Document | None] = {}

    def _folder_files(self, root: Path, segment_len: int) -> list[Path]:
        if self.default:
            min_bytes = DEFAULT_MIN_BYTES_PER_TOKEN * segment_len
            return [
                f
                for f in root.rglob("*.py")
                if "site-packages" not in f.parts and f.stat().st_size >= min_bytes
            ]
        return [
            f
            for f in root.rglob("*")
            if f.is_file() and not any(p.startswith(".") for p in f.relative_to(root).parts)
        ]

    def __len__(self) -> int:
        return len(self.files)

    def document(self, i: int) -> Document | None:
        """Document i, tokenized; None for a default-corpus file too short or not text."""
        f = self.files[i]
        if f not in self._cache:
            self._cache[f] = self._read(f)
        return self._cache[f]

    def text(self, i: int) -> str | None:
        """Document i as text; None for a default-corpus file that is not UTF-8."""
        f = self.files[i]
        try:
            return f.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            if self.default:
                return None
            raise DataError(
                f"{f} is not a UTF-8 text file; the data folder must hold only text"
            ) from None

    def _read(self, f: Path) -> Document | None:
        name = str(f.relative_to(self.root))
        text = self.text(self.files.index(f))
        if text is None:
            return None
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


class RecallCorpus:
    """Documents with far-past dependencies written into spans of `source`'s texts
    (`model_worker.recall`); document i is the same for a given seed, made when read."""

    def __init__(self, source: Corpus, seed: int = 0, config: RecallConfig | None = None):
        self.source, self.seed, self.config = source, seed, config or RecallConfig()
        self.root, self.segment_len = source.root, source.segment_len
        texts = [source.text(i) for i in range(len(source))]
        self.texts = [(f.name, t) for f, t in zip(source.files, texts, strict=True) if t]
        if not self.texts:
            raise DataError(f"data folder {source.root} holds no text to build documents from")

    def __len__(self) -> int:
        return RECALL_DOCUMENTS

    def document(self, i: int) -> Document | None:
        rng = random.Random(self.seed * RECALL_DOCUMENTS + i)
        name, text = rng.choice(self.texts)
        doc = recall_document(text, rng, self.config)
        tokens, offsets = encode_with_offsets(self.source.tokenizer, doc.text)
        if len(tokens) <= self.segment_len:
            return None
        starts, ends = torch.tensor(offsets).T  # (N,) each: the characters of each token
        recall = torch.zeros(len(tokens), dtype=torch.bool)
        for a, b in doc.spans:
            recall |= (starts < b) & (ends > a)
        return Document(f"recall-{i}:{name}", torch.tensor(tokens, dtype=torch.long), recall)


def windows(
    n_tokens: int, segment_len: int, context: int, first: int | None = None
) -> list[tuple[int, int, int]]:
    """The reading grid of a stream of n_tokens from token `first` (default `context`):
    (window start, segment start, end) per segment; the last one may be shorter. Tokens
    `[window start, segment start)`, at most `context` of them, are context only."""
    starts = range(context if first is None else first, n_tokens, segment_len)
    return [(max(0, s - context), s, min(s + segment_len, n_tokens)) for s in starts]


def encode_with_offsets(tokenizer, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    """Token ids and each token's character span (fast tokenizers)."""
    enc = tokenizer.backend_tokenizer.encode(text, add_special_tokens=False)
    return enc.ids, enc.offsets


def encode(tokenizer, text: str) -> list[int]:
    """Token ids of arbitrarily long text, without special tokens or length warnings."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:  # fast tokenizers: no model_max_length warning
        return backend.encode(text, add_special_tokens=False).ids
    return tokenizer.encode(text, add_special_tokens=False)


@dataclass
class Batch:
    input_ids: torch.Tensor  # (B, context + T): context, then the segment
    targets: torch.Tensor  # (B, T) next tokens of the segment
    recall: torch.Tensor  # (B, T) bool: targets only memory can predict (recall documents)
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

    corpus: Corpus | RecallCorpus
    batch_size: int
    context: int = 0
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
            doc = self._doc(k)
            if doc is not None and len(doc.tokens) > self.context + self.corpus.segment_len:
                s.doc, s.segment = k, 0
                return
        raise DataError(f"no document in {self.corpus.root} is longer than one segment")

    def current(self, b: int) -> Document:
        return self._doc(self.streams[b].doc)

    def next_batch(self) -> Batch:
        T, P = self.corpus.segment_len, self.context
        ids, targets, recall, new, names = [], [], [], [], []
        for s in self.streams:
            doc = self._doc(s.doc) if s.doc >= 0 else None
            if doc is None or P + (s.segment + 1) * T + 1 > len(doc.tokens):
                self._take_next(s)
                doc = self._doc(s.doc)
            start = s.segment * T
            chunk = doc.tokens[start : start + P + T + 1]  # (P + T + 1,)
            ids.append(chunk[:-1])
            targets.append(chunk[P + 1 :])
            marks = doc.recall if doc.recall is not None else torch.zeros_like(doc.tokens).bool()
            recall.append(marks[start + P + 1 : start + P + T + 1])
            new.append(s.segment == 0)
            names.append(doc.name)
            s.segment += 1
        return Batch(torch.stack(ids), torch.stack(targets), torch.stack(recall), new, names)

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
