"""Labelled text for fine-tuning: JSONL reading, BERT-style encoding, and the embedded synthetic sets.

Files are JSON Lines, one example a line:

    classification:        {"text": "the striker scored twice", "label": "sports"}     (label: string or int)

Labels are all strings or all ints (not a mix, so ``1`` and ``"1"`` never merge; booleans are refused); int
labels are classes in numeric order (``2`` before ``10``), named by their decimal string.
    token_classification:  {"tokens": ["Alice", "met", "Bob"], "tags": ["B-PER", "O", "B-PER"]}   (IOB2 tags)

Encoding adds ``[CLS] ... [SEP]``, truncates to ``seq_len`` (flagging each cut example and its full length, which
``train.finetune`` reports) and pads on the right (``mask`` = 1 on real tokens).
For tagging, each word's tag sits on its first token and every other position is ``IGNORE``; words cut off by
truncation are predicted ``O`` at evaluation (so truncation lowers recall instead of being hidden).

Tokenisation (``finetune.tokenizer``): ``bytes`` (UTF-8 bytes 0-255, then [PAD] [CLS] [SEP] [MASK] as 256-259),
``words`` (a word-level vocabulary of the training set's whitespace-separated words, most frequent first, after
[PAD] [CLS] [SEP] [MASK] [UNK]; unseen words become [UNK]; saved as ``vocab.json`` next to the report), or the
path of a local Hugging Face ``tokenizer.json`` whose special tokens are found by their BERT or RoBERTa names.

The embedded default (no download): :func:`synthetic_classification` (topic of a sentence, 4 classes, decided by
the majority of its topic words) and :func:`synthetic_ner` (PER/LOC/ORG entities, some of two words, drawn from
small name lists into templates), generated deterministically from a seed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from jzero.errors import DataError
from jzero.tasks import IGNORE

VOCAB_MULTIPLE = 64   # the model's vocabulary is padded to this so tensor sizes up to 64 divide it


def padded_vocab(n: int, multiple: int = VOCAB_MULTIPLE) -> int:
    return -(-n // multiple) * multiple


# --------------------------------------------------------------------------- tokenisation


@dataclass(frozen=True)
class Encoder:
    """Text -> ids with BERT's special tokens. ``n_ids`` = ids the tokenizer can emit (the model pads it)."""

    name: str
    n_ids: int
    pad_id: int
    cls_id: int
    sep_id: int
    mask_id: int
    encode_text: Callable[[str], list[int]]
    encode_words: Callable[[list[str]], tuple[list[int], list[int]]]   # -> (ids, index of each word's 1st id)

    @property
    def special_ids(self) -> tuple[int, ...]:
        return (self.pad_id, self.cls_id, self.sep_id, self.mask_id)


def byte_encoder() -> Encoder:
    def words(ws):
        ids, first = [], []
        for i, w in enumerate(ws):
            if i:
                ids.append(ord(" "))
            first.append(len(ids))
            ids.extend(w.encode("utf-8"))
        return ids, first
    return Encoder("bytes", 260, 256, 257, 258, 259, lambda t: list(t.encode("utf-8")), words)


def tokenizer_encoder(path: str | Path) -> Encoder:
    from jzero.data import load_tokenizer

    tok = load_tokenizer(path)
    tok.no_truncation()
    tok.no_padding()

    def find(names):
        for n in names:
            i = tok.token_to_id(n)
            if i is not None:
                return i
        raise DataError(f"tokenizer {path} has none of the special tokens {names}; fine-tuning a BERT needs "
                        f"[PAD] [CLS] [SEP] [MASK] (or RoBERTa's <pad> <s> </s> <mask>)")

    def words(ws):
        enc = tok.encode(ws, is_pretokenized=True, add_special_tokens=False)
        first, seen = [], set()
        for pos, w in enumerate(enc.word_ids):
            if w is not None and w not in seen:
                seen.add(w)
                first.append(pos)
        if len(first) != len(ws):   # a word that tokenises to nothing: give it no position (predicted O)
            first_of = {w: pos for pos, w in reversed(list(enumerate(enc.word_ids))) if w is not None}
            first = [first_of.get(i, -1) for i in range(len(ws))]
        return enc.ids, first

    return Encoder(str(path), tok.get_vocab_size(), find(["[PAD]", "<pad>"]), find(["[CLS]", "<s>"]),
                   find(["[SEP]", "</s>"]), find(["[MASK]", "<mask>"]),
                   lambda t: tok.encode(t, add_special_tokens=False).ids, words)


WORD_SPECIALS = ("[PAD]", "[CLS]", "[SEP]", "[MASK]", "[UNK]")


def words_of(ex: dict) -> list[str]:
    return ex["tokens"] if "tokens" in ex else ex["text"].split()


def build_word_vocab(examples: list[dict]) -> list[str]:
    """Specials, then the examples' words by falling frequency (ties alphabetical): deterministic."""
    counts: dict[str, int] = {}
    for ex in examples:
        for w in words_of(ex):
            counts[w] = counts.get(w, 0) + 1
    return list(WORD_SPECIALS) + sorted(counts, key=lambda w: (-counts[w], w))


def word_encoder(vocab: list[str]) -> Encoder:
    index = {w: i for i, w in enumerate(vocab)}
    unk = index["[UNK]"]
    ids = lambda ws: [index.get(w, unk) for w in ws]  # noqa: E731
    return Encoder("words", len(vocab), index["[PAD]"], index["[CLS]"], index["[SEP]"], index["[MASK]"],
                   lambda t: ids(t.split()), lambda ws: (ids(ws), list(range(len(ws)))))


def make_encoder(tokenizer: str, train_examples: list[dict], vocab: list[str] | None = None) -> Encoder:
    """``bytes``, ``words`` (``vocab``, e.g. the one a checkpoint was trained with, else built from
    ``train_examples``) or a tokenizer.json path."""
    if tokenizer == "bytes":
        return byte_encoder()
    if tokenizer == "words":
        return word_encoder(vocab if vocab is not None else build_word_vocab(train_examples))
    return tokenizer_encoder(tokenizer)


def read_word_vocab(path: str | Path) -> list[str]:
    """A ``vocab.json`` written by ``train.finetune`` (a JSON list of words, the specials first)."""
    try:
        vocab = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise DataError(f"{path} is not a readable vocab.json ({exc})") from None
    if not (isinstance(vocab, list) and all(isinstance(w, str) for w in vocab) and set(WORD_SPECIALS) <= set(vocab)):
        raise DataError(f"{path} is not a train.finetune vocab.json (a JSON list of words with "
                        f"{' '.join(WORD_SPECIALS)})")
    return vocab


# --------------------------------------------------------------------------- reading


def read_jsonl(path: str | Path, task: str, key: str = "finetune.train_file") -> list[dict]:
    """Examples of ``task`` from the JSONL file ``key`` names, each checked: a bad line names file:line and what
    is wrong. Lines are split on the bytes (``\\n``, ``\\r\\n``, ``\\r``, as editors number them) and each is decoded
    as UTF-8 on its own, so a latin-1 or binary line is reported at its line number instead of a
    UnicodeDecodeError at a byte offset of the whole file; a UTF-8 byte-order mark at the start is dropped."""
    path = Path(path)
    if path.is_dir():
        found = sorted(p.name for p in path.glob("*.jsonl"))[:3]
        hint = f" (it holds {', '.join(found)})" if found else ""
        raise DataError(f"{key}={path} is a directory; pass the JSONL file itself{hint}, one "
                        f"{_FORMAT[task]} a line")
    if not path.is_file():
        raise DataError(f"{key}={path} not found; pass a JSONL file of {_FORMAT[task]} lines")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise DataError(f"{key}={path} cannot be read ({exc.strerror}); check its permissions") from None
    out, first_label = [], {}   # label type -> (line, label) of its first use: a mix of int and str is an error
    for n, raw in enumerate(data.removeprefix(b"\xef\xbb\xbf").splitlines(), 1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise DataError(f"{path}:{n} is not UTF-8 text (byte 0x{raw[exc.start]:02x} at column {exc.start + 1}); "
                            f"pass a UTF-8 JSONL file (convert another encoding with iconv -f ENCODING -t UTF-8)"
                            ) from None
        if not line.strip():
            continue
        try:
            ex = json.loads(line)
        except json.JSONDecodeError as exc:
            other = {".csv": "CSV", ".tsv": "TSV", ".conll": "CoNLL", ".txt": "plain text"}.get(path.suffix.lower())
            hint = f" (fine-tuning reads JSONL only, not {other}: convert {path.name} to JSONL)" if other else ""
            raise DataError(f"{path}:{n} is not JSON ({exc.msg}); each line must be {_FORMAT[task]}{hint}") from None
        ex = _check_example(ex, task, f"{path}:{n}")
        if task == "classification":
            kind = type(ex["label"])
            first_label.setdefault(kind, (n, ex["label"]))
            if len(first_label) > 1:
                other_n, other = first_label[str if kind is int else int]
                raise DataError(f"{path}:{n}: label {ex['label']!r} is {_KIND[kind]} but {path}:{other_n} has "
                                f"{_KIND[type(other)]} label {other!r}; use one type for every label (1 and "
                                f"\"1\" would be two classes)")
        out.append(ex)
    if not out:
        raise DataError(f"{path} holds no examples; each line must be {_FORMAT[task]}")
    return out


_FORMAT = {"classification": '{"text": "...", "label": "..."}',
           "token_classification": '{"tokens": ["..."], "tags": ["B-PER", "O", ...]}'}


_KIND = {int: "an int", str: "a string"}


def _check_example(ex: Any, task: str, where: str) -> dict:
    if task == "classification":
        if isinstance(ex, dict) and isinstance(ex.get("label"), bool):
            raise DataError(f"{where}: label {json.dumps(ex['label'])} is a boolean; use strings (e.g. \"yes\"/"
                            f"\"no\") or ints (0/1) as labels")
        if not (isinstance(ex, dict) and isinstance(ex.get("text"), str) and isinstance(ex.get("label"), (str, int))):
            raise DataError(f"{where}: expected {_FORMAT[task]}, got {str(ex)[:80]}")
        return {"text": ex["text"], "label": ex["label"]}   # int or str: label_names orders and names them
    if not (isinstance(ex, dict) and isinstance(ex.get("tokens"), list) and isinstance(ex.get("tags"), list)):
        raise DataError(f"{where}: expected {_FORMAT[task]}, got {str(ex)[:80]}")
    if len(ex["tokens"]) != len(ex["tags"]):
        raise DataError(f"{where}: {len(ex['tokens'])} tokens but {len(ex['tags'])} tags; give one tag per token")
    for t in ex["tags"]:
        if not isinstance(t, str) or not (t == "O" or t[:2] in ("B-", "I-")):
            raise DataError(f"{where}: tag {t!r} is not IOB2 (O, B-TYPE or I-TYPE)")
    for i, w in enumerate(ex["tokens"]):   # str() made null the word "None" and [1, 2] the word "[1, 2]"
        if not isinstance(w, str):
            quoted = f" (\"{w}\")" if isinstance(w, (int, float)) and not isinstance(w, bool) else ""
            raise DataError(f"{where}: token {i} is {json.dumps(w)}, not a string; give every token as a JSON "
                            f"string{quoted}")
    return {"tokens": list(ex["tokens"]), "tags": list(ex["tags"])}


def label_names(train: list[dict], val: list[dict], task: str, source: str = "the training set") -> list[str]:
    """Classes (sorted; int labels numerically, named by their decimal string, which :func:`encode` maps them by)
    or IOB2 tags ('O' first, then sorted); int labels in one split and string labels in the other are an error, and
    so is a validation label unseen in training,
    and so is a training set with a single label (``source`` names it in the message): a head with one class
    has nothing to learn, and for tagging ('O' is always a label) it means the set has no entity tags at all,
    e.g. every tag 'O' or every token list empty."""
    def seen(exs):
        if task == "classification":
            return {ex["label"] for ex in exs}
        return {t for ex in exs for t in ex["tags"]}

    names = seen(train) | ({"O"} if task != "classification" else set())
    if task == "classification":
        kinds = {type(x) for x in names}, {type(x) for x in seen(val)}
        if len(kinds[0] | kinds[1]) > 1:
            tr, va = (" and ".join(sorted(_KIND[k].split()[1] for k in ks)) for ks in kinds)
            raise DataError(f"the training set ({source}) has {tr} labels but the validation set has {va} labels; "
                            f"use one type for every label (1 and \"1\" would be two classes)")
    unseen = seen(val) - names
    if unseen:
        raise DataError(f"validation labels {sorted(unseen)[:5]} never occur in the training set; the model "
                        f"cannot learn them (add training examples or drop those lines)")
    if task == "classification":
        if len(names) < 2:
            raise DataError(f"the training set ({source}) has {len(names)} class(es); classification needs at "
                            f"least 2 (add examples of another label)")
        return [str(x) for x in sorted(names)]   # ints numerically (all one type: checked above)
    if len(names) < 2:
        what = ("every token list is empty" if not any(ex["tokens"] for ex in train) else "every tag is 'O'")
        raise DataError(f"the training set ({source}) has 1 class(es): {what}; token_classification needs "
                        f"entity tags to learn (tag the entities B-TYPE/I-TYPE, IOB2)")
    return ["O"] + sorted(names - {"O"})


def split(examples: list[dict], val_fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """A seeded shuffle, then the last ``val_fraction`` (at least one example) held out."""
    order = np.random.default_rng(seed).permutation(len(examples))
    n_val = max(1, int(round(len(examples) * val_fraction)))
    if n_val >= len(examples):
        raise DataError(f"{len(examples)} examples are too few to hold out a validation split")
    return [examples[i] for i in order[:-n_val]], [examples[i] for i in order[-n_val:]]


# --------------------------------------------------------------------------- encoding


def _frame(ids: list[int], enc: Encoder, seq_len: int) -> tuple[list[int], int]:
    body = ids[: seq_len - 2]
    return [enc.cls_id] + body + [enc.sep_id], len(body)


def encode(examples: list[dict], task: str, enc: Encoder, seq_len: int, names: list[str]) -> dict[str, np.ndarray]:
    """``{"tokens", "mask", "labels"}`` int32 arrays with one row per example (see :mod:`jzero.tasks`), plus for
    tagging ``word_pos`` ``[N, max_words]``: the token index of each word's tag (-1: truncated or padding),
    ``truncated`` ``[N]`` (bool): the example did not fit ``seq_len``, and ``length`` ``[N]`` (int): the
    ``seq_len`` that would hold the whole example ([CLS] and [SEP] included), so truncation can be reported."""
    index = {n: i for i, n in enumerate(names)}
    N = len(examples)
    tokens = np.full((N, seq_len), enc.pad_id, np.int32)
    mask = np.zeros((N, seq_len), np.int32)
    truncated = np.zeros((N,), bool)
    length = np.zeros((N,), np.int64)
    if task == "classification":
        labels = np.array([index[str(ex["label"])] for ex in examples], np.int32)
        for r, ex in enumerate(examples):
            body = enc.encode_text(ex["text"])
            ids, kept = _frame(body, enc, seq_len)
            tokens[r, :len(ids)], mask[r, :len(ids)], truncated[r] = ids, 1, kept < len(body)
            length[r] = len(body) + 2
        return {"tokens": tokens, "mask": mask, "labels": labels, "truncated": truncated, "length": length}
    labels = np.full((N, seq_len), IGNORE, np.int32)
    word_pos = np.full((N, max(len(ex["tokens"]) for ex in examples)), -1, np.int32)
    for r, ex in enumerate(examples):
        body, first = enc.encode_words(ex["tokens"])
        ids, kept = _frame(body, enc, seq_len)
        truncated[r], length[r] = kept < len(body), len(body) + 2
        tokens[r, :len(ids)], mask[r, :len(ids)] = ids, 1
        for w, (pos, tag) in enumerate(zip(first, ex["tags"])):
            if 0 <= pos < kept:
                labels[r, pos + 1] = index[tag]   # +1: [CLS]
                word_pos[r, w] = pos + 1
    return {"tokens": tokens, "mask": mask, "labels": labels, "word_pos": word_pos, "truncated": truncated,
            "length": length}


def word_tags(pred_NxT: np.ndarray, word_pos: np.ndarray, examples: list[dict], names: list[str]) -> list[list[str]]:
    """Predicted tag per word (the tag at its first token; 'O' for words lost to truncation)."""
    out = []
    for r, ex in enumerate(examples):
        n = len(ex["tokens"])
        out.append([names[pred_NxT[r, p]] if p >= 0 else "O" for p in word_pos[r, :n]])
    return out


# --------------------------------------------------------------------------- the embedded synthetic sets


TOPICS = {
    "sports": ["goal", "match", "team", "coach", "referee", "stadium", "score", "league", "player", "tournament",
               "ball", "season"],
    "weather": ["rain", "storm", "cloud", "forecast", "wind", "snow", "sunshine", "thunder", "fog", "temperature",
                "humidity", "breeze"],
    "food": ["recipe", "soup", "bread", "kitchen", "chef", "flavor", "dinner", "spice", "oven", "salad", "cheese",
             "dessert"],
    "music": ["song", "guitar", "concert", "melody", "band", "album", "drum", "lyrics", "singer", "chorus",
              "rhythm", "piano"],
}
_SUBJECTS = ["my friend", "the neighbor", "our teacher", "a stranger", "everyone", "the reporter", "my aunt"]
_VERBS = ["talked about", "wrote about", "remembered", "mentioned", "asked about", "laughed at", "described"]
_ADJS = ["new", "old", "strange", "famous", "quiet", "long", "best", "odd"]
_TAILS = ["today", "again", "at night", "last week", "for hours", "twice", ""]


def synthetic_classification(n: int, seed: int) -> list[dict]:
    """Sentences about one of 4 topics: two words of the topic, and in a third of them one distractor word from
    another topic, so the class is the topic holding the majority of topic words (chance: 25%)."""
    rng = np.random.default_rng(seed)
    topics = sorted(TOPICS)
    out = []
    for _ in range(n):
        label = topics[rng.integers(len(topics))]
        w1, w2 = rng.choice(TOPICS[label], 2, replace=False)
        words = [str(rng.choice(_SUBJECTS)), str(rng.choice(_VERBS)), "the", str(rng.choice(_ADJS)), w1, "and",
                 "the", w2]
        if rng.random() < 1 / 3:
            other = topics[(topics.index(label) + rng.integers(1, len(topics))) % len(topics)]
            words.insert(int(rng.choice([2, 5, 8])), f"a {rng.choice(TOPICS[other])} and")
        tail = str(rng.choice(_TAILS))
        out.append({"text": " ".join(words + ([tail] if tail else [])), "label": label})
    return out


NAMES = {
    "PER": ["Alice", "Bob", "Maria", "Omar", "Chen", "Priya", "Lars", "Fatima", "Diego", "Yuki", "Noah", "Elena",
            "Alice Smith", "Omar Garcia", "Chen Kim", "Priya Okafor", "Lars Novak", "Elena Rossi"],
    "LOC": ["Paris", "Lagos", "Tokyo", "Lima", "Oslo", "Cairo", "Berlin", "Quito", "New York", "Buenos Aires",
            "Cape Town", "San Diego"],
    "ORG": ["Acme Corp", "Globex", "Initech", "Umbrella Labs", "Hooli", "Vandelay Imports", "Stark Industries",
            "Wayne Enterprises", "Tyrell", "Cyberdyne"],
}
_NER_TEMPLATES = [
    "{PER} moved to {LOC} to work for {ORG} .",
    "{ORG} hired {PER} last year .",
    "yesterday {PER} met {PER} in {LOC} .",
    "the office of {ORG} in {LOC} is closed .",
    "{PER} said that {ORG} will open in {LOC} .",
    "we flew from {LOC} to {LOC} with {PER} .",
    "{PER} and {PER} left {ORG} in March .",
    "people in {LOC} like the products of {ORG} .",
]


def synthetic_ner(n: int, seed: int) -> list[dict]:
    """Template sentences with PER/LOC/ORG slots filled from small name lists (some names two words: B- then
    I-), words split on spaces, IOB2 tags."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        tokens, tags = [], []
        for word in _NER_TEMPLATES[rng.integers(len(_NER_TEMPLATES))].split():
            if word.startswith("{"):
                kind = word[1:-1]
                parts = str(rng.choice(NAMES[kind])).split()
                tokens += parts
                tags += [f"B-{kind}"] + [f"I-{kind}"] * (len(parts) - 1)
            else:
                tokens.append(word)
                tags.append("O")
        out.append({"tokens": tokens, "tags": tags})
    return out


SYNTHETIC = {"classification": synthetic_classification, "token_classification": synthetic_ner}
