"""Mixed-precision search on tiny random models (the wiring, the budget, the
guarantees); the real-model Pareto table is in docs/results.md."""

from __future__ import annotations

import json
import os

import pytest
import torch

import llmeasyquant as lq
from llmeasyquant.distributed import model_digests
from llmeasyquant.nn.qlinear import QLinear
from llmeasyquant.search import Searcher, search
from llmeasyquant.search.candidates import layer_bytes, layout_for
from llmeasyquant.search.strategies import Objective, greedy

import tiny_models


def _batches(n=2, seq=48, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, tiny_models.VOCAB, (1, seq), generator=g) for _ in range(n)]


@pytest.fixture(scope="module")
def searcher(one_thread):
    return Searcher(tiny_models.build("llama"), _batches(), group_size=32, progress=False)


def test_candidate_bytes_are_the_bytes_held(searcher):
    for p in searcher.paths:
        for b, cand in searcher.cands.table[p].items():
            assert cand.bytes == cand.layer.memory_bytes(), (p, b)
            assert cand.layer.w_bits == b and isinstance(cand.layer, QLinear)
    assert layer_bytes(10, 67, layout_for(3, 67, -1)) == 10 * 27 + 10 * 2 + 10  # float16 scales
    assert layer_bytes(10, 67, layout_for(3, 67, -1, "float32")) == 10 * 27 + 10 * 4 + 10


@pytest.mark.parametrize("strategy", ["entropy", "grid", "greedy"])
def test_every_strategy_respects_the_budget(searcher, strategy):
    res = searcher.run(strategy, budget_bits=5.0, max_evals=20)
    assert res.bytes <= int(5.0 * sum(searcher.cands.numel.values()) / 8)
    assert res.bits_per_weight <= 5.0 + 1e-9
    assert set(res.assignment.values()) <= set(searcher.cands.bits)
    assert set(res.assignment) == set(searcher.paths)
    # the reported loss is the model's loss with the assignment in place
    with searcher.probe.swapped(searcher.layers(res.assignment)):
        assert searcher.probe.loss_from(0) == pytest.approx(res.loss, abs=1e-6)


def test_greedy_never_ends_worse_than_its_start(searcher):
    sens = searcher.sensitivities()
    obj = Objective(budget_bytes=int(4.5 * sum(searcher.cands.numel.values()) / 8))
    for start_bits in (2, 3):  # feasible starts that leave room to move
        start = searcher.uniform(start_bits)
        start_val = obj.value(searcher.measure(start), searcher.cands, start)
        a, val, trace = greedy(searcher.cands, sens, obj, start, searcher.measure, max_evals=25)
        assert val <= start_val and trace.start_objective == pytest.approx(start_val)
        objs = [s["objective"] for s in trace.steps]
        assert all(x > y for x, y in zip([start_val] + objs, objs)), "each accepted step lowers the objective"
        assert obj.feasible(searcher.cands, a)


def test_lam_trades_size_for_loss(searcher):
    small = searcher.run("greedy", lam=1.0, max_evals=20)
    large = searcher.run("greedy", lam=0.0, max_evals=20)
    assert small.bytes <= large.bytes


def test_impossible_budget_and_bad_arguments_are_clear(searcher):
    with pytest.raises(ValueError, match="impossible budget.*all 2-bit"):
        searcher.run("greedy", budget_bits=2.0)
    with pytest.raises(ValueError, match="exactly one of a budget"):
        searcher.run("greedy")
    with pytest.raises(ValueError, match="unknown strategy 'anneal'"):
        searcher.run("anneal", budget_bits=5)
    with pytest.raises(ValueError, match="unknown base quantizer 'awq'"):
        Searcher(tiny_models.build("llama"), _batches(), base="awq", progress=False)
    with pytest.raises(ValueError, match="candidate bits must be among 2, 3, 4, 8"):
        Searcher(tiny_models.build("llama"), _batches(), bits=(2, 5), group_size=32, progress=False)


@pytest.mark.parametrize("base", ["rtn", "gptq"])
def test_search_applies_and_mixed_method_reproduces_it(one_thread, base):
    model = tiny_models.build("llama")
    res = search(model, calib=_batches(), budget_bits=5.0, group_size=32, base=base, max_evals=10, progress=False)
    held = sum(m.memory_bytes() for m in model.modules() if isinstance(m, QLinear))
    assert held == res.bytes  # the memory reported is what the tensors hold
    assert model.llmeq_config.method == "mixed" and model.llmeq_config.bitmap == res.assignment
    again = tiny_models.build("llama")
    lq.quantize(again, "mixed", calib=_batches(), bitmap=res.assignment, base=base, w_group_size=32, progress=False)
    assert model_digests(again) == model_digests(model)


def test_mixed_model_saves_and_loads(tmp_path, one_thread):
    model = tiny_models.build("llama")
    search(model, calib=_batches(), budget_bits=5.0, group_size=32, max_evals=5, progress=False)
    lq.save(model, str(tmp_path / "m"))
    back = lq.load(str(tmp_path / "m"))
    ids = _batches(1)[0]
    assert torch.equal(back(ids).logits, model(ids).logits)
    assert back.llmeq_config.bitmap == model.llmeq_config.bitmap


def test_search_cli_writes_report_bitmap_and_model(tmp_path, one_thread, caplog):
    from llmeasyquant import cli

    src = tmp_path / "tiny"
    tiny_models.build("llama").save_pretrained(src)
    tiny_models.byte_tokenizer().save_pretrained(src)
    calib = tmp_path / "calib.txt"
    calib.write_text("The quick brown fox jumps over the lazy dog. " * 200)
    out = tmp_path / "out"
    rc = cli.main(["search", str(src), "--budget-bits", "5", "--group-size", "32", "--calib", str(calib),
                   "--calib-samples", "2", "--probe-samples", "1", "--calib-seq-len", "64", "--pareto", "4.5,5", "--max-windows", "1",
                   "--max-evals", "8", "--out", str(out), "--quiet", "--verbose"])
    assert rc == 0
    said = [r.getMessage() for r in caplog.records if r.name == "llmeasyquant"]
    assert any(m.startswith("search: greedy ->") for m in said) and any("calibration:" in m for m in said)
    for f in ("search.md", "search.json", "bitmap.json", "pareto.json", "bitmap.png", "pareto.png", "model"):
        assert (out / f).exists(), f
    rows = json.loads((out / "pareto.json").read_text())["rows"]
    assert [r["kind"] for r in rows].count("uniform") == 4 and [r["kind"] for r in rows].count("searched") == 2
    from PIL import Image

    assert Image.open(out / "bitmap.png").size[0] > 300
    assert lq.load(str(out / "model")).llmeq_config.method == "mixed"
    assert not [p for p in os.listdir(tmp_path) if ".tmp-" in p]  # no half-written folders left
    assert cli.main(["search", str(src), "--out", str(out)]) == 2  # no budget given: one-line error


def test_write_search_output_direct(tmp_path, one_thread):
    from llmeasyquant.outdir import DestinationError
    from llmeasyquant.search.report import is_search_output, search_summary, write_search_output

    model = tiny_models.build("llama")
    s = Searcher(model, _batches(), group_size=32, progress=False)
    res = s.run("greedy", budget_bits=5.0, max_evals=4)
    out = tmp_path / "out"
    shown = write_search_output(s, res, out, tokenizer=tiny_models.byte_tokenizer(), model_name="tiny",
                                command="llmeasyquant search tiny", progress=None)
    assert shown == [search_summary(res)]
    assert shown[0].startswith("greedy search (rtn, candidates W2, W3, W4, W8, g32, float16 scales): ")
    assert is_search_output(out) and not (out / "pareto.json").exists()
    assert json.loads((out / "bitmap.json").read_text()) == res.assignment
    assert json.loads((out / "search.json").read_text())["assignment"] == res.assignment
    md = (out / "search.md").read_text()
    assert md.startswith("# Mixed-precision search: tiny\n\n" + shown[0]) and "![bitmap.png](bitmap.png)" in md
    assert md.endswith("Command: `llmeasyquant search tiny`\n")
    assert model.llmeq_config.bitmap == res.assignment  # applied in place
    assert lq.load(str(out / "model")).llmeq_config.bitmap == res.assignment
    # its own output is replaced; a folder of other files, or a Pareto table without a tokenizer, is refused
    write_search_output(s, res, out, model_name="tiny", save_model=False, progress=None)
    assert not (out / "model").exists() and "Command" not in (out / "search.md").read_text()
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(DestinationError, match="not an llmeasyquant output"):
        write_search_output(s, res, other, model_name="tiny", save_model=False)
    with pytest.raises(ValueError, match="needs a tokenizer, got None"):
        write_search_output(s, res, tmp_path / "p", model_name="tiny", budgets=[4.0], save_model=False)
    assert sorted(os.listdir(tmp_path)) == ["other", "out"]  # nothing half-written left
