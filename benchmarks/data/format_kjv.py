"""Turn the output of `bible -p PATH ruth1:1-4:22` into ruth-kjv.txt (see README.md): one paragraph per chapter."""

import re
import sys


def main(raw: str) -> str:
    chapters = []
    for block in re.split(r"\n(?=Ruth \d+\n)", raw.strip()):
        head, _, body = block.strip().partition("\n")
        verses = re.split(r"\s*\b\d+ (?=[A-Z])", " ".join(body.split()))
        chapters.append(f"Chapter {head.split()[1]}\n\n" + " ".join(v.strip() for v in verses if v.strip()))
    return "The Book of Ruth (King James Version, 1611)\n\n" + "\n\n".join(chapters) + "\n"


if __name__ == "__main__":
    sys.stdout.write(main(open(sys.argv[1]).read()))
