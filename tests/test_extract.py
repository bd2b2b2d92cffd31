import pytest
import torch
from torch import nn

from conftest import lq  # noqa: F401
from llmeasyquant.models.extract import SUPPORTED_MODEL_TYPES, extract
from tiny_models import ALL, build


@pytest.mark.parametrize("model_type", ALL)
def test_extract_finds_blocks_linears_and_groups(model_type):
    model = build(model_type)
    spec = extract(model)
    assert spec.model_type == model_type and len(spec.blocks) == 2
    paths = spec.linear_paths()
    assert len(paths) == 2 * len(spec.block_linears)
    for p in paths:
        assert lq.nn.is_quantizable(model.get_submodule(p))
    assert "lm_head" in spec.extra_linears
    for g in spec.groups:
        prev = spec.blocks[0].get_submodule(g.prev)
        if g.prev_kind == "norm":
            assert "norm" in type(prev).__name__.lower()
        # every linear of a group reads the same input width the prev op produces
        widths = {spec.blocks[0].get_submodule(n).weight.shape[1 if not model_type == "gpt2" else 0] for n in g.linears}
        assert len(widths) == 1
    # GQA models must not fold v_proj into o_proj
    names = [g.prev for g in spec.groups]
    assert ("self_attn.v_proj" in names) == (model_type == "opt")


def test_unknown_architecture_lists_supported():
    class Weird(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

    with pytest.raises(ValueError, match="unknown model architecture 'Weird': llmeasyquant knows gpt2|llama"):
        extract(Weird())
    assert {"gpt2", "opt", "llama", "mistral", "qwen2", "qwen3"} <= set(SUPPORTED_MODEL_TYPES)


@pytest.mark.parametrize("model_type", ALL)
def test_tiny_models_run(model_type):
    model = build(model_type)
    ids = torch.randint(0, 256, (1, 12))
    assert model(ids).logits.shape == (1, 12, 256)
