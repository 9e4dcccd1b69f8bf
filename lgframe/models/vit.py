"""Vision Transformer (Dosovitskiy et al. 2021) for classification.

Same block vocabulary as the DiT (`attn.qkv`, `attn.proj`, `mlp.fc1`,
`mlp.fc2`), so a constraint's roles read the same on both. Pre-norm blocks,
learned position embedding, a class token, a linear head.
Shapes: images (B, C, H, W) -> logits (B, num_classes).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from lgframe.models.dit import Attention, CheckpointedBlock, Mlp, PatchEmbed, TransformerConfig


@dataclass
class ViTConfig(TransformerConfig):
    family: str = "vit"


class Block(CheckpointedBlock):
    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0, act: str = "gelu_tanh"):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act)

    def block_forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    family = "vit"

    def __init__(self, config: ViTConfig):
        super().__init__()
        config.validate()
        self.config = c = config
        self.patch_embed = PatchEmbed(c.patch_size, c.in_channels, c.width)
        n = (c.image_size // c.patch_size) ** 2
        self.cls_token = nn.Parameter(torch.zeros(1, 1, c.width))
        self.pos_embed = nn.Parameter(torch.zeros(1, n + 1, c.width))
        self.blocks = nn.ModuleList([Block(c.width, c.heads, c.mlp_ratio, c.mlp_act) for _ in range(c.depth)])
        self.norm = nn.LayerNorm(c.width, eps=1e-6)
        self.head = nn.Linear(c.width, c.num_classes)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        # timm's ViT init: truncated normal 0.02 for embeddings and linears, zero biases.
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        w = self.patch_embed.proj.weight.data
        nn.init.xavier_uniform_(w.view([w.shape[0], -1]))
        nn.init.zeros_(self.patch_embed.proj.bias)

    def forward_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Normed tokens (B, 1 + patches, width): the class token, then the patches."""
        x = self.patch_embed(x)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.norm(x)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_tokens(x)[:, 0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x))


# name -> (depth, width, heads); the patch size is the suffix "/p".
VIT_SIZES = {
    "ViT-B": (12, 768, 12),
    "ViT-S": (12, 384, 6),
    "ViT-Ti": (12, 192, 3),
    # Tiny sizes for CPU runs on 8x8 digits.
    "ViT-Micro": (8, 192, 6),
    "ViT-Nano": (6, 128, 4),
    "ViT-Pico": (4, 64, 2),
}
VIT_PATCHES = (2, 4, 8, 16, 32)
