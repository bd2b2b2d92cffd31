"""``torchrun --nproc_per_node P -m llmeasyquant.distributed quantize MODEL --method M --out DIR``:
the CLI's quantize command with ``--distributed`` implied."""

import sys

from ..cli import main

if __name__ == "__main__":
    argv = sys.argv[1:]
    if not argv or argv[0] != "quantize":
        print("usage: torchrun --nproc_per_node P -m llmeasyquant.distributed quantize MODEL --method NAME "
              "--out DIR [options of `llmeasyquant quantize --help`]", file=sys.stderr)
        sys.exit(2)
    sys.exit(main(["quantize", "--distributed", *argv[1:]]))
