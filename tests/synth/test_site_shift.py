import pandas as pd
import pytest

from neurojepa_pl.synth.site_shift import site_shift_manifests, write_site_shift_manifests


def _manifest(n_per_site: int = 10) -> pd.DataFrame:
    rows = []
    for site in ("site-0", "site-1", "site-2"):
        for i in range(n_per_site):
            subject = f"{site}-sub{i:02d}"
            for session in ("ses-01", "ses-02"):
                rows.append(
                    {
                        "subject_id": subject,
                        "session_id": session,
                        "modality": "FLAIR",
                        "path": f"{subject}/{session}.nii.gz",
                        "site": site,
                        "tumour": i % 2,
                    }
                )
    return pd.DataFrame(rows)


def test_source_and_target_partition_the_scans_by_site():
    manifest = _manifest()
    source, target = site_shift_manifests(manifest, "site-2", seed=3, stratify="tumour")
    assert set(target["site"]) == {"site-2"} and set(target["split"]) == {"test"}
    assert set(source["site"]) == {"site-0", "site-1"}
    assert len(source) + len(target) == len(manifest)
    # Patient level: both sessions of a subject share a split; 20 source subjects -> 12/4/4.
    assert (source.groupby("subject_id")["split"].nunique() == 1).all()
    per_split = source.drop_duplicates("subject_id")["split"].value_counts()
    assert per_split.to_dict() == {"train": 12, "val": 4, "test": 4}
    # Stratified: every split of the source holds both classes.
    assert (source.groupby("split")["tumour"].nunique() == 2).all()
    again, _ = site_shift_manifests(manifest, "site-2", seed=3, stratify="tumour")
    assert again["split"].tolist() == source["split"].tolist()


def test_an_existing_split_column_is_replaced():
    manifest = _manifest().assign(split="train")
    source, target = site_shift_manifests(manifest, "site-0")
    assert set(target["split"]) == {"test"} and set(source["split"]) == {"train", "val", "test"}


@pytest.mark.parametrize(
    "change, holdout, message",
    [
        (lambda m: m.drop(columns="site"), "site-0", "no site column"),
        (lambda m: m, "site-9", "is not in the manifest"),
        (lambda m: m.assign(site="site-0"), "site-0", "one site"),
        (lambda m: m.assign(site=["site-0", "site-1"] * (len(m) // 2)), "site-0", "several sites"),
    ],
)
def test_bad_inputs_are_named(change, holdout, message):
    with pytest.raises(ValueError, match=message):
        site_shift_manifests(change(_manifest()), holdout)


def test_written_beside_the_manifest(tmp_path):
    path = tmp_path / "manifest.csv"
    _manifest(5).to_csv(path, index=False)
    source_path, target_path = write_site_shift_manifests(path, "site-1")
    assert source_path == tmp_path / "manifest_source.csv"
    assert target_path == tmp_path / "manifest_holdout_site-1.csv"
    assert pd.read_csv(target_path)["site"].eq("site-1").all()
