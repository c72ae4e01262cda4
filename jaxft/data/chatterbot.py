"""Built-in real data that works offline: the English ChatterBot corpus from PyPI.

`pip install --no-deps chatterbot-corpus==1.3.3` ships 21 topic files (`data/english/*.yml`), each
with `conversations`: lists whose first string is a user question and whose following strings
are answers to it. The package is located with `find_spec` and never imported (importing it
pulls in the chatterbot machinery, which we have no use for). Four sources come from it:

- `chatterbot:chat` - `messages` rows, one per distinct (question, answer) pair: user, assistant.
- `chatterbot:topics` - `classification` rows, text = question, label = topic file stem.
- `chatterbot:preferences` - conversational preference pairs for DPO, one per chat row: the
  question as the prompt, its corpus answer chosen, and rejected an answer the corpus gives to a
  question of another topic (picked by a hash of the pair, so the file never moves): fluent,
  on-register, and wrong for the question, which is what preference tuning should learn to tell.
- `chatterbot:prompts` - GRPO prompts, one per distinct question: a conversational `prompt`
  (the user's question), with its first corpus `answer` and its `topic` as extra columns for
  reward functions.

The eval split is fixed: a question goes to eval when a hash of its text falls in the lowest 10%,
so all answers to one question land on the same side and the split never depends on the config.
"""

from __future__ import annotations

import glob
import hashlib
import importlib.util
import os

import datasets
import yaml

from jaxft.data.files import Loaded, Origin
from jaxft.errors import JaxftError

SOURCES = ("chatterbot:chat", "chatterbot:topics", "chatterbot:preferences", "chatterbot:prompts")
EVAL_FRACTION = 0.1
_INSTALL = "pip install --no-deps chatterbot-corpus==1.3.3"


def corpus_files() -> list[str]:
    """The English topic files, sorted, or a JaxftError saying how to install them."""
    spec = importlib.util.find_spec("chatterbot_corpus")
    if spec is None or not spec.submodule_search_locations:
        raise JaxftError(f"built-in chatterbot data needs the corpus package: {_INSTALL}")
    root = spec.submodule_search_locations[0]
    paths = sorted(glob.glob(os.path.join(root, "data", "english", "*.yml")))
    if not paths:
        raise JaxftError(f"{root} holds no data/english/*.yml files; reinstall: {_INSTALL}")
    return paths


def qa_pairs() -> tuple[list[tuple[str, str, str]], list[str]]:
    """Distinct (topic, question, answer) triples in file order, and where each skipped entry is
    and why.

    Entries that are not a list of strings (one trivia entry is a lone string with its answer run
    into it by a YAML indentation slip) are skipped and counted, not guessed at.
    """
    seen: set[tuple[str, str, str]] = set()
    triples, skipped = [], []
    for path in corpus_files():
        topic = os.path.splitext(os.path.basename(path))[0]
        with open(path, encoding="utf-8") as fh:
            doc = yaml.safe_load(fh)
        conversations = doc.get("conversations") if isinstance(doc, dict) else None
        for number, conv in enumerate(conversations or [], start=1):
            where = f"{path} conversation {number}"
            if not (isinstance(conv, list) and len(conv) >= 2 and isinstance(conv[0], str)):
                skipped.append(f"{where}: not a question followed by answers "
                               f"({type(conv).__name__} {str(conv)[:40]!r})")
                continue
            question = conv[0].strip()
            for answer in conv[1:]:
                if not isinstance(answer, str) or not answer.strip() or not question:
                    skipped.append(f"{where}: an empty question or answer")
                    continue
                key = (topic, question, answer.strip())
                if key not in seen:
                    seen.add(key)
                    triples.append(key)
    return triples, skipped


def _hash(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little")


def is_eval(question: str) -> bool:
    return _hash(question) < EVAL_FRACTION * 2**64


def preference_rows(triples: list[tuple[str, str, str]]) -> tuple[list[dict], list[str]]:
    """One conversational pair per distinct (question, answer), and each row's question."""
    first_topic = {}
    for topic, q, a in triples:
        first_topic.setdefault((q, a), topic)
    answers = list(first_topic.items())  # ((question, answer), topic)
    rows, questions = [], []
    for (q, a), topic in answers:
        others = [other for (q2, other), t2 in answers if t2 != topic and q2 != q and other != a]
        rejected = others[_hash(q + "\0" + a) % len(others)]
        rows.append({"prompt": [{"role": "user", "content": q}],
                     "chosen": [{"role": "assistant", "content": a}],
                     "rejected": [{"role": "assistant", "content": rejected}]})
        questions.append(q)
    return rows, questions


def load(name: str) -> tuple[Loaded, Loaded]:
    """(train, eval) rows of a built-in source."""
    if name not in SOURCES:
        raise JaxftError(f"unknown built-in source '{name}'; expected one of {', '.join(SOURCES)}")
    triples, skipped = qa_pairs()
    if name == "chatterbot:chat":
        pairs = list(dict.fromkeys((q, a) for _, q, a in triples))  # same pair in two topics: once
        rows = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
                for q, a in pairs]
        questions = [q for q, _ in pairs]
    elif name == "chatterbot:preferences":
        rows, questions = preference_rows(triples)
    elif name == "chatterbot:prompts":  # GRPO: each question once, its first answer beside it
        first = {}
        for topic, q, a in triples:
            first.setdefault(q, (a, topic))
        rows = [{"prompt": [{"role": "user", "content": q}], "answer": a, "topic": topic}
                for q, (a, topic) in first.items()]
        questions = list(first)
    else:
        texts = list(dict.fromkeys((q, topic) for topic, q, _ in triples))
        rows = [{"text": q, "label": topic} for q, topic in texts]
        questions = [q for q, _ in texts]
    held = [is_eval(q) for q in questions]
    train = [r for r, h in zip(rows, held, strict=True) if not h]
    evals = [r for r, h in zip(rows, held, strict=True) if h]
    return (_loaded(train, f"{name}[train]", skipped),
            _loaded(evals, f"{name}[eval]", []))


def _loaded(rows: list[dict], label: str, skipped: list[str]) -> Loaded:
    ds = datasets.Dataset.from_list(rows)
    ds = ds.add_column("_file", [0] * len(ds)).add_column("_row", range(1, len(ds) + 1))
    return Loaded(ds, Origin((label,), "pair"), len(skipped), skipped[0] if skipped else "")
