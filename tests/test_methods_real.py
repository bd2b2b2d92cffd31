"""Accuracy orderings of the methods on the real default model (SmolLM2-135M)
and real WikiText-2 text, sized for CI: few calibration windows, the first
windows of the test file. docs/results.md holds the full-file numbers."""

import pytest
import torch

from conftest import lq
from llmeasyquant.calibration import calibration_batches
from llmeasyquant.eval import perplexity
from llmeasyquant.eval.perplexity import tokenize_file

pytestmark = pytest.mark.slow

WINDOWS, SEQ = 4, 1024


@pytest.fixture(scope="module")
def base():
    from llmeasyquant.models import load_default_model

    model, tok = load_default_model()
    ids = tokenize_file(tok, lq.data.DEFAULT_EVAL_FILE)
    calib = calibration_batches(tok, n_samples=8, seq_len=512)
    ppl = perplexity(model, ids=ids, seq_len=SEQ, max_windows=WINDOWS, progress=False).ppl
    return model, tok, ids, calib, ppl


def _ppl(base, method, **opts):
    import copy

    model, _, ids, calib, _ = base
    m = lq.quantize(copy.deepcopy(model), method, calib=calib, progress=False, **opts)
    return perplexity(m, ids=ids, seq_len=SEQ, max_windows=WINDOWS, progress=False).ppl


def test_float_baseline_is_sane(base):
    assert 5 < base[4] < 40, base[4]


def test_smoothquant_dynamic_w8a8_within_1_percent(base):
    assert _ppl(base, "smoothquant") <= base[4] * 1.01


def test_smoothquant_halves_static_absmax_degradation(base):
    f = base[4]
    plain = _ppl(base, "absmax", act="static")
    smooth = _ppl(base, "smoothquant", act="static")
    assert smooth - f <= 0.5 * (plain - f), (f, plain, smooth)


def test_gptq_and_awq_beat_rtn_w4_g64(base):
    f = base[4]
    rtn = _ppl(base, "zeropoint", w_bits=4, w_group_size=64, act=None)
    gptq = _ppl(base, "gptq", w_bits=4, w_group_size=64)
    awq = _ppl(base, "awq", w_bits=4, w_group_size=64)
    assert gptq - f <= 0.7 * (rtn - f), (f, rtn, gptq)
    assert awq - f <= 0.7 * (rtn - f), (f, rtn, awq)
