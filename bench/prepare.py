"""How fast ``atoll prepare`` turns text into token shards, and what worker processes buy.

A generated JSON Lines corpus (``--mb`` MB of documents of words from a 70,000-word
vocabulary) is prepared four times: with the byte-level tokenizer and with a word-level
Hugging Face tokenizer of 70,000 ids (so uint32 shards), each with 1 and with 2 tokenising
processes. Each figure is input MB per second of the whole call, worker start-up included;
the ratio of 2 workers to 1 is the figure to read. Last, the peak memory numpy and Python
allocate (tracemalloc) while the byte-level run streams the corpus, against its size.

    python bench/prepare.py [--mb 32] [--smoke]
"""

from __future__ import annotations

import argparse
import itertools
import json
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np
from smoke import parse

from atoll.data.prepare import PrepareOptions, prepare

VOCAB = 70_000


def words(n: int) -> list[str]:
    """``n`` distinct pronounceable words: syllables, pairs of them, then triples."""
    syllables = [c + v for c in "bcdfghjklmnprstvwxyz" for v in "aeiou"]
    out = [*syllables, *map("".join, itertools.product(syllables, repeat=2))]
    return (out + list(map("".join, itertools.product(syllables, repeat=3))))[:n]


def save_word_tokenizer(path: Path) -> None:
    """A word-level Hugging Face tokenizer of ``VOCAB`` ids (end-of-text ``</s>``)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "</s>": 1}
    vocab.update((w, i + 2) for i, w in enumerate(words(VOCAB - 2)))
    model = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    model.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=model, eos_token="</s>", unk_token="<unk>",
                            pad_token="</s>").save_pretrained(path)


def write_corpus(path: Path, mb: float) -> None:
    """JSON Lines of documents of 20-400 random words, until ``mb`` MB."""
    vocab = np.array(words(VOCAB - 2))
    rng = np.random.default_rng(0)
    with open(path, "w") as f:
        while f.tell() < mb * 1e6:
            for _ in range(100):
                doc = " ".join(vocab[rng.integers(0, len(vocab), int(rng.integers(20, 400)))])
                f.write(json.dumps({"text": doc}) + "\n")


def rate(corpus: Path, out: Path, tokenizer: str, workers: int) -> float:
    """Input MB/s of one ``prepare`` call."""
    start = time.perf_counter()
    prepare([corpus], out, PrepareOptions(tokenizer=tokenizer, workers=workers), log=str)
    return corpus.stat().st_size / 1e6 / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=float, default=32.0, help="corpus size in MB")
    args = parse(ap, {"mb": 0.5})
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        save_word_tokenizer(tmp / "tok")
        corpus = tmp / "corpus.jsonl"
        write_corpus(corpus, args.mb)
        print(f"corpus: {corpus.stat().st_size / 1e6:.1f} MB of JSON Lines")
        print(f"{'tokenizer':<34}{'1 worker MB/s':>15}{'2 workers MB/s':>16}"
              f"{'ratio 2 / 1':>13}")
        for name, tok in (("byte-level (uint16)", ""),
                          (f"Hugging Face, {VOCAB:,} ids (uint32)", str(tmp / "tok"))):
            one = rate(corpus, tmp / "out", tok, 1)
            two = rate(corpus, tmp / "out", tok, 2)
            print(f"{name:<34}{one:15.1f}{two:16.1f}{two / one:12.2f}x")
        tracemalloc.start()
        prepare([corpus], tmp / "out", PrepareOptions(workers=1), log=str)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        print(f"peak memory allocated, byte-level: {peak / 1e6:.1f} MB for a "
              f"{corpus.stat().st_size / 1e6:.1f} MB corpus")


if __name__ == "__main__":
    main()
