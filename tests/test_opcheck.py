"""torch.library.opcheck for every op: schema (incl. mutation annotations),
fake/meta kernels, and AOT dispatch (what torch.compile relies on)."""

import pytest
import torch

from conftest import lq, rand_int8
from llmeasyquant import hadamard
from llmeasyquant.cpu_pack import pack_int8_panels, pack_w4a8

ops = torch.ops.llmeasyquant


def _samples(device):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 20, generator=g).to(device)
    xb = x.to(torch.bfloat16)
    a, b = rand_int8(5, 20, gen=g).to(device), rand_int8(7, 20, gen=g).to(device)
    q, s, z = lq.ops.quantize(xb, 4, False, 10)
    w = rand_int8(7, 20, lo=-127, gen=g).to(device)
    ws = torch.rand(7, generator=g).to(device) / 50
    wsum = lq.ops.weight_row_sums(w)
    qw4, s4, z4 = lq.ops.quantize(torch.randn(7, 20, generator=g).to(device), 4, False, 5)
    stats = lq.ops.new_channel_stats(20, device)
    return [
        (ops.quantize.default, (x, 8, True, -1)),
        (ops.quantize.default, (xb, 4, False, 10)),
        (ops.quantize.default, (x, 8, False, 0)),
        (ops.quantize_static.default, (xb, s, z, 4, 10)),
        (ops.dequantize.default, (q, s, z, 4, 10, 20, torch.float16)),
        (ops.channel_stats_.default, (x, *stats)),
        (ops.ema_quantize_.default, (x, lq.ops.new_ema_state(device), 0.9, 1e-5, 8, False, True)),
        (ops.int8_gemm.default, (a, b)),
        (ops.scaled_int8_gemm.default, (a, torch.rand(5).to(device), rand_int8(5, gen=g).to(device), b,
                                        torch.rand(7).to(device), None, torch.randn(7).to(device),
                                        torch.bfloat16)),
        (ops.dynamic_quant_linear.default, (x, w, ws, wsum, torch.randn(7).to(device), True)),
        *([] if device != "cpu" else  # the CPU's own weight layout: a CPU kernel only
          [(ops.dynamic_quant_linear_packed.default, (x, pack_int8_panels(w), ws, wsum, 20, 7, None, False)),
           (ops.w4a8_linear_packed.default, _w4a8_packed_args(g))]),
        (ops.weight_only_linear.default, (xb, qw4, s4, z4, 4, 5, None)),
        (ops.weight_only_linear.default, (x, w, ws.reshape(7, 1), None, 8, -1, torch.randn(7).to(device))),
        (ops.hadamard_transform.default, (torch.randn(3, 48, generator=g).to(device).to(torch.bfloat16),
                                          hadamard.small_matrix(48, device=device), 48 ** -0.5)),
        (ops.hadamard_transform.default, (x[..., :16], None, 0.5)),
        (ops.weight_only_linear_panel.default, (*_panel_args(device, g), torch.randn(70, generator=g).to(device))),
        (ops.w4a8_linear.default, _w4a8_args(device, g)),
        (ops.add_rms_norm.default, (x, torch.randn(3, 4, 20, generator=g).to(device), torch.randn(20).to(device),
                                    1e-5)),
        (ops.add_rms_norm.default, (xb, None, torch.randn(20).to(device).to(torch.bfloat16), 1e-6)),
        (ops.silu_mul.default, (x[..., :10], x[..., 10:])),
        (ops.decode_attention_.default, _decode_attention_args(device, g)),
    ]


def _decode_attention_args(device, g):
    qkv = torch.randn(2, (4 + 2 * 2) * 8, generator=g).to(device)
    q, k, v = qkv.split((32, 16, 16), -1)
    kc, vc = (torch.randn(2, 2, 6, 8, generator=g).to(device) for _ in range(2))
    return q, k, v, kc, vc, torch.randn(8, generator=g).to(device), torch.randn(8, generator=g).to(device), 3, 0.35


def _w4a8_args(device, g):
    qw, s, z = lq.ops.quantize(torch.randn(9, 64, generator=g), 4, False, 32)
    x = torch.randn(2, 5, 64, generator=g).to(torch.bfloat16)
    return x.to(device), qw.to(device), s.to(device), z.to(device), 32, torch.randn(9, generator=g).to(device)


def _w4a8_packed_args(g):
    x, qw, s, z, gs, bias = _w4a8_args("cpu", g)
    return (x, *pack_w4a8(qw, s, z, 64), 64, 9, gs, bias)


def _panel_args(device, g):
    from llmeasyquant import panel

    qw, s, z = lq.ops.quantize(torch.randn(70, 128, generator=g), 4, False, 64)
    p = panel.pack(qw, s, z, 64, 128)
    x = torch.randn(2, 3, 128, generator=g).to(torch.bfloat16)
    return x.to(device), p.qpanel.to(device), p.gparams.to(device), 70, 64


def test_every_op_has_an_opcheck_sample():
    covered = {op._schema.name.split("::")[1] for op, _ in _samples("cpu")}
    defined = {n.split("::")[1] for n in torch._C._dispatch_get_all_op_names() if n.startswith("llmeasyquant::")}
    assert len(defined) == 17 and defined == covered, f"ops without an opcheck sample: {defined - covered}"


@pytest.mark.parametrize("i", range(22))
def test_opcheck(device, i):
    samples = _samples(device)
    if i >= len(samples):
        pytest.skip(f"{device}: the CPU-only ops' samples are not built for this device")
    op, args = samples[i]
    torch.library.opcheck(op, args)
