"""lgframe.models.nested: the shallower sub-network (nested_depth) run inside the full model,
and the depth plan it uses; nested widths are tested with tucker (tests/test_tucker.py)."""

import pytest
import torch

from lgframe.core.layout import depth_positions
from lgframe.errors import LgframeError
from lgframe.models.nested import depth_layers, nested_depth
from lgframe.models.registry import create_model


def test_depth_layers_keep_first_and_last_evenly_spaced():
    assert depth_layers(12, 4) == [0, 4, 7, 11]
    assert depth_layers(6, 6) == list(range(6))
    assert depth_layers(6, 1) == [2] and depth_layers(5, 1) == [2]  # the middle, as the descent's one layer
    assert depth_layers(4, 2) == [0, 3]
    for depth in range(1, 13):  # the descent's positions, rounded: equal wherever they are whole layers
        for sub in range(1, depth + 1):
            pos = depth_positions(depth, sub)
            layers = depth_layers(depth, sub)
            assert len(set(layers)) == sub and all(abs(p - q) <= 0.5 for p, q in zip(pos.tolist(), layers))
    with pytest.raises(LgframeError, match=r"valid: 1\.\.6"):
        depth_layers(6, 7)


@pytest.mark.parametrize("name", ["DiT-Nano/2", "ViT-Nano/2"])
def test_nested_depth_is_the_shallower_model_of_those_blocks(name):
    torch.manual_seed(0)
    model = create_model(name, depth=6)
    with torch.no_grad():  # off the init: a fresh DiT's adaLN-zero blocks are the identity
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    small = create_model(name, depth=3)
    keep = depth_layers(6, 3)
    sd = model.state_dict()
    for i, j in enumerate(keep):  # the shallower model made of blocks `keep`
        for k in list(sd):
            if k.startswith(f"blocks.{j}."):
                sd[k.replace(f"blocks.{j}.", f"blocks.{i}.", 1) + "@"] = sd[k]
    small.load_state_dict({k[:-1] if k.endswith("@") else k: v for k, v in sd.items()
                           if k.endswith("@") or not k.startswith("blocks.")})
    g = torch.Generator().manual_seed(1)
    if name.startswith("DiT"):
        args = (torch.randn(4, 1, 8, 8, generator=g), torch.randint(0, 1000, (4,), generator=g),
                torch.randint(0, 10, (4,), generator=g))
    else:
        args = (torch.randn(4, 1, 8, 8, generator=g),)
    full = model(*args)
    with nested_depth(model, 3) as kept:
        out = model(*args)
        out.square().mean().backward()
    assert kept == keep == [0, 2, 5]
    assert torch.allclose(out, small(*args), atol=1e-5)
    assert (out - full).abs().max() > 1e-2  # the skipped blocks did compute in the full model
    for i, block in enumerate(model.blocks):  # skipped blocks get no gradient in that step
        grads = [p.grad for p in block.parameters()]
        assert all(g is None for g in grads) == (i not in keep), i
    assert torch.equal(model(*args), full)  # outside the context every block runs again
