import math

import pandas as pd
import pytest

from neurojepa_pl.data.subsets import patient_subset, subject_rank_key
from neurojepa_pl.errors import UserValueError


def _rows(n_subjects: int = 40) -> pd.DataFrame:
    return pd.DataFrame(
        [
            {"subject_id": f"sub-{i:03d}", "session_id": session, "path": f"{i}_{session}.nii.gz"}
            for i in range(n_subjects)
            for session in ("ses-01", "ses-02")
        ]
    )


def test_subsets_are_patient_level_sized_and_nested():
    rows = _rows()
    kept = {f: set(patient_subset(rows, f, seed=3)["subject_id"]) for f in (0.1, 0.25, 0.5, 1.0)}
    assert [len(kept[f]) for f in (0.1, 0.25, 0.5, 1.0)] == [4, 10, 20, 40]
    assert kept[0.1] < kept[0.25] < kept[0.5] < kept[1.0]
    subset = patient_subset(rows, 0.25, seed=3)
    assert (subset.groupby("subject_id").size() == 2).all()  # every scan of a kept patient
    assert subset.index.is_monotonic_increasing  # original order


def test_a_subjects_membership_depends_only_on_seed_and_id():
    rows = _rows()
    shuffled = rows.sample(frac=1.0, random_state=0)
    assert set(patient_subset(shuffled, 0.25, 1)["subject_id"]) == set(patient_subset(rows, 0.25, 1)["subject_id"])
    # Extra subjects may take places in the ranking but never reorder the others.
    ranks = sorted(rows["subject_id"].unique(), key=lambda s: subject_rank_key(s, 1))
    bigger = pd.concat([rows, _rows(60).iloc[80:]])
    bigger_ranks = [
        s for s in sorted(bigger["subject_id"].unique(), key=lambda s: subject_rank_key(s, 1)) if s in set(ranks)
    ]
    assert bigger_ranks == ranks
    assert set(patient_subset(rows, 0.25, 1)["subject_id"]) != set(patient_subset(rows, 0.25, 2)["subject_id"])


def test_small_fractions_keep_at_least_one_patient_and_bad_ones_are_refused():
    assert patient_subset(_rows(5), 0.01, 0)["subject_id"].nunique() == 1
    assert len(patient_subset(_rows(7), 0.5, 0).drop_duplicates("subject_id")) == math.ceil(3.5)
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(UserValueError, match="subset_fraction must be in \\(0, 1\\]"):
            patient_subset(_rows(), bad)
