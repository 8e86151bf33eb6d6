"""Near-duplicate detection: MinHash signatures over word 5-gram shingles.

Two texts are near-duplicates when the Jaccard similarity of their sets of word 5-grams
(lower-cased, whitespace-normalised) is at least :data:`NEAR_DUPLICATE` = 0.8, the usual
setting for web-scale LLM data deduplication (Lee et al. 2022, "Deduplicating Training Data
Makes Language Models Better"). The similarity is estimated from 128 MinHash values (Broder
1997): the fraction of positions where two signatures agree, with a standard error of at most
0.045, so a pair at 0.8 is told from one at 0.6 with near certainty.
"""

from __future__ import annotations

import hashlib
import re

import numpy as np

NEAR_DUPLICATE = 0.8
PERMUTATIONS = 128
SHINGLE_WORDS = 5
_PRIME = np.uint64(4294967311)  # the first prime above 2**32
_rng = np.random.default_rng(20240601)  # fixed: signatures must compare across machines
_A = _rng.integers(1, 2**31, PERMUTATIONS, dtype=np.uint64)
_B = _rng.integers(0, 2**32, PERMUTATIONS, dtype=np.uint64)


def shingles(text: str) -> set[int]:
    """32-bit hashes of the text's word 5-grams (the whole text if it is shorter)."""
    words = re.findall(r"\w+", text.lower())
    n = SHINGLE_WORDS
    grams = [" ".join(words[i : i + n]) for i in range(max(1, len(words) - n + 1))]
    return {int.from_bytes(hashlib.blake2b(g.encode(), digest_size=4).digest(), "little")
            for g in grams}


def signature(text: str) -> np.ndarray:
    """The MinHash signature of ``text``: ``PERMUTATIONS`` uint32 values."""
    x = np.fromiter(shingles(text), dtype=np.uint64)
    low = np.full(PERMUTATIONS, _PRIME, dtype=np.uint64)
    for start in range(0, len(x), 1 << 14):  # bounded memory for long texts
        chunk = x[start : start + (1 << 14)]
        # (a * x + b) mod p with a < 2**31, x < 2**32: no uint64 overflow.
        hashed = (_A[:, None] * chunk[None, :] + _B[:, None]) % _PRIME
        low = np.minimum(low, hashed.min(axis=1))
    return low.astype(np.uint32)


def similarity(a: np.ndarray, b: np.ndarray) -> float:
    """Estimated Jaccard similarity of the texts behind two signatures."""
    return float(np.mean(a == b))
