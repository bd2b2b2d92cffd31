"""QLinear vs peers on the CPU (the code is ``llmeasyquant.bench``, also the
``llmeasyquant bench`` command); this script records the table in
docs/benchmarks.md.

Run:  OMP_WAIT_POLICY=ACTIVE python benchmarks/bench_qlinear.py [--write-docs]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import llmeasyquant as lq
from llmeasyquant import bench
from llmeasyquant.cli import add_bench_arguments, bench_options


def write_docs(table: str, header: str, path: Path, isa: str) -> None:
    """Replace this ISA tier's table in the docs (each tier keeps its own)."""
    tag = "bench_qlinear" if isa == "avx512_vnni" else f"bench_qlinear:{isa}"
    begin, end = f"<!-- {tag}:begin -->", f"<!-- {tag}:end -->"
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    block = f"{begin}\n{header}\n\n{table}\n{end}"
    if begin in text and end in text:
        text = text[: text.index(begin)] + block + text[text.index(end) + len(end):]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)  # never leave a half-written docs file


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_bench_arguments(p)
    p.add_argument("--write-docs", action="store_true", help="write the table into docs/benchmarks.md")
    args = p.parse_args(argv)
    cmd = "OMP_WAIT_POLICY=" + os.environ.get("OMP_WAIT_POLICY", "(unset)") + " python " + " ".join(
        ["benchmarks/bench_qlinear.py"] + (argv if argv is not None else sys.argv[1:]))
    header, table = bench.run(**bench_options(args), command=cmd)
    print()
    print(header)
    print()
    print(table)
    if args.write_docs:
        write_docs(table, header, Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md",
                   lq.build_info()["cpu_isa_active"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
