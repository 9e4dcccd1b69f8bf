"""Models: lgframe's DiT (`dit`) and ViT (`vit`), the size table with names that encode
sizes (`registry`: `create_model("DiT-Nano/2")`), model files (`files`: one
safetensors file with the config in its header; checkpoints read back) and the
converters to and from diffusers and timm (`convert`).
"""

from lgframe.models.registry import FAMILIES, create_model, model_from_config, model_names, parse_size, resolve_config

__all__ = ["FAMILIES", "create_model", "model_from_config", "model_names", "parse_size", "resolve_config"]
