"""The answer matcher the judges share: SQuAD-style normalisation (case, punctuation, articles, currency, thousands
separators, number words) and token F1 (Rajpurkar et al. 2016, the official evaluation script's ``f1_score``)."""
from __future__ import annotations

import re
import unicodedata
from collections import Counter

_CURRENCY = re.compile(r"[$€£¥₹¢]|\b(?:usd|eur|gbp|dollars?|euros?|pounds?)\b")
_THOUSANDS = re.compile(r"(?<![\d.])(\d{1,3}(?:,\d{3})+)(?=\D|$)")
_SPACE_THOUSANDS = re.compile(r"(?<![\d.])(\d{1,3}(?: \d{3})+)(?=\.\d)")  # "2 657.81" (space-grouped, decimals)
_NUMBER = re.compile(r"(?<![\w.])(\d+)\.(\d+)(?![\w])")
_ARTICLES = re.compile(r"\b(?:a|an|the)\b")
_NUMBER_WORDS = {w: str(i) for i, w in enumerate(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
    "seventeen eighteen nineteen twenty".split())}
_PUNCT = re.compile(r"[^\w\s.]|(?<!\d)\.|\.(?!\d)|_")


def normalize_answer(text: str | None) -> str:
    """Normalise an answer or ideal for matching; returns space-separated lowercase tokens.

    Steps, in order: Unicode NFKC; lowercase; currency symbols and words ($ € £ ¥ ₹ ¢, usd/eur/gbp, dollar(s),
    euro(s), pound(s)) removed; thousands separators dropped (``2,099.00`` → ``2099.00``; a space separator
    only before a decimal part, ``2 657.81`` → ``2657.81``, since NFKC turns no-break spaces into spaces); decimals written
    canonically (``2099.00`` → ``2099``, ``4.50`` → ``4.5``); punctuation (everything but letters, digits and
    a decimal point between digits) → space; English articles a/an/the removed (as in the SQuAD evaluation
    script, Rajpurkar et al. 2016); the number words zero…twenty → digits ("three times" = "3 times");
    whitespace collapsed. ``None`` → ``""``.
    """
    if not text:
        return ""
    s = unicodedata.normalize("NFKC", text).lower()
    s = _CURRENCY.sub(" ", s)
    s = _THOUSANDS.sub(lambda m: m.group(1).replace(",", ""), s)
    s = _SPACE_THOUSANDS.sub(lambda m: m.group(1).replace(" ", ""), s)

    def _dec(m):
        frac = m.group(2).rstrip("0")
        return m.group(1) + ("." + frac if frac else "")

    s = _NUMBER.sub(_dec, s)
    s = _PUNCT.sub(" ", s)
    s = _ARTICLES.sub(" ", s)
    return " ".join(_NUMBER_WORDS.get(w, w) for w in s.split())


def token_f1(prediction: str | None, reference: str | None) -> float:
    """SQuAD token F1 (Rajpurkar et al. 2016) between normalised token bags; 0.0 if either side is empty.

    ``F1 = 2·P·R/(P+R)``, ``P = |pred ∩ ref| / |pred|``, ``R = |pred ∩ ref| / |ref|`` (multiset intersection).
    """
    p, r = normalize_answer(prediction).split(), normalize_answer(reference).split()
    if not p or not r:
        return 0.0
    same = sum((Counter(p) & Counter(r)).values())
    if same == 0:
        return 0.0
    prec, rec = same / len(p), same / len(r)
    return 2 * prec * rec / (prec + rec)
