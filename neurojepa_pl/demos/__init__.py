"""The README's demonstrations on SynthBrain, as runnable modules (``python -m neurojepa_pl.demos.<name>``).

Each drives the same LightningCLI (``neurojepa fit`` / ``neurojepa test``) a user types, with the repository's
experiment YAMLs, so they need a checkout of the repository (``experiments/``), not only the installed package:

- :mod:`~neurojepa_pl.demos.pretrain_probe`: ``make demo``: SynthBrain cohort, JEPA pretraining, then the probe table;
- :mod:`~neurojepa_pl.demos.probe_table`: the probe table alone (JEPA probe, random-init probe, CNN from scratch);
- :mod:`~neurojepa_pl.demos.multimodal`: T1w, FLAIR and the five fusion heads on one split, then the multimodal gain.
"""
