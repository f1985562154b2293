#!/usr/bin/env python
"""Generate ``assets/pools/words.txt``: the most common English words.

The "words" text pool is the TextSpan baseline made of plain common words
(Gandelsman et al., ICLR 2024). Words come from ``wordfreq.top_n_list("en", ...)``
in frequency order and are filtered to ASCII alphabetic tokens of length >= 3
(no digits, apostrophes or hyphens), lower-cased and de-duplicated. The list is
read in growing chunks until ``--n`` words survive the filter, so the output
has exactly ``--n`` lines (default 3250, close to the size of
``assets/pools/general.txt``; the tests require the two pools within 5%).

The file is written atomically (temporary file in the same folder, then
``os.replace``), so readers never see a half-written pool.

Usage::

    python tools/make_words_pool.py                 # writes assets/pools/words.txt
    python tools/make_words_pool.py --n 5000 --out /tmp/words.txt
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

DEFAULT_N = 3250
DEFAULT_OUT = Path(__file__).resolve().parent.parent / "assets" / "pools" / "words.txt"
MIN_LEN = 3


# Profanity and slurs among the most frequent words: TextSpan shows a head's top texts
# in the demo and in reports, where these would be shown to visitors for no gain.
EXCLUDED = frozenset({
    "fuck", "fucking", "fucked", "fucker", "motherfucker", "shit", "shitty", "bullshit", "bitch", "bitches",
    "dick", "pussy", "cunt", "cock", "whore", "slut", "porn", "rape", "nigga", "nigger", "fag", "faggot", "retard",
})


def keep(word: str) -> bool:
    """True for ASCII alphabetic words of at least ``MIN_LEN`` letters, not in ``EXCLUDED``."""
    return len(word) >= MIN_LEN and word.isascii() and word.isalpha() and word.lower() not in EXCLUDED


def common_words(n: int, lang: str = "en") -> list[str]:
    """Return the ``n`` most frequent words of ``lang`` that pass :func:`keep`.

    Raises ``RuntimeError`` if wordfreq cannot supply that many.
    """
    try:
        from wordfreq import top_n_list
    except ImportError as exc:  # pragma: no cover - exercised only without wordfreq
        raise RuntimeError("wordfreq is not installed: pip install wordfreq") from exc
    if n <= 0:
        raise ValueError(f"--n must be positive, got {n}")
    fetch = max(2 * n, 1000)
    while True:
        raw = top_n_list(lang, fetch)
        out: list[str] = []
        seen: set[str] = set()
        for w in raw:
            w = w.strip().lower()
            if keep(w) and w not in seen:
                seen.add(w)
                out.append(w)
                if len(out) == n:
                    return out
        if len(raw) < fetch:  # wordfreq has no more words to give
            raise RuntimeError(f"wordfreq only yields {len(out)} usable '{lang}' words, asked for {n}")
        fetch *= 2


def write_atomic(lines: list[str], out: Path) -> None:
    """Write ``lines`` (one per line) to ``out`` via a temp file and ``os.replace``."""
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
            f.write("\n".join(lines) + "\n")
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; use normal file permissions
        os.replace(tmp, out)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description="Write the 'words' TextSpan pool: the N most common English words "
        "(wordfreq), alphabetic, length >= 3, one per line.")
    ap.add_argument("--n", type=int, default=DEFAULT_N,
                    help=f"number of words to write (default {DEFAULT_N}, about the size of general.txt)")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output file (default {DEFAULT_OUT})")
    ap.add_argument("--lang", default="en", help="wordfreq language code (default en)")
    args = ap.parse_args(argv)
    try:
        words = common_words(args.n, args.lang)
    except (RuntimeError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    write_atomic(words, args.out)
    print(f"wrote {len(words)} words to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
