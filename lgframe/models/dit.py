"""Diffusion Transformer (DiT, Peebles & Xie 2023) with adaLN-Zero blocks.

The whole model in one file, as in facebookresearch/DiT `models.py`: embedders,
the block, the final layer, one `initialize_weights` that states every special
init, and the size table at the bottom. Attention runs through
`torch.nn.functional.scaled_dot_product_attention`.

Shapes: images x (B, C, H, W), timesteps t (B,), labels y (B,) with the null
class `num_classes` meaning "unconditional" (classifier-free guidance), or in
place of labels conditioning tokens (B, D) or (B, S, D), summed.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint


@dataclass
class TransformerConfig:
    """Size of a DiT or ViT; `family` says which."""

    depth: int = 6
    width: int = 128
    heads: int = 4
    patch_size: int = 2
    image_size: int = 8
    in_channels: int = 1
    num_classes: int = 10
    mlp_ratio: float = 4.0
    family: str = "dit"
    # DiT only: output channels (0 = in_channels; 2 * in_channels for a learned-sigma
    # checkpoint, whose extra channels lgframe ignores) and the timestep embedding's
    # frequency shift (diffusers' DiT uses 1, facebookresearch/DiT 0).
    out_channels: int = 0
    freq_shift: int = 0
    # MLP activation: GELU with the tanh approximation (DiT's) or exact (timm's ViT).
    mlp_act: str = "gelu_tanh"

    def to_dict(self) -> dict:
        return asdict(self)

    def validate(self) -> None:
        for key in ("depth", "width", "heads", "patch_size", "image_size", "in_channels", "num_classes"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key}={getattr(self, key)} must be a positive integer")
        validate_width(self.width, self.heads, self.family.replace("dit", "DiT").replace("vit", "ViT"))
        if self.mlp_act not in MLP_ACTS:
            raise ValueError(f"mlp_act={self.mlp_act!r}: valid values are {', '.join(MLP_ACTS)}")
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not divisible by patch_size {self.patch_size}")


@dataclass
class DiTConfig(TransformerConfig):
    family: str = "dit"


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


#################################################################################
#                              Shared layers                                    #
#################################################################################


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection: rows of `qkv` are
    [q heads | k heads | v heads], each (heads, head_dim)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, _ = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
        return self.proj(out.transpose(1, 2).reshape(B, N, -1))


MLP_ACTS = {"gelu_tanh": "tanh", "gelu": "none"}  # name -> nn.GELU(approximate=...)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, act: str = "gelu_tanh"):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU(approximate=MLP_ACTS[act])
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class PatchEmbed(nn.Module):
    """(B, C, H, W) -> (B, N, D) with a strided convolution."""

    def __init__(self, patch_size: int, in_channels: int, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


def sincos_at(dim: int, gy: torch.Tensor, gx: torch.Tensor) -> torch.Tensor:
    """The 2-D sine-cosine embedding of DiT/MAE at grid coordinates (gy, gx) (any shape,
    fractional allowed): (number of points, dim), x half first."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4.0))

    def emb(pos):
        out = pos.reshape(-1, 1).double() * omega.reshape(1, -1)
        return torch.cat([torch.sin(out), torch.cos(out)], dim=1)

    return torch.cat([emb(gx), emb(gy)], dim=1).float()


def sincos_pos_embed(dim: int, grid: int) -> torch.Tensor:
    """Fixed 2-D sine-cosine position embedding, (grid*grid, dim), as in DiT/MAE."""
    if dim % 4:
        raise ValueError(f"width {dim} must be a multiple of 4 for the 2-D sin-cos position embedding")
    coords = torch.arange(grid, dtype=torch.float64)
    gy, gx = torch.meshgrid(coords, coords, indexing="ij")
    return sincos_at(dim, gy, gx)


#################################################################################
#                 Embedding Layers for Timesteps and Class Labels               #
#################################################################################


class TimestepEmbedder(nn.Module):
    def __init__(self, dim: int, frequency_embedding_size: int = 256, freq_shift: int = 0):
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.freq_shift = freq_shift
        self.mlp = nn.Sequential(nn.Linear(frequency_embedding_size, dim), nn.SiLU(), nn.Linear(dim, dim))

    @staticmethod
    def timestep_embedding(t: torch.Tensor, dim: int, max_period: int = 10000, shift: int = 0) -> torch.Tensor:
        """(B,) -> (B, dim): [cos, sin] of t at geometric frequencies."""
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / (half - shift))
        args = t[:, None].float() * freqs[None]
        return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.timestep_embedding(t, self.frequency_embedding_size, shift=self.freq_shift))


class LabelEmbedder(nn.Module):
    """Class labels -> vectors. Row `num_classes` is the null class used for
    classifier-free guidance; label dropout happens in the task, not here.

    Token conditioning: a floating-point `y` is a conditioning vector in the
    embedding space, (B, D), or a short sequence of them, (B, S, D), summed; a
    class index is the special case of its table row (`token(y)`)."""

    def __init__(self, num_classes: int, dim: int):
        super().__init__()
        self.num_classes = num_classes
        self.embedding_table = nn.Embedding(num_classes + 1, dim)

    def token(self, y: torch.Tensor) -> torch.Tensor:
        """Class indices (...) -> their tokens (..., D): rows of the table (the null class included)."""
        return self.embedding_table(y)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        if not y.is_floating_point():
            return self.embedding_table(y)
        D = self.embedding_table.embedding_dim
        if y.dim() not in (2, 3) or y.shape[-1] != D:
            raise ValueError(f"a conditioning token must be (B, {D}) or a sequence (B, S, {D}) summed, "
                             f"got {tuple(y.shape)}; class indices are an integer tensor (B,)")
        return y if y.dim() == 2 else y.sum(1)


#################################################################################
#                                 Core DiT Model                                #
#################################################################################


class CheckpointedBlock(nn.Module):
    """A repeated block whose activations can be recomputed in the backward pass
    (`activation_checkpointing = True`, set by `lgframe.training.speed.set_activation_checkpointing`):
    only the block's inputs are kept, torch.utils.checkpoint (non-reentrant) runs `block_forward`
    again in the backward. The switch is checked inside `forward`, after the module's own
    hooks (FSDP2's unshard), so it composes with sharding, and it is an attribute, so a
    deep copy (the EMA's) carries it."""

    activation_checkpointing = False

    def forward(self, *args):
        if self.activation_checkpointing and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(self.block_forward, *args, use_reentrant=False)
        return self.block_forward(*args)

    def block_forward(self, *args):
        raise NotImplementedError


class DiTBlock(CheckpointedBlock):
    """Transformer block with adaptive layer norm zero (adaLN-Zero) conditioning."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0, act: str = "gelu_tanh"):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def block_forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x


class FinalLayer(nn.Module):
    def __init__(self, dim: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class DiT(nn.Module):
    """Noise-prediction DiT: forward(x, t, y) -> eps with the shape of x; y is class
    indices (B,) or conditioning tokens (B, D) / (B, S, D) (see LabelEmbedder)."""

    family = "dit"

    def __init__(self, config: DiTConfig):
        super().__init__()
        config.validate()
        self.config = config
        c = config
        self.out_channels = c.out_channels or c.in_channels
        self.x_embedder = PatchEmbed(c.patch_size, c.in_channels, c.width)
        self.t_embedder = TimestepEmbedder(c.width, freq_shift=c.freq_shift)
        self.y_embedder = LabelEmbedder(c.num_classes, c.width)
        grid = c.image_size // c.patch_size
        # Fixed sin-cos table kept as a frozen parameter, as in DiT: it travels with
        # the weights, so a descendant of another width inherits the ancestor's.
        self.pos_embed = nn.Parameter(sincos_pos_embed(c.width, grid).unsqueeze(0), requires_grad=False)
        self.blocks = nn.ModuleList([DiTBlock(c.width, c.heads, c.mlp_ratio, c.mlp_act) for _ in range(c.depth)])
        self.final_layer = FinalLayer(c.width, c.patch_size, self.out_channels)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        # Transformer layers: xavier uniform, zero bias (DiT).
        def _basic_init(module):
            if isinstance(module, nn.Linear):
                torch.nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.constant_(module.bias, 0)

        self.apply(_basic_init)
        # Patch embedding like a linear layer.
        w = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(w.view([w.shape[0], -1]))
        nn.init.constant_(self.x_embedder.proj.bias, 0)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        # adaLN-Zero: every block starts as the identity.
        for block in self.blocks:
            nn.init.constant_(block.adaLN_modulation[-1].weight, 0)
            nn.init.constant_(block.adaLN_modulation[-1].bias, 0)
        # Zero output layer: the untrained model predicts eps = 0.
        nn.init.constant_(self.final_layer.adaLN_modulation[-1].weight, 0)
        nn.init.constant_(self.final_layer.adaLN_modulation[-1].bias, 0)
        nn.init.constant_(self.final_layer.linear.weight, 0)
        nn.init.constant_(self.final_layer.linear.bias, 0)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, p*p*C) -> (B, C, H, W)."""
        c, p = self.out_channels, self.config.patch_size
        h = w = int(x.shape[1] ** 0.5)
        x = x.reshape(x.shape[0], h, w, p, p, c)
        x = torch.einsum("nhwpqc->nchpwq", x)
        return x.reshape(x.shape[0], c, h * p, w * p)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        x = self.x_embedder(x) + self.pos_embed
        c = self.t_embedder(t) + self.y_embedder(y)
        for block in self.blocks:
            x = block(x, c)
        return self.unpatchify(self.final_layer(x, c))


def validate_width(width: int, heads: int, what: str) -> None:
    if heads < 1 or width % heads:
        divisors = [h for h in range(1, width + 1) if width % h == 0 and (width // h) % 2 == 0]
        raise ValueError(
            f"{what} width {width} is not divisible by heads {heads}: attention needs whole heads. "
            f"Valid head counts for width {width}: {divisors}."
        )


#################################################################################
#                                DiT Configs                                    #
#################################################################################

# name -> (depth, width, heads); the patch size is the suffix "/p".
DIT_SIZES = {
    "DiT-XL": (28, 1152, 16),
    "DiT-L": (24, 1024, 16),
    "DiT-B": (12, 768, 12),
    "DiT-S": (12, 384, 6),
    # Tiny sizes that train on a CPU in minutes (8x8 digits, patch 2 -> 16 tokens).
    "DiT-Micro": (8, 192, 6),
    "DiT-Nano": (6, 128, 4),
    "DiT-Pico": (4, 64, 2),
}
DIT_PATCHES = (1, 2, 4, 8)
