"""The data folder is found lazily: `import llmeasyquant` never looks for it,
and a folder that cannot be entered on the way up is skipped (issue 14)."""

import pathlib
import subprocess
import sys

from llmeasyquant import data


def test_unreadable_folder_on_the_way_is_skipped(monkeypatch, tmp_path):
    real_is_dir = pathlib.Path.is_dir

    def is_dir(self, *a, **k):
        if self.name == "wikitext-2" and "shared" in self.parts:
            raise PermissionError(13, "Permission denied", str(self))
        return real_is_dir(self, *a, **k)

    monkeypatch.delenv("LLMEQ_DATA_DIR", raising=False)
    monkeypatch.setattr(pathlib.Path, "is_dir", is_dir)
    monkeypatch.chdir(tmp_path)
    assert data.data_dir() == tmp_path.resolve().parent / "shared" / "data"


def test_import_does_not_look_for_data():
    code = ("import pathlib\n"
            "def boom(self, *a, **k):\n"
            "    if 'shared' in self.parts: raise PermissionError(13, 'Permission denied', str(self))\n"
            "    return orig(self, *a, **k)\n"
            "orig = pathlib.Path.is_dir; pathlib.Path.is_dir = boom\n"
            "import llmeasyquant, llmeasyquant.cli, llmeasyquant.compare, llmeasyquant.eval.perplexity\n"
            "llmeasyquant.cli.build_parser()\n"
            "print('imported')\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "imported" in r.stdout, r.stderr[-2000:]


def test_old_constants_still_read():
    assert data.DEFAULT_EVAL_FILE.endswith("wiki.test.raw")
    assert data.DEFAULT_CALIB_FILE.endswith("wiki.valid.tokens")
