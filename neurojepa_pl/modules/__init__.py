"""LightningModules: JEPA pretraining here; the downstream modules live beside it and are added below as they land.

YAML experiment files name the classes by their full path (``neurojepa_pl.modules.pretrain.JEPAPretrainModule``).
"""

from neurojepa_pl.modules.pretrain import JEPAPretrainModule

__all__ = ["JEPAPretrainModule"]
