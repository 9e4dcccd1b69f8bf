"""Speed and memory switches of a training run, per repeated block of the model:

- `trainer.activation_checkpointing`: every block keeps only its inputs and recomputes its
  activations in the backward (torch.utils.checkpoint, non-reentrant). lgframe's DiT and
  ViT blocks switch it on themselves (`CheckpointedBlock`, inside their forward, after
  FSDP2's hooks); diffusers and transformers models through their own
  `enable_gradient_checkpointing` / `gradient_checkpointing_enable`.
- `trainer.compile`: `torch.compile` of each block (`nn.Module.compile`, in place, so the
  parameter names and the state dict do not change). One compiled block serves every
  block of the same shapes, and it composes with FSDP2, which shards per block.

fast-DiT measured what the first buys on a GPU (with mixed precision and precomputed
latents: DiT-XL/2 from 44 to 27.5 GB); `benchmarks/gpu_throughput.py` measures both here.
"""

from __future__ import annotations

import torch.nn as nn

from lgframe.core.layout import Layout
from lgframe.errors import LgframeError
from lgframe.models.dit import CheckpointedBlock


def set_activation_checkpointing(model: nn.Module, on: bool = True) -> int:
    """Switch activation checkpointing of every repeated block; returns how many blocks.
    lgframe's blocks (`CheckpointedBlock`) are found as modules, so a model whose blocks are
    no longer identical (peft's LoRA in some of them, as personalize does) is switched too."""
    own = [m for m in model.modules() if isinstance(m, CheckpointedBlock)]
    if own:
        for b in own:
            b.activation_checkpointing = on
        return len(own)
    blocks = list(Layout(model).blocks(model))
    for enable, disable in (("enable_gradient_checkpointing", "disable_gradient_checkpointing"),  # diffusers
                            ("gradient_checkpointing_enable", "gradient_checkpointing_disable")):  # transformers
        if hasattr(model, enable):
            getattr(model, enable if on else disable)()
            return len(blocks)
    raise LgframeError(f"trainer.activation_checkpointing: {type(model).__name__}'s blocks "
                       f"({type(blocks[0]).__name__}) have no checkpointing switch; it works for lgframe's DiT and ViT "
                       "and for diffusers and transformers models")


def compile_blocks(model: nn.Module, **options) -> int:
    """torch.compile every repeated block in place; returns how many blocks."""
    blocks = list(Layout(model).blocks(model))
    for b in blocks:
        b.compile(**options)
    return len(blocks)
