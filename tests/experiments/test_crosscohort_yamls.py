"""Every experiments/crosscohort pair runs end to end at tiny size: `neurojepa fit` of the source YAML, then
`neurojepa test` of its checkpoint in-cohort and, with the target YAML stacked, on the target data; the report names
both sides and a target with other labels is refused.

Naming: ``<source>.yaml`` is a complete fine-tuning experiment and ``<source>_to_<target>.yaml`` the fragment that
points its test at the target data. The registered-cohort pairs (NACC -> ADNI) run on scan tables that give tiny
SynthBrain volumes the IDs of the published split files; the SynthBrain pair on a generated 3-site cohort.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from downstream_tiny import tiny_overrides

from neurojepa_pl.cli import lightning_main
from neurojepa_pl.data_modules.cohorts import default_split_dir, get_cohort_spec, read_split_files
from neurojepa_pl.data_modules.cohorts.split_files import SCAN_ID_PREFIX
from neurojepa_pl.errors import UserValueError

YAML_DIR = Path(__file__).resolve().parents[2] / "experiments" / "crosscohort"
SOURCES = sorted(p for p in YAML_DIR.glob("*.yaml") if "_to_" not in p.stem)
TARGETS = sorted(p for p in YAML_DIR.glob("*.yaml") if "_to_" in p.stem)
# The registered-cohort pairs: (source YAML, target YAML) -> the (cohort, task, modality) of each side.
COHORT_PAIRS = {
    "nacc_ad_t1w_to_adni": (("NACC", "ad", "T1w"), ("ADNI", "ad", "T1w")),
    "nacc_amyloid_flair_to_adni": (("NACC", "amyloid", "FLAIR"), ("ADNI", "amyloid", "FLAIR")),
}
TINY_GEOMETRY = [
    "--data.init_args.spatial_size",
    "[32,36,32]",
    "--data.init_args.resize_to",
    "[34,40,34]",
    "--data.init_args.pad_crop_size",
    "null",
    "--data.init_args.target_spacing",
    "null",
]


def test_every_source_has_a_target_and_every_target_a_source():
    assert {p.stem for p in SOURCES} >= {"synth_site_shift_tumour", "nacc_ad_t1w", "nacc_amyloid_flair"}
    for source in SOURCES:
        assert list(YAML_DIR.glob(f"{source.stem}_to_*.yaml")), f"{source.name} has no <source>_to_<target>.yaml"
    for target in TARGETS:
        assert (YAML_DIR / f"{target.stem.split('_to_')[0]}.yaml").is_file(), f"{target.name} has no source"
    assert set(COHORT_PAIRS) | {"synth_site_shift_tumour_to_site-2"} == {p.stem for p in TARGETS}


def _without_fast_dev_run(args: list[str]) -> list[str]:
    """A real (short) fit: fast_dev_run writes no checkpoint, and the test needs one."""
    index = args.index("--trainer.fast_dev_run")
    return [*args[:index], *args[index + 2 :], "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2"]


def _report(run: Path) -> dict:
    return json.loads((run / "metrics.json").read_text())


@pytest.fixture(scope="module")
def site_shift_cohort(tmp_path_factory) -> tuple[Path, Path]:
    """An 18-subject, 3-site FLAIR cohort on the tiny grid with its site-shift pair (site-2 held out)."""
    from neurojepa_pl.synth import generate_cohort
    from neurojepa_pl.synth.site_shift import write_site_shift_manifests

    out = tmp_path_factory.mktemp("site_shift")
    generate_cohort(out, n_subjects=18, seed=5, grid=(48, 54, 48), modalities=("FLAIR",), prevalence={"tumour": 0.5})
    return write_site_shift_manifests(out / "manifest.csv", "site-2", seed=5, stratify="tumour")


@pytest.mark.slow
def test_synthbrain_site_shift_pair(site_shift_cohort, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the YAML logs under ./runs
    source_manifest, target_manifest = site_shift_cohort
    source, target = YAML_DIR / "synth_site_shift_tumour.yaml", YAML_DIR / "synth_site_shift_tumour_to_site-2.yaml"
    common = [*tiny_overrides(source_manifest, source), "--model.init_args.n_bootstrap", "20"]
    lightning_main(["fit", "--config", str(source), *_without_fast_dev_run(common)])
    ckpt = tmp_path / "runs/crosscohort/synth_site_shift_tumour/version_0/checkpoints/best.ckpt"
    assert ckpt.is_file()
    test_args = [a for a in common if a not in ("--trainer.fast_dev_run", "1")]

    lightning_main(["test", "--config", str(source), *test_args, "--ckpt_path", str(ckpt)])
    in_cohort = _report(ckpt.parents[1])["transfer"]
    assert in_cohort["cross_cohort"] is False
    assert in_cohort["source"]["cohort"] == in_cohort["target"]["cohort"] == str(source_manifest.resolve())

    held_out = ["--data.init_args.manifest", str(target_manifest)]
    lightning_main(
        ["test", "--config", str(source), "--config", str(target), *test_args, *held_out, "--ckpt_path", str(ckpt)]
    )
    report = _report(ckpt.parents[2] / "to_site-2")
    transfer = report["transfer"]
    assert transfer["cross_cohort"] is True
    assert transfer["source"]["sites"] == ["site-0", "site-1"] and transfer["target"]["sites"] == ["site-2"]
    assert transfer["source"]["endpoint"] == transfer["target"]["endpoint"] == "tumour"
    assert report["n"] == len(pd.read_csv(target_manifest).query("modality == 'FLAIR'"))

    # A target that serves another label is refused, naming both sides.
    other_label = [*held_out, "--data.init_args.label_columns", "[infarct]"]
    with pytest.raises(UserValueError, match=r"(?s)endpoint differ.*source \(checkpoint\).*tumour.*infarct"):
        lightning_main(["test", "--config", str(source), "--config", str(target), *test_args, *other_label,
                        "--ckpt_path", str(ckpt)])  # fmt: skip


def _scan_table(key: tuple[str, str, str], scans: list[str], out: Path, per_class: int = 2) -> Path:
    """A scan table giving ``per_class`` subjects per label value and split of a published split family a scan for
    each of their rows (links to existing tiny NIfTIs, reused cyclically), keyed the way the cohort's join expects."""
    spec = get_cohort_spec(*key)
    rows, _, _ = read_split_files(spec, default_split_dir())
    label = spec.task_labels[0]
    first = rows.drop_duplicates("subject_id")
    chosen = pd.concat(group.groupby(label).head(per_class) for _, group in first.groupby("split", sort=False))[
        "subject_id"
    ]
    records = []
    modality = spec.modality
    for subject in chosen:
        subject_rows = rows[rows["subject_id"] == subject]
        if spec.join_level == "scan":
            sessions = list(subject_rows[SCAN_ID_PREFIX + modality])
        else:  # per-subject join: one session per split row of the subject, in order
            sessions = [f"v{k + 1}" for k in range(len(subject_rows))]
        for session in sessions:
            link = out / f"{spec.cohort}_{spec.task}_scans" / f"{len(records):03d}_{modality}.nii.gz"
            link.parent.mkdir(exist_ok=True)
            link.symlink_to(scans[len(records) % len(scans)])  # every scan listed once
            records.append((subject, session, modality, str(link)))
    path = out / f"{spec.cohort}_{spec.task}_scans.csv"
    pd.DataFrame(records, columns=["subject_id", "session_id", "modality", "path"]).to_csv(path, index=False)
    return path


def _cohort_args(scan_table: Path, work: Path, cache: Path) -> list[str]:
    return [
        "--model.init_args.backbone",
        "vit_tiny",
        "--model.init_args.backbone_kwargs",
        "{img_size: [32,36,32], patch_size: 4}",
        "--model.init_args.finetune",
        "probe",
        "--model.init_args.moe_bias_update_rate",
        "0.0",
        "--model.init_args.n_bootstrap",
        "20",
        "--data.init_args.data_root",
        "null",
        "--data.init_args.scan_table",
        str(scan_table),
        "--data.init_args.work_dir",
        str(work),
        "--data.init_args.cache_dir",
        str(cache),
        *TINY_GEOMETRY,
        "--data.init_args.batch_size",
        "4",
        "--data.init_args.num_workers",
        "0",
        "--data.init_args.pin_memory",
        "false",
        "--trainer.accelerator",
        "cpu",
        "--trainer.precision",
        "32",
    ]


@pytest.mark.slow
@pytest.mark.parametrize("pair", sorted(COHORT_PAIRS))
def test_registered_cohort_pair(pair, synth_cohort, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    source_key, target_key = COHORT_PAIRS[pair]
    manifest = pd.read_csv(synth_cohort)
    scans = [str(synth_cohort.parent / p) for p in manifest.loc[manifest["modality"] == "T1w", "path"]]
    source_table = _scan_table(source_key, scans, tmp_path)
    target_table = _scan_table(target_key, scans, tmp_path)
    source = YAML_DIR / f"{pair.split('_to_')[0]}.yaml"
    target = YAML_DIR / f"{pair}.yaml"
    source_args = _cohort_args(source_table, tmp_path / "work", tmp_path / "cache")
    fit = ["--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2"]
    lightning_main(["fit", "--config", str(source), *source_args, *fit])
    ckpt = next((tmp_path / "runs" / "crosscohort").glob("*/version_0/checkpoints/best.ckpt"))

    target_args = _cohort_args(target_table, tmp_path / "work", tmp_path / "cache")
    lightning_main(["test", "--config", str(source), "--config", str(target), *target_args, "--ckpt_path", str(ckpt)])
    report = _report(ckpt.parents[2] / f"to_{pair.split('_to_')[1]}")
    transfer = report["transfer"]
    assert (transfer["source"]["cohort"], transfer["target"]["cohort"]) == (source_key[0], target_key[0])
    assert transfer["cross_cohort"] is True and transfer["source"]["endpoint"] == transfer["target"]["endpoint"]
    assert report["n"] >= 2 and report["task"] == "binary"
