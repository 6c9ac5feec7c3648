#!/usr/bin/env python3
"""Regenerate 3seqs.txt, the course's three-sequence toy corpus.

3333 lines cycling through three space-separated integer sequences:
counting 0..999, the even numbers 0..998, and the powers of two 1..2^99.
A model that learns it must learn to count, to step by two, and to double.

    python tools/make_3seqs.py            # writes 3seqs.txt beside the repository root
"""

import sys
from pathlib import Path

from pico_module import OneLineErrorParser, write_text_atomically

NUM_LINES = 3333
SEQUENCES = (
    [str(n) for n in range(1000)],        # counting
    [str(n) for n in range(0, 1000, 2)],  # even numbers
    [str(2 ** n) for n in range(100)],    # powers of two, exact integers
)


def three_sequence_lines(num_lines: int = NUM_LINES) -> list[str]:
    return [" ".join(SEQUENCES[i % len(SEQUENCES)]) for i in range(num_lines)]


def main() -> int:
    parser = OneLineErrorParser(prog="tools/make_3seqs.py", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent.parent / "3seqs.txt")
    args = parser.parse_args()
    try:
        write_text_atomically(args.out, "".join(line + "\n" for line in three_sequence_lines()))
    except OSError as error:
        print(f"make_3seqs: error: cannot write {args.out} ({error.strerror}); choose another --out",
              file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
