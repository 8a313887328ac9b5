"""How results read on a terminal: plural nouns, generated text made safe for a terminal, and rich
tables fitted to the terminal's width. Text in, text out: no torch, no model, no numbers computed.
"""

from __future__ import annotations

import re
from typing import Sequence

# A text column wider than this wraps (at word boundaries) instead of widening the table; it is
# never squeezed below it either, so a long text cell reads as lines of a few words, not letters.
WRAP_WIDTH = 28

_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def plural(n: int, noun: str, many: str | None = None) -> str:
    """'1 layer', '61 layers' (`many` for irregular plurals)."""
    return f"{n:,} {noun if n == 1 else many or noun + 's'}"


def terminal_safe(text: str) -> str:
    """Control characters (ESC, form feed, ...) shown escaped, as \\x1b; newline and tab kept."""
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


def fitted_tables(console, title: str, header: Sequence[str], rows: Sequence[Sequence[str]],
                  numeric: Sequence[bool], notes: Sequence[str] = ()) -> None:
    """Print one table of `rows` (cells as text; the first column labels the row) in as many
    parts as the console's width needs: each part repeats the label column and holds the columns
    that fit whole. Figures and short texts are never wrapped or cut; long texts wrap at words.
    Notes follow, wrapped to the width."""
    from rich import box
    from rich.table import Table
    from rich.text import Text

    width = console.width
    gap = 3  # between columns: padding, the box's blank divider, padding

    def longest(i: int) -> int:
        return max([len(r[i]) for r in rows] + [0])

    wraps = [not numeric[i] and longest(i) > WRAP_WIDTH for i in range(len(header))]
    # A heading may take two lines (10 characters a line) rather than widen a narrow column.
    fixed = [max(longest(i), min(len(header[i]), 10), *(len(w) for w in header[i].split()))
             for i in range(len(header))]
    least = [WRAP_WIDTH if wraps[i] else fixed[i] for i in range(len(header))]
    # The label column stays one line per row unless it leaves no room for the widest column.
    label_w = max(1, min(fixed[0], width - gap - max(least[1:], default=0)))

    parts: list[list[int]] = [[]]
    used = label_w
    for i in range(1, len(header)):
        if parts[-1] and used + gap + least[i] > width:
            parts.append([])
            used = label_w
        parts[-1].append(i)
        used += gap + least[i]

    def part(cols: list[int]):
        wrapping = [i for i in cols if wraps[i]]
        room = width - label_w - sum(fixed[i] + gap for i in cols if not wraps[i]) - gap * len(wrapping)
        t = Table(box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False)
        t.add_column(header[0], width=label_w)
        for i in cols:
            w = max(WRAP_WIDTH, min(longest(i), room // len(wrapping))) if wraps[i] else fixed[i]
            t.add_column(header[i], width=w, justify="right" if numeric[i] else "left", overflow="fold")
        for r in rows:
            t.add_row(Text(r[0]), *(Text(r[i]) for i in cols))
        return t

    console.print(Text(title, style="bold"))
    for n, cols in enumerate(parts):
        if n:
            console.print()
        console.print(part(cols))
    for note in notes:
        console.print(Text(note, style="dim"))
    console.print()
