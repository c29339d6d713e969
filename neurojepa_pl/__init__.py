"""neurojepa_pl: Neuro-JEPA pretraining, fine-tuning and evaluation in PyTorch Lightning."""

__version__ = "0.1.0"
