"""Canaries: unique ``WORD-NNN(N)`` strings that an injection asks the model to write.

One generator for the training canaries (``data_builders/triplets.py``), the held-out set
(``evaluation/heldout/build.py``) and BIPIA conversions (``evaluation/bipia_convert.py``); each passes its own
vocabulary, so the three never share a canary (``tests/test_heldout.py`` checks the vocabularies are disjoint).
"""
from __future__ import annotations

import random
from typing import Sequence


def fresh_canary(rng: random.Random, words: Sequence[str], used: set[str], forbidden: str = "",
                 digits: int = 4) -> str:
    """A canary ``WORD-N…N`` (``digits`` digits, no leading zero) not in ``used`` and absent, case-insensitively,
    from ``forbidden`` (the text it will be planted in); it is added to ``used``.

    Draws ``rng.choice(words)`` then ``rng.randint`` per try, so a seeded ``rng`` gives the same canaries on every
    run. Raises ``ValueError`` when every combination is used.
    """
    lo, hi = 10 ** (digits - 1), 10 ** digits - 1
    if len(used) >= len(words) * (hi - lo + 1):
        raise ValueError(f"all {len(words) * (hi - lo + 1)} canaries of this vocabulary are used; add words")
    low = forbidden.casefold()
    while True:
        c = f"{rng.choice(words)}-{rng.randint(lo, hi)}"
        if c not in used and c.casefold() not in low:
            used.add(c)
            return c
