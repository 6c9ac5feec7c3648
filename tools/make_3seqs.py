#!/usr/bin/env python3
"""Regenerate 3seqs.txt, the course's three-sequence toy corpus.

3333 lines cycling through three space-separated integer sequences:
counting 0..999, the even numbers 0..998, and the powers of two 1..2^99.
A model that learns it must learn to count, to step by two, and to double.

    python tools/make_3seqs.py            # writes 3seqs.txt beside the repository root
"""

import sys
from pathlib import Path

from pico_module import (OneLineErrorParser, path_text, run_tool, write_text_atomically,
                         tool_description)

NUM_LINES = 3333
SEQUENCES = (
    [str(n) for n in range(1000)],        # counting
    [str(n) for n in range(0, 1000, 2)],  # even numbers
    [str(2 ** n) for n in range(100)],    # powers of two, exact integers
)


def three_sequence_lines(num_lines: int = NUM_LINES) -> list[str]:
    return [" ".join(SEQUENCES[i % len(SEQUENCES)]) for i in range(num_lines)]


def is_3seqs_corpus(path: Path, corpus: bytes) -> bool:
    """Whether the regular file `path` is empty, the corpus or its start (a write cut short):
    the files --out may write over. One that goes on past the corpus (lines added) is not."""
    if not path.is_file():   # a directory, or a FIFO whose read would block
        return False
    try:
        with open(path, "rb") as file:
            return corpus.startswith(file.read(len(corpus) + 1))
    except OSError:
        return False


def main() -> int:
    parser = OneLineErrorParser(prog="tools/make_3seqs.py", description=tool_description(__doc__))
    parser.add_argument("--out", type=path_text,
                        default=str(Path(__file__).resolve().parent.parent / "3seqs.txt"))
    out = Path(parser.parse_args().out)
    corpus = "".join(line + "\n" for line in three_sequence_lines())
    if out.exists() and not is_3seqs_corpus(out, corpus.encode()):
        print(f"make_3seqs: error: --out {out} already exists and is not a 3seqs corpus; choose "
              "another --out (or delete it)", file=sys.stderr)
        return 2
    try:
        write_text_atomically(out, corpus)
    except OSError as error:
        print(f"make_3seqs: error: cannot write {out} ({error.strerror}); choose another --out",
              file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(run_tool(main, "make_3seqs"))
