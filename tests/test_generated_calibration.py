"""Data-free calibration: `calib="generated"` samples the calibration text from
the float model itself (llmeasyquant.calibration.generated_batches)."""

import copy

import pytest
import torch

import tiny_models
from conftest import lq
from llmeasyquant.calibration import generated_batches
from llmeasyquant.sharding import Shard


def _model():
    torch.manual_seed(0)
    return tiny_models.build("llama").eval(), tiny_models.byte_tokenizer()


def test_sequences_are_seeded_full_length_and_leave_the_global_rng_alone(one_thread):
    model, tok = _model()
    model.train()  # restored after generating
    state = torch.get_rng_state()
    a = generated_batches(model, tok, n_samples=3, seq_len=12, batch_size=2, progress=False)
    assert torch.equal(torch.get_rng_state(), state)
    assert model.training
    assert [t.shape for t in a] == [torch.Size([1, 12])] * 3 and all(t.dtype == torch.long for t in a)
    special = set(tok.all_special_ids)
    assert all(int(t[0, 0]) not in special for t in a)  # each starts from an ordinary token
    assert all(0 <= int(t.min()) and int(t.max()) < tiny_models.VOCAB for t in a)
    b = generated_batches(model, tok, n_samples=3, seq_len=12, batch_size=2, progress=False)
    assert all(torch.equal(x, y) for x, y in zip(a, b))  # the same call, the same text
    c = generated_batches(model, tok, n_samples=3, seq_len=12, seed=1, progress=False)
    assert not all(torch.equal(x, y) for x, y in zip(a, c))
    # sampled, not greedy: a random model's text is not one token repeated
    assert len(set(torch.cat(a, 1).flatten().tolist())) > 6


def test_quantize_generated_equals_passing_the_generated_tokens(one_thread):
    model, tok = _model()
    ref = copy.deepcopy(model)
    kw = dict(w_bits=4, w_group_size=16, n_calib=2, calib_seq_len=16, progress=False)
    lq.quantize(model, "gptq", calib="generated", tokenizer=tok, **kw)
    tokens = generated_batches(copy.deepcopy(ref), tok, n_samples=2, seq_len=16, progress=False)
    lq.quantize(ref, "gptq", calib=tokens, tokenizer=tok, **kw)
    a, b = model.state_dict(), ref.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert model.llmeq_report.calibration_batches == 2


def test_generated_calibration_is_refused_where_it_cannot_work():
    model, tok = _model()

    class TwoRanks(Shard):
        world = 2

    with pytest.raises(ValueError, match="not supported across ranks"):
        lq.quantize(model, "gptq", calib="generated", tokenizer=tok, shard=TwoRanks(), w_group_size=16,
                    progress=False)
    with pytest.raises(ValueError, match="needs tokenizer"):
        lq.quantize(model, "gptq", calib="generated", w_group_size=16, progress=False)
    with pytest.raises(ValueError, match="n_samples >= 1"):
        generated_batches(model, tok, n_samples=0)


def test_cli_quantize_calib_generated(tmp_path, capsys, one_thread):
    from llmeasyquant import cli

    model, tok = _model()
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    args = ["quantize", str(tmp_path / "m"), "--method", "gptq", "--w-bits", "4", "--w-group-size", "16",
            "--calib", "generated", "--calib-samples", "2", "--option", "calib_seq_len=16", "--quiet"]
    assert cli.main(args + ["--out", str(tmp_path / "q")]) == 0
    assert "saved to" in capsys.readouterr().out
    assert lq.load(str(tmp_path / "q")).llmeq_config.w_bits == 4
    assert cli.main(args + ["--out", str(tmp_path / "q2"), "--distributed"]) == 2
    assert "not supported with --distributed" in capsys.readouterr().err
    assert not (tmp_path / "q2").exists()


def test_search_draws_calibration_and_probe_from_the_model(one_thread):
    from llmeasyquant.search import calibration_and_probe

    model, tok = _model()
    calib, probe = calibration_and_probe(tok, "generated", 2, 1, 10, model)
    assert len(calib) == 2 and len(probe) == 1 and all(t.shape == (1, 10) for t in calib + probe)
    assert not torch.equal(probe[0], calib[0])  # held out: another seed
    assert torch.equal(calib[0], generated_batches(model, tok, n_samples=2, seq_len=10, progress=False)[0])
    with pytest.raises(ValueError, match="needs the model"):
        calibration_and_probe(tok, "generated", 2, 1, 10)
