"""Build the out-of-domain evaluation texts (issue 20): public English texts
of other kinds than WikiText, taken from Debian packages.

    python benchmarks/prepare_ood_texts.py --out /work/ood-texts

Each text comes from a Debian package fetched with ``apt-get download`` (the
package registry; nothing else is downloaded) and unpacked with ``dpkg-deb``
into a scratch folder; nothing is installed. Written to ``--out``:

    kjv.txt               King James Bible (bible-kjv + bible-kjv-text):
                          archaic narrative prose; verse numbers dropped, one
                          paragraph per chapter
    debian-reference.txt  the Debian Reference manual, plain-text edition
                          (debian-reference-en): technical prose, shell
                          commands, ASCII tables
    licenses.txt          the licence texts of /usr/share/common-licenses
                          (base-files): legal prose; each text once (the
                          package's aliases are symlinks, skipped)
    MANIFEST.json         package name and version, bytes and sha256 of each
                          text, so a later run can tell it has the same files

Why these: WikiText is encyclopaedic; these three are narrative, technical
and legal, each a register calibration text from Wikipedia does not cover,
and each reproducible from a package version. The script never overwrites a
text it did not write: an ``--out`` holding other files is refused unless it
has our MANIFEST.json.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

PACKAGES = ("bible-kjv", "bible-kjv-text", "debian-reference-en", "base-files")
LICENSES = ("Apache-2.0", "Artistic", "BSD", "CC0-1.0", "GFDL-1.3", "GPL-2", "GPL-3", "LGPL-2", "LGPL-2.1",
            "LGPL-3", "MPL-1.1", "MPL-2.0")
# "Ge1:1 In the beginning ..." -> book "Ge", chapter 1, verse 1, text.
VERSE = re.compile(r"^(?P<book>[1-3]?[A-Za-z]+)(?P<chapter>\d+):(?P<verse>\d+) (?P<text>.*)$")


def _run(cmd: list[str], cwd: Path) -> str:
    r = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stderr.strip()}")
    return r.stdout


def fetch(work: Path) -> dict[str, dict]:
    """apt-get download + dpkg-deb -x of every package; name -> {version, root}."""
    out = {}
    for name in PACKAGES:
        _run(["apt-get", "download", name], work)
        debs = sorted(work.glob(f"{name}_*.deb"))
        if len(debs) != 1:
            raise SystemExit(f"expected one {name}_*.deb in {work}, found {[d.name for d in debs]}")
        version = _run(["dpkg-deb", "--field", str(debs[0]), "Version"], work).strip()
        root = work / name
        root.mkdir()
        _run(["dpkg-deb", "-x", str(debs[0]), str(root)], work)
        out[name] = {"version": version, "root": root}
    return out


def kjv(pk: dict[str, dict]) -> str:
    """The whole Bible through the package's own reader, verse numbers dropped."""
    reader = pk["bible-kjv"]["root"] / "usr/bin/bible"
    data = pk["bible-kjv-text"]["root"] / "usr/lib"
    raw = _run([str(reader), "-f", "-p", str(data), "Gen1:1-Rev22:21"], data)
    paragraphs: list[list[str]] = []
    for line in raw.splitlines():
        m = VERSE.match(line.strip())
        if m is None:
            if line.strip():
                raise SystemExit(f"unexpected line from bible: {line[:80]!r}")
            continue
        if m["verse"] == "1":
            paragraphs.append([])
        paragraphs[-1].append(m["text"].strip())
    if len(paragraphs) != 1189:  # chapters in the KJV
        raise SystemExit(f"expected 1189 chapters from bible, got {len(paragraphs)}")
    return "\n\n".join(" ".join(p) for p in paragraphs) + "\n"


def debian_reference(pk: dict[str, dict]) -> str:
    p = pk["debian-reference-en"]["root"] / "usr/share/debian-reference/debian-reference.en.txt.gz"
    return gzip.decompress(p.read_bytes()).decode("utf-8")


def licenses(pk: dict[str, dict]) -> str:
    base = pk["base-files"]["root"] / "usr/share/common-licenses"
    texts = []
    for name in LICENSES:
        f = base / name
        if f.is_symlink() or not f.is_file():
            raise SystemExit(f"{f} is missing or a symlink; the licence list needs updating")
        texts.append(f.read_text(encoding="utf-8"))
    return "\n\n".join(t.strip() for t in texts) + "\n"


BUILDERS = {"kjv.txt": (kjv, ("bible-kjv", "bible-kjv-text")),
            "debian-reference.txt": (debian_reference, ("debian-reference-en",)),
            "licenses.txt": (licenses, ("base-files",))}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="folder for the texts and MANIFEST.json")
    args = ap.parse_args(argv)
    out = Path(args.out)
    if out.exists() and any(out.iterdir()) and not (out / "MANIFEST.json").is_file():
        raise SystemExit(f"{out} holds files this script did not write (no MANIFEST.json); choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    manifest = {}
    with tempfile.TemporaryDirectory() as tmp:
        pk = fetch(Path(tmp))
        for fname, (build, sources) in BUILDERS.items():
            data = build(pk).encode("utf-8")
            part = out / (fname + ".part")
            part.write_bytes(data)
            part.replace(out / fname)  # a stopped run leaves the old text whole
            manifest[fname] = {"packages": {s: pk[s]["version"] for s in sources}, "bytes": len(data),
                               "sha256": hashlib.sha256(data).hexdigest()}
            print(f"{fname}: {len(data):,} bytes from {manifest[fname]['packages']}")
    (out / "MANIFEST.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
