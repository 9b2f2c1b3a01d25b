"""Training documents that need memory: ordinary long text with far-past dependencies.

Each document is a span of a long source text (a book, a source file) into which we write

- facts stated once and asked later: a made-up person or object, an attribute and a value
  (digits or an invented word), stated in one of several templates and asked again in
  another one, 0.5k-8k tokens later (some more than once);
- passages that come back: a paragraph of the document repeated verbatim 0.5k-8k tokens
  after it first appeared.

Only memory can predict the answers and the repeats once they are beyond the local window,
so the loss itself teaches the SideNet to retrieve. The templates share no wording with the
passkey evaluation ("pass key", "Remember it"), so passkey accuracy measures transfer, not
recall of a training template. Everything is generated from a seed: no download.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

FIRST = (
    "Ada Basil Cora Dmitri Elsa Farid Greta Hugo Ines Jonah Kira Lucas Mara Nils Olga Pavel "
    "Quinn Rosa Silas Tamsin Ulric Vera Wendell Xenia Yusuf Zora Abel Brigid Cyrus Delphine"
).split()
LAST = (
    "Abernathy Blackwood Castellan Dunmore Everly Fairweather Grimsby Holloway Ingram "
    "Jessop Kettering Lockhart Merriweather Northcott Okonkwo Pemberton Quillfeather Rowntree "
    "Stanhope Thistlewood Underhill Vance Whitlock Yardley"
).split()
THINGS = (
    "locker code", "ticket number", "room number", "account number", "badge number",
    "order number", "cabin number", "licence number", "safe combination", "parcel number",
    "favourite colour", "secret word", "home town", "password", "boat's name", "horse's name",
)
SYLLABLES = "ka lo mi ren tu sa vel dor qui an est ob ul zar pim teh no gra fi".split()

STATE = (
    "{name}'s {thing} is {value}.",
    "For the record, the {thing} of {name} was {value}.",
    "{name} wrote the {thing} on a scrap of paper: {value}.",
    "Everyone in town knew that {name}'s {thing} was {value}.",
    "(Note: {name} has {thing} {value}.)",
)
ASK = (
    "Asked for the {thing} of {name}, the clerk said: {value}.",
    "Q: What is {name}'s {thing}? A: {value}.",
    "{name} had to give the {thing} again. It was {value}.",
    "And the {thing} that {name} had? It was {value}.",
    "Looking back, {name}'s {thing} had been {value}.",
)


@dataclass(frozen=True)
class RecallConfig:
    min_tokens: int = 2048  # document length (tokens, estimated from characters)
    max_tokens: int = 9216
    facts_per_1k: float = 4.0  # facts stated per 1,000 tokens of the first half
    repeats_per_4k: float = 3.0  # passages repeated per 4,000 tokens
    min_gap: int = 512  # tokens between a statement and its question / a passage's repeat
    max_gap: int = 8192
    chars_per_token: float = 4.0


def _value(rng: random.Random) -> str:
    if rng.random() < 0.6:
        return str(rng.randint(10 ** (n := rng.randint(3, 7)) // 10, 10**n - 1))
    return "".join(rng.choice(SYLLABLES) for _ in range(rng.randint(2, 3))).capitalize()


@dataclass(frozen=True)
class RecallText:
    text: str
    spans: list[tuple[int, int]]  # character spans only memory can predict (answers, repeats)


def recall_document(source: str, rng: random.Random, cfg: RecallConfig) -> RecallText:
    """A document built from a random span of `source` with facts and repeats written in."""
    cpt = cfg.chars_per_token
    n_chars = int(rng.randint(cfg.min_tokens, cfg.max_tokens) * cpt)
    start = rng.randint(0, max(0, len(source) - n_chars))
    paras = [p for p in source[start : start + n_chars].split("\n\n") if p.strip()][1:]
    if len(paras) < 4:  # text without blank lines: cut into ~400-character paragraphs
        span = source[start : start + n_chars]
        paras = [span[i : i + 400] for i in range(0, len(span), 400)]
    offsets = [0]  # character offset of paragraph i's start
    for p in paras:
        offsets.append(offsets[-1] + len(p) + 2)
    inserts: dict[int, list[tuple[str, str]]] = {}  # before paragraph i: (text, recalled)

    def at_gap(i: int) -> int | None:
        """Index of a paragraph 0.5k-8k tokens (log-uniform) after paragraph i, if any."""
        gap = math.exp(rng.uniform(math.log(cfg.min_gap), math.log(cfg.max_gap))) * cpt
        j = next((j for j in range(i, len(paras)) if offsets[j] - offsets[i] >= gap), None)
        return j

    n_tokens = offsets[-1] / cpt
    for _ in range(max(1, round(cfg.facts_per_1k * n_tokens / 2000))):
        i = rng.randrange(max(1, len(paras) // 2))
        fact = {
            "name": f"{rng.choice(FIRST)} {rng.choice(LAST)}",
            "thing": rng.choice(THINGS),
            "value": _value(rng),
        }
        inserts.setdefault(i, []).append((rng.choice(STATE).format(**fact), ""))
        for _ in range(rng.choice((1, 1, 2))):
            if (j := at_gap(i)) is not None:
                inserts.setdefault(j, []).append((rng.choice(ASK).format(**fact), fact["value"]))
    for _ in range(round(cfg.repeats_per_4k * n_tokens / 4000)):
        i = rng.randrange(max(1, len(paras) // 2))
        if (j := at_gap(i + 1)) is not None and 100 <= len(paras[i]) <= 1200:
            inserts.setdefault(j, []).append((paras[i], paras[i]))
    text, spans = "", []
    for i, p in enumerate(paras):
        for sentence, recalled in inserts.get(i, []):
            if recalled == sentence:  # a passage that comes back
                spans.append((len(text), len(text) + len(sentence)))
            elif recalled:  # an answer: the value ends the sentence, before its full stop
                end = len(text) + len(sentence) - 1
                spans.append((end - len(recalled), end))
            text += sentence + "\n\n"
        text += p + "\n\n"
    return RecallText(text.rstrip("\n") + "\n", spans)
