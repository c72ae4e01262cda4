"""A generated corpus of "articles" of any size, for the streaming tests and tools/benchmark_data.

Articles are ~4.5 KB of English-like prose (sentences drawn from a fixed pool of 20,000, made of
Zipf-distributed words), one JSON object {"id", "title", "text"} a line, so that 10^4 articles
are ~45 MB and 10^6 ~4.5 GB. Everything is seeded: the same call writes the same bytes.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

_SYLLABLES = ("ka", "lo", "mi", "ther", "an", "pre", "dis", "con", "tion", "al", "ing", "er",
              "ent", "ive", "med", "ic", "leg", "ist", "ure", "ment", "ro", "ba", "ci", "ous")
_COMMON = ("the", "of", "and", "to", "in", "a", "is", "that", "for", "with", "as", "by", "on",
           "was", "patient", "court", "case", "study", "law", "treatment", "evidence", "trial")


def _sentences(rng: np.random.Generator, count: int) -> list[str]:
    coined = ["".join(rng.choice(_SYLLABLES, size=rng.integers(1, 4))) for _ in range(3000)]
    words = np.array(list(_COMMON) + coined)
    weights = 1.0 / np.arange(1, len(words) + 1)
    weights /= weights.sum()
    out = []
    for _ in range(count):
        picked = rng.choice(words, size=int(rng.integers(8, 30)), p=weights)
        out.append(" ".join(picked).capitalize() + ".")
    return out


def write_articles(path: Path, count: int, *, seed: int = 0, mean_sentences: int = 44) -> Path:
    """Write `count` articles as JSON Lines to `path` (returned)."""
    rng = np.random.default_rng(seed)
    pool = _sentences(rng, 20_000)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as fh:
        for start in range(0, count, 10_000):
            n = min(10_000, count - start)
            sizes = np.maximum(1, rng.poisson(mean_sentences, size=n))
            picks = rng.integers(0, len(pool), size=int(sizes.sum()))
            at = 0
            lines = []
            for k, size in enumerate(sizes):
                body = " ".join(pool[i] for i in picks[at:at + size])
                at += size
                lines.append(json.dumps({"id": start + k, "title": pool[picks[at - 1]][:40],
                                         "text": body}))
            fh.write("\n".join(lines) + "\n")
    return path
