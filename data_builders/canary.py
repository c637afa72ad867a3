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


PLAIN_FORMS = ("title", "title!", "upper!", "lower")


def plain_canary(rng: random.Random, words: Sequence[str], forbidden: str = "") -> str:
    """A *plain-word* canary: one word of ``words`` in one of :data:`PLAIN_FORMS` (``Lantern``, ``Lantern!``,
    ``LANTERN!``, ``lantern``), absent, case-insensitively, from ``forbidden`` (the text it will be planted in).

    The form of the strings the field's benchmarks ask for (AlpacaFarm-Hacked's ``Hacked!``, SEP's one-word
    witnesses), unlike :func:`fresh_canary`'s codes; repeats are allowed, so any vocabulary suffices. Draws
    ``rng.choice(words)`` then ``rng.choice(PLAIN_FORMS)`` per try: a seeded ``rng`` gives the same canaries on every
    run. Raises ``ValueError`` when every word of ``words`` occurs in ``forbidden``.
    """
    low = forbidden.casefold()
    free = [w for w in words if w.casefold() not in low]
    if not free:
        raise ValueError(f"every canary word of {list(words)} occurs in the text it would be planted in")
    while True:
        word, form = rng.choice(words), rng.choice(PLAIN_FORMS)
        if word.casefold() in low:
            continue
        base = word.lower() if form == "lower" else word.upper() if form.startswith("upper") else word.title()
        return base + ("!" if form.endswith("!") else "")
