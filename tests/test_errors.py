"""Bad input gets a clear error naming what was expected and what came."""

import pytest
import torch

from conftest import lq, rand_int8


def test_unsupported_bits():
    with pytest.raises(ValueError, match=r"unsupported bits=5; supported: 2, 3, 4, 8"):
        lq.ops.quantize(torch.randn(2, 8), 5)
    with pytest.raises(ValueError, match=r"3-bit values \(last dim should be 6\)"):
        lq.ops.dequantize(torch.zeros(2, 8, dtype=torch.uint8), torch.ones(2, 1), torch.zeros(2, 1, dtype=torch.int8),
                          3, -1, 16)
    with pytest.raises(ValueError, match=r"2-bit zero-points must lie in \[-2, 1\], got 3"):
        lq.ops.quantize_static(torch.randn(2, 8), torch.ones(2, 1), torch.full((2, 1), 3, dtype=torch.int8), 2, -1)
    with pytest.raises(ValueError, match="unsupported w_bits=5"):
        lq.QLinear(8, 4, w_bits=5)


def test_wrong_dtype():
    with pytest.raises(TypeError, match=r"expected x of dtype float32, bfloat16 or float16, got Int"):
        lq.ops.quantize(torch.ones(2, 8, dtype=torch.int32))
    with pytest.raises(TypeError, match=r"expected b \(weights\) of dtype Char, got Float"):
        lq.ops.int8_gemm(rand_int8(2, 4), torch.randn(3, 4))


def test_group_size_must_divide_k_and_lists_valid_sizes():
    with pytest.raises(ValueError, match=r"group_size=128 does not divide K=576; group sizes that divide K: .*64, 72, 96.*192"):
        lq.ops.quantize(torch.randn(2, 576), 4, True, 128)
    with pytest.raises(ValueError, match="w_group_size=128 does not divide in_features=576"):
        lq.QLinear(576, 8, w_bits=4, w_group_size=128, act=None)


def test_k_mismatch_names_both_shapes():
    with pytest.raises(ValueError, match=r"K mismatch: a is \[M=2, K=4\] but b is \[N=3, K=5\]"):
        lq.ops.int8_gemm(rand_int8(2, 4), rand_int8(3, 5))
    layer = lq.QLinear.from_linear(torch.nn.Linear(16, 4))
    with pytest.raises(ValueError, match=r"K mismatch: x has K=15"):
        layer(torch.randn(2, 15))
    wo = lq.QLinear.from_linear(torch.nn.Linear(16, 4), act=None, w_bits=4, w_group_size=8)
    with pytest.raises(ValueError, match=r"K mismatch: x has K=12"):
        wo(torch.randn(2, 12))


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), float("inf")])
def test_static_scales_must_be_finite_and_positive(bad):
    x = torch.randn(3, 8)
    with pytest.raises(ValueError, match=r"scales must be finite and > 0"):
        lq.ops.quantize_static(x, torch.tensor([bad]), torch.zeros(1, dtype=torch.int8), 8, 0)


def test_non_finite_calibration_range():
    layer = lq.QLinear.from_linear(torch.nn.Linear(8, 4), act="static")
    with pytest.raises(ValueError, match="calibrated range must be finite"):
        layer.set_static_range(float("-inf"), 3.0)
    with pytest.raises(ValueError, match="lo=2.0 > hi=1.0"):
        layer.set_static_range(2.0, 1.0)


def test_non_finite_weight_rejected():
    lin = torch.nn.Linear(8, 4)
    with torch.no_grad():
        lin.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="weight contains NaN or Inf"):
        lq.QLinear.from_linear(lin)


def test_scale_shape_mismatch():
    with pytest.raises(ValueError, match=r"expected scale with 3 elements \(one per row\), got shape \[2\]"):
        lq.ops.quantize_static(torch.randn(3, 8), torch.ones(2), torch.zeros(2, dtype=torch.int8), 8, -1)


def test_unknown_module_type():
    with pytest.raises(TypeError, match="expected nn.Linear or transformers Conv1D, got Conv2d"):
        lq.QLinear.from_linear(torch.nn.Conv2d(3, 3, 1))


def test_ema_arguments():
    with pytest.raises(ValueError, match=r"alpha must be in \[0, 1\), got 1.5"):
        lq.ops.ema_quantize_(torch.randn(2, 4), lq.ops.new_ema_state(), 1.5)
    with pytest.raises(ValueError, match=r"state must be a contiguous float32 tensor of shape \[4\]"):
        lq.ops.ema_quantize_(torch.randn(2, 4), torch.zeros(3))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device to build a CUDA tensor")
def test_cuda_tensor_on_cpu_only_build():
    if lq.build_info()["cuda"]:
        pytest.skip("this build has CUDA kernels")
    with pytest.raises(RuntimeError, match="no CUDA kernels"):
        lq.ops.quantize(torch.randn(2, 4, device="cuda"))
