"""The method comparison (llmeasyquant.compare, `llmeasyquant compare`) end to
end on a tiny random LLaMA with a local byte-level tokenizer and real
WikiText-2 text: every output written, columns present, resume, bad presets."""

import csv
import json

import pytest
import torch

import tiny_models
from conftest import lq  # noqa: F401  (loads the extension)
from llmeasyquant import cli
from llmeasyquant.compare import COLUMNS, resolve_methods, run_compare


def _loader():
    import transformers as tf

    torch.manual_seed(0)  # group size 64 must divide every in_features: 64 and 128
    cfg = tf.LlamaConfig(vocab_size=tiny_models.VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    return tf.LlamaForCausalLM(cfg).eval(), tiny_models.byte_tokenizer()


KW = dict(seq_len=64, max_windows=2, calib_samples=2, calib_seq_len=32, speed_prefill_tokens=32, progress=False)


def test_compare_rows_outputs_and_resume(tmp_path, one_thread):
    presets = resolve_methods("float,smoothquant-w8a8,rtn-w4-g64,simquant-kv4")
    rows = run_compare(_loader, presets, out_dir=str(tmp_path), **KW)
    assert [r["method"] for r in rows] == ["float", "smoothquant-w8a8", "rtn-w4-g64", "simquant-kv4"]
    f = rows[0]
    assert f["delta_pct"] is None and f["ppl"] > 1
    for r in rows[1:]:
        assert r["delta_pct"] == pytest.approx(100 * (r["ppl"] - f["ppl"]) / f["ppl"])
        assert r["quant_s"] is not None and r["prefill_tok_s"] > 0 and r["decode_tok_s"] > 0
    assert rows[2]["linear_MiB"] < 0.4 * f["linear_MiB"]  # 4-bit weights + scales vs fp32
    assert rows[1]["calib_s"] is not None  # the one shared calibration set is built for SmoothQuant
    md = (tmp_path / "compare.md").read_text()
    assert "| method | bits | perplexity |" in md and "Protocol: WikiText-2 raw test" in md
    with open(tmp_path / "compare.csv") as fh:
        table = list(csv.DictReader(fh))
    assert [r["method"] for r in table] == [r["method"] for r in rows] and set(COLUMNS) <= set(table[0])
    report = (tmp_path / "report.md").read_text()
    assert "![ppl_memory](ppl_memory.png)" in report and "![weights](weights.png)" in report
    assert "Command:" in report and "transformers" in report  # environment recorded
    from PIL import Image

    for stem in ("ppl_memory", "weights"):
        with Image.open(tmp_path / f"{stem}.png") as im:
            assert im.size[0] >= 400 and im.size[1] >= 250, (stem, im.size)
            assert len(set(im.convert("L").getdata())) > 10  # not a blank canvas
        assert (tmp_path / f"{stem}.svg").stat().st_size > 1000
    saved = json.loads((tmp_path / "compare.json").read_text())
    assert len(saved["rows"][1]["weight_hist"]["counts"]) == 120
    assert saved["rows"][3]["bits"].startswith("KV4")
    # resume: nothing is recomputed, the loader's model is never quantized
    calls = []

    def loader():
        calls.append(1)
        return _loader()

    float_hist = saved["rows"][0].pop("weight_hist")  # as a row from before the histograms
    (tmp_path / "compare.json").write_text(json.dumps(saved))
    again = run_compare(loader, presets, out_dir=str(tmp_path), resume=True, **KW)
    assert [r["ppl"] for r in again] == [r["ppl"] for r in rows] and len(calls) == 1
    assert again[0]["weight_hist"] == float_hist  # the float histogram is drawn again from the float model
    assert not list(tmp_path.glob("*.tmp*"))  # atomic writes leave no temp files


def test_unknown_preset_lists_the_choices():
    with pytest.raises(ValueError, match="unknown method preset.*awq-w4-g64"):
        resolve_methods("float,magic")
    assert [p.name for p in resolve_methods("rtn-w4-g64,float")] == ["float", "rtn-w4-g64"]


def test_cli_compare_on_a_local_folder(tmp_path, capsys, one_thread):
    model, tok = _loader()
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    rc = cli.main(["compare", str(tmp_path / "m"), "--methods", "float,rtn-w8", "--max-windows", "1",
                   "--seq-len", "64", "--calib-samples", "2", "--no-speed", "--quiet", "--out", str(tmp_path / "o")])
    out = capsys.readouterr().out
    assert rc == 0 and "| rtn-w8 | W8 |" in out
    assert (tmp_path / "o" / "compare.md").exists()
    assert cli.main(["compare", str(tmp_path / "m"), "--methods", "nope"]) == 2
    assert "unknown method preset" in capsys.readouterr().err


def test_other_texts_get_their_own_columns(tmp_path, one_thread):
    from llmeasyquant.eval.perplexity import perplexity, tokenize_file

    legal = tmp_path / "legal.txt"
    legal.write_text("The licensee shall not sublicense the work, except as expressly provided. " * 60)
    presets = resolve_methods("float,rtn-w4-g64")
    rows = run_compare(_loader, presets, out_dir=str(tmp_path / "o"), speed=False, texts={"legal": str(legal)},
                       **KW)
    model, tok = _loader()
    want = perplexity(model, ids=tokenize_file(tok, str(legal)), seq_len=64, max_windows=2, progress=False).ppl
    assert rows[0]["texts"]["legal"]["ppl"] == pytest.approx(want, rel=1e-6)
    assert rows[0]["texts"]["legal"]["delta_pct"] is None
    q = rows[1]["texts"]["legal"]
    assert q["delta_pct"] == pytest.approx(100 * (q["ppl"] - want) / want, rel=1e-6)
    assert q["ppl"] != rows[1]["ppl"]  # scored on the other text, not the test file
    md = (tmp_path / "o" / "compare.md").read_text()
    assert "| legal ppl | legal Δ% |" in md and "legal: legal.txt, 2 windows" in md
    assert f"{q['delta_pct']:+.2f}" in md
    with open(tmp_path / "o" / "compare.csv") as fh:
        table = list(csv.DictReader(fh))
    assert float(table[1]["ppl_legal"]) == pytest.approx(q["ppl"]) and table[0]["delta_pct_legal"] == ""


def test_cli_text_flag_is_checked_before_loading(tmp_path, capsys):
    for spec, msg in [("legal", "expects NAME=FILE"), (f"x={tmp_path / 'none.txt'}", "no such file")]:
        assert cli.main(["compare", str(tmp_path / "not-a-model"), "--methods", "float", "--text", spec]) == 2
        assert msg in capsys.readouterr().err
