"""The out-of-domain benchmark scripts (issue 20): text preparation refuses a
folder it did not write and reads the Bible reader's verse lines; the table's
ratios are each method's increase over RTN's; missing texts fail clearly."""

import importlib.util
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _load(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_prepare_refuses_a_folder_it_did_not_write(tmp_path):
    prep = _load("prepare_ood_texts")
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit, match="did not write"):
        prep.main(["--out", str(tmp_path)])
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_verse_lines_parse_to_book_chapter_verse_text():
    prep = _load("prepare_ood_texts")
    m = prep.VERSE.match("1Sa3:10 And the LORD came, and stood, and called as at other times, Samuel, Samuel.")
    assert (m["book"], m["chapter"], m["verse"]) == ("1Sa", "3", "10") and m["text"].startswith("And the LORD")
    assert prep.VERSE.match("SSol1:1 The song of songs, which is Solomon's.")["book"] == "SSol"
    assert prep.VERSE.match("not a verse") is None


def test_table_gives_each_increase_as_a_multiple_of_rtns():
    ood = _load("ood_perplexity")
    rows = [{"preset": "float", "tag": "", "ppl": {"wikitext": 10.0, "kjv": 20.0}, "quant_s": 0.0},
            {"preset": "rtn-w4-g64", "tag": "", "ppl": {"wikitext": 12.0, "kjv": 30.0}, "quant_s": 1.0},
            {"preset": "gptq-w4-g64", "tag": "generated", "ppl": {"wikitext": 11.0, "kjv": 23.0}, "quant_s": 90.0}]
    t = ood.table(rows).splitlines()
    assert t[0].startswith("| model | wikitext: ppl") and "kjv: ppl" in t[0]
    assert "| rtn-w4-g64 | 12.000 (+20.00, 1.00x) | 30.000 (+50.00, 1.00x) | 1 |" in t
    assert "| gptq-w4-g64 [generated] | 11.000 (+10.00, 0.50x) | 23.000 (+15.00, 0.30x) | 90 |" in t


def test_missing_texts_are_named(tmp_path):
    ood = _load("ood_perplexity")
    with pytest.raises(SystemExit, match="missing texts.*kjv.txt.*prepare_ood_texts"):
        ood.main(["--texts", str(tmp_path), "--out", str(tmp_path / "o.jsonl")])
