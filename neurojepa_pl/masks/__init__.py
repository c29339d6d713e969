"""Multiscale 3D block masks (Neuro-JEPA), V-JEPA 2 multiblock masks (ablation) and the token foreground map.

Pure PyTorch; all randomness comes from an explicit ``torch.Generator`` (see `neurojepa_pl.seeding`).
"""

from neurojepa_pl.masks.foreground import foreground_token_map, foreground_voxel_mask
from neurojepa_pl.masks.multiscale import MultiscaleBlockMaskGenerator, paper_mask_generators
from neurojepa_pl.masks.vjepa2 import VJEPA2BlockMaskGenerator, vjepa2_mask_generators

__all__ = [
    "MultiscaleBlockMaskGenerator",
    "VJEPA2BlockMaskGenerator",
    "foreground_token_map",
    "foreground_voxel_mask",
    "paper_mask_generators",
    "vjepa2_mask_generators",
]
