"""Lightning data modules (installed as ``neurojepa_pl.data_modules``).

Modules: ``datasets`` (cached, validated scan dataset with quarantine), ``collate`` (JEPA mask collation),
``base`` / ``pretrain`` / ``finetune`` / ``multimodal`` (the data modules), ``cohorts`` (one module per public cohort
on the authors' published splits), ``fast_cache`` / ``gpu_augment`` (the memory-mapped cache and batched augmentation
of ``neurojepa build-cache`` and the benchmarks).

The vocabulary they share with the rest of the library (manifest schema, validation, splits, pairing, the MONAI
loading chains) is the pure :mod:`neurojepa_pl.data`; import it from there.
"""
