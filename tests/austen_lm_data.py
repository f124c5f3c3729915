"""How edgepeft/data/austen-lm/ was made from the six novels (../shared/data/austen-novels/, public domain).

    python tests/austen_lm_data.py ../shared/data/austen-novels edgepeft/data/austen-lm

Each novel becomes paragraphs (blank-line separated, lines joined, title and chapter/volume headings dropped).
`emma-train.txt` holds Emma's first paragraphs up to TRAIN_WORDS words; `heldout/NOVEL.txt` holds each novel's
last paragraphs, at least HELDOUT_WORDS words, before "FINIS" (for Emma, text the training part never reaches).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

NOVELS = ("emma", "mansfieldpark", "northangerabbey", "persuasion", "prideprejudice", "sensesensibility")
TARGET = "emma"
TRAIN_WORDS = 20_000
HELDOUT_WORDS = 1_500
HEADING = re.compile(r"^(CHAPTER|VOLUME|FINIS|By Jane Austen|[A-Z][A-Z ,.']*$)")


def paragraphs(text: str) -> list[str]:
    """The novel's paragraphs, each on one line; headings and the title dropped."""
    out = []
    for block in re.split(r"\n\s*\n", text):
        lines = [line.strip() for line in block.splitlines() if line.strip()]
        if not lines or (len(lines) == 1 and HEADING.match(lines[0])):
            continue
        out.append(" ".join(lines))
    return out


def take_words(parts: list[str], words: int) -> list[str]:
    """Leading paragraphs holding at least `words` words."""
    taken, count = [], 0
    for part in parts:
        if count >= words:
            break
        taken.append(part)
        count += len(part.split())
    return taken


def derive(novels: Path) -> dict[str, str]:
    """File name -> text of the shipped data set."""
    files = {}
    for novel in NOVELS:
        parts = paragraphs((novels / f"{novel}.txt").read_text(encoding="utf-8"))
        tail = take_words(parts[::-1], HELDOUT_WORDS)[::-1]
        files[f"heldout/{novel}.txt"] = "\n\n".join(tail) + "\n"
        if novel == TARGET:
            train = take_words(parts[: len(parts) - len(tail)], TRAIN_WORDS)
            files[f"{novel}-train.txt"] = "\n\n".join(train) + "\n"
    return files


if __name__ == "__main__":
    source, target = Path(sys.argv[1]), Path(sys.argv[2])
    for name, text in derive(source).items():
        (target / name).parent.mkdir(parents=True, exist_ok=True)
        (target / name).write_text(text, encoding="utf-8")
