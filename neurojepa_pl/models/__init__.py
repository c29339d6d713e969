"""Pure-PyTorch models: 3D ViT encoder (RoPE, gated attention, MoE), JEPA predictor, registry, weight I/O.

Nothing here imports Lightning. Other files of this package (heads, fusion, cnn) are imported explicitly below as
they are added.
"""

from neurojepa_pl.models.checkpoint import export_backbone, load_backbone, load_predictor
from neurojepa_pl.models.moe import MoEConfig, balance_bias_update, ddp_ignored_buffer_names
from neurojepa_pl.models.predictor import Predictor3D
from neurojepa_pl.models.registry import (
    build_encoder,
    build_predictor,
    encoder_config,
    list_encoders,
    list_predictors,
    predictor_config,
)
from neurojepa_pl.models.vit3d import VisionTransformer3D

__all__ = [
    "MoEConfig",
    "Predictor3D",
    "VisionTransformer3D",
    "balance_bias_update",
    "build_encoder",
    "build_predictor",
    "ddp_ignored_buffer_names",
    "encoder_config",
    "export_backbone",
    "list_encoders",
    "list_predictors",
    "load_backbone",
    "load_predictor",
    "predictor_config",
]
