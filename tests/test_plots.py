"""Figure titles read as written: the gap between words is visible in the PNG."""

import numpy as np
from PIL import Image, ImageDraw

from dmdctl.plots import draw_title


def ink_gaps(text: str) -> list[int]:
    img = Image.new("L", (400, 30), 255)
    draw_title(ImageDraw.Draw(img), (2, 4), text)
    cols = (np.asarray(img) < 128).any(axis=0)
    xs = np.flatnonzero(cols)
    return [int(b - a - 1) for a, b in zip(xs[:-1], xs[1:], strict=True) if b - a > 1]


def test_word_gaps_are_wider_than_letter_gaps():
    # "DMD one-step" has one space: its gap must stand out from every gap inside a word
    gaps = sorted(ink_gaps("DMD one-step"), reverse=True)
    inside_word = max(ink_gaps("DMDone-step"), default=0)
    assert gaps[0] >= 5 and gaps[0] >= 2 * max(inside_word, 1), (gaps, inside_word)
    # three spaces in "real score only x": three gaps wider than any gap inside a word
    wide = [g for g in ink_gaps("real score only x") if g >= 5]
    assert len(wide) == 3, ink_gaps("real score only x")
