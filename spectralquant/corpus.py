"""Real English text that ships with the package, for calibration and evaluation offline.

``data/cfi_en.txt`` is the English translation of Linus Walleij's book "Copyright Does Not Exist"
(public domain; Debian package ``cfi-en``), HTML stripped, about 500 KB. Its first half (preface
to chapter 7) is the calibration split and the rest the evaluation split, so perplexity is never
measured on calibration text. ``pydoc_topics()`` is Python's own help text, always available.
"""

from __future__ import annotations

import functools
from importlib import resources

SPLITS = ("calibration", "evaluation")


@functools.cache
def _book() -> str:
    return resources.files("spectralquant").joinpath("data/cfi_en.txt").read_text(encoding="utf-8")


def book_text(split: str = "calibration") -> str:
    """One split of the bundled book (paragraphs separated by newlines)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    text = _book()
    cut = text.index("\n", len(text) // 2)
    return text[:cut] if split == "calibration" else text[cut + 1 :]


def pydoc_topics() -> str:
    """Python's bundled help topics (about 460 KB of technical English)."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


def default_calibration_texts() -> list[str]:
    """The default calibration corpus: the calibration split of the book, as one long document
    (long documents give keys at many positions, which post-RoPE bases need)."""
    return [book_text("calibration")]
