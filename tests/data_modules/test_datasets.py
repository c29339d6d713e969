"""MRIScanDataset: cached loading, failure reporting and skipping, cache keys and invalidation, seeded augmentation;
damaged cache entries reported and rebuilt, entry writes that a kill or a second process cannot leave half-done."""

from __future__ import annotations

import csv
import io
import os
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest
import torch
from monai.transforms import LoadImaged
from volume_factory import TINY_CROP, TINY_RESIZE, blob_volume, truncate_file, write_nifti

from neurojepa_pl.data.transforms import eval_transforms, pretrain_augmentations
from neurojepa_pl.data_modules.datasets import FailureLog, MRIScanDataset, ScanFailure, TooManyFailedScans


def _records(tmp_path, n=3):
    recs = []
    for i in range(n):
        path = write_nifti(tmp_path / f"scan_{i}.nii.gz", blob_volume(seed=i))
        recs.append({"path": str(path), "subject_id": f"s{i}", "session_id": "1", "modality": "T1w"})
    return recs


def _pt_files(dataset):
    return sorted(p.name for p in dataset.cache_path.glob("*.pt"))


def test_samples_shapes_ranges_and_metadata(tmp_path, tiny_settings):
    ds = MRIScanDataset(
        _records(tmp_path), tiny_settings, cache_dir=tmp_path / "cache", augment=eval_transforms(tiny_settings)
    )
    assert ds.preload() == []
    sample = ds[1]
    assert sample["image"].shape == (1, *TINY_CROP) and sample["image"].dtype == torch.float32
    assert 0.0 <= float(sample["image"].min()) and float(sample["image"].max()) <= 1.0
    assert float(sample["image"].max()) > 0.5  # a brain, not a blank
    assert (sample["subject_id"], sample["modality"], sample["path"]) == ("s1", "T1w", str(tmp_path / "scan_1.nii.gz"))
    raw = MRIScanDataset(_records(tmp_path), tiny_settings, cache_dir=tmp_path / "cache")[0]
    assert raw["image"].shape == (1, *TINY_RESIZE)  # no augmentation: the cached volume


def test_corrupt_and_nan_scans_reported_and_skipped(tmp_path, tiny_settings):
    recs = _records(tmp_path, n=4)
    truncate_file(tmp_path / "scan_1.nii.gz")
    bad = blob_volume(seed=2)
    bad[5:7, 5, 5] = np.nan
    write_nifti(tmp_path / "scan_2.nii.gz", bad)
    log = FailureLog()
    ds = MRIScanDataset(recs, tiny_settings, cache_dir=tmp_path / "cache", failure_log=log)
    failures = ds.preload(num_workers=0)
    assert [f.path for f in failures] == [recs[1]["path"], recs[2]["path"]]
    assert "EOFError" in failures[0].reason
    assert failures[1].reason.startswith("2 of 124416 voxels are non-finite (NaN: 2, Inf: 0)")
    assert failures[0].subject_id == "s1" and list(log) == failures
    assert len(ds) == 2 and [ds[i]["subject_id"] for i in range(2)] == ["s0", "s3"]
    assert all(float(ds[i]["image"].max()) > 0.5 for i in range(2))  # never a zero image
    assert len(_pt_files(ds)) == 2  # failures are not cached

    out = log.write_csv(tmp_path / "logs" / "quarantine.csv")
    rows = list(csv.DictReader(out.open()))
    assert [r["path"] for r in rows] == [recs[1]["path"], recs[2]["path"]]
    assert rows[1]["reason"].startswith("2 of 124416")


def test_preload_with_workers_matches_serial(tmp_path, tiny_settings):
    recs = _records(tmp_path, n=4)
    truncate_file(tmp_path / "scan_3.nii.gz")
    ds = MRIScanDataset(recs, tiny_settings, cache_dir=tmp_path / "cache")
    failures = ds.preload(num_workers=2)
    assert [f.path for f in failures] == [recs[3]["path"]]
    assert len(ds) == 3 and len(_pt_files(ds)) == 3


def test_unpreloaded_failure_raises_with_path(tmp_path, tiny_settings):
    recs = _records(tmp_path, n=1)
    truncate_file(tmp_path / "scan_0.nii.gz")
    ds = MRIScanDataset(recs, tiny_settings, cache_dir=None)
    with pytest.raises(RuntimeError, match=r"cannot load scan .*scan_0\.nii\.gz: EOFError.*Call preload\(\)"):
        ds[0]


def test_failure_fraction_limit():
    log = FailureLog([ScanFailure(f"/x/{i}.nii.gz", "EOFError: truncated") for i in range(2)])
    log.raise_if_too_many(total=200, max_failed_fraction=0.01)  # exactly 1 %: allowed
    with pytest.raises(TooManyFailedScans, match=r"2 of 199 scans failed .*\n  /x/0.nii.gz: EOFError") as info:
        log.raise_if_too_many(total=199, max_failed_fraction=0.01, quarantine="/runs/q.csv")
    assert "/runs/q.csv" in str(info.value) and "validate-manifest" in str(info.value)


def test_cache_is_reused(tmp_path, tiny_settings, monkeypatch):
    recs = _records(tmp_path)
    first = MRIScanDataset(recs, tiny_settings, cache_dir=tmp_path / "cache")
    first.preload()
    files = _pt_files(first)
    assert len(files) == 3 and (first.cache_path / "settings.json").is_file()
    assert first.cache_path.name == tiny_settings.digest()
    expected = first[0]["image"]

    def no_loading(self, data, *args, **kwargs):
        raise AssertionError("LoadImaged ran although the cache should have served this scan")

    monkeypatch.setattr(LoadImaged, "__call__", no_loading)
    second = MRIScanDataset(recs, tiny_settings, cache_dir=tmp_path / "cache")
    assert second.preload() == []
    torch.testing.assert_close(second[0]["image"], expected)
    assert _pt_files(second) == files


def test_cache_invalidated_by_setting_change(tmp_path, tiny_settings):
    recs = _records(tmp_path)
    a = MRIScanDataset(recs, tiny_settings, cache_dir=tmp_path / "cache")
    a.preload()
    changed = replace(tiny_settings, resize_to=(36, 40, 36))
    b = MRIScanDataset(recs, changed, cache_dir=tmp_path / "cache")
    assert b.cache_path != a.cache_path
    assert _pt_files(b) == []  # nothing stale to reuse
    b.preload()
    assert b[0]["image"].shape == (1, 36, 40, 36)
    assert a[0]["image"].shape == (1, *TINY_RESIZE)  # the old entry is untouched
    # the crop size is applied after the cache: same cache directory
    c = MRIScanDataset(recs, replace(tiny_settings, spatial_size=(16, 16, 16)), cache_dir=tmp_path / "cache")
    assert c.cache_path == a.cache_path


def test_replaced_file_is_not_served_stale(tmp_path, tiny_settings):
    recs = _records(tmp_path, n=1)
    a = MRIScanDataset(recs, tiny_settings, cache_dir=tmp_path / "cache")
    a.preload()
    before = a[0]["image"]
    path = tmp_path / "scan_0.nii.gz"
    write_nifti(path, blob_volume(seed=99, radius=0.6))
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # make sure the mtime moves
    b = MRIScanDataset(recs, tiny_settings, cache_dir=tmp_path / "cache")
    b.preload()
    after = b[0]["image"]
    assert not torch.allclose(before, after)
    assert len(_pt_files(b)) == 2


def test_augmentation_is_a_function_of_seed_epoch_position(tmp_path, tiny_settings):
    recs = _records(tmp_path, n=2)
    ds = MRIScanDataset(
        recs, tiny_settings, cache_dir=tmp_path / "cache", augment=pretrain_augmentations(tiny_settings), seed=5
    )
    ds.preload()
    a = ds[(3, 7, 1)]["image"]
    ds[(0, 0, 0)]  # other draws in between must not matter
    torch.testing.assert_close(ds[(3, 7, 1)]["image"], a)
    twin = MRIScanDataset(
        recs, tiny_settings, cache_dir=tmp_path / "cache", augment=pretrain_augmentations(tiny_settings), seed=5
    )
    torch.testing.assert_close(twin[(3, 7, 1)]["image"], a)
    others = [ds[(4, 7, 1)]["image"], ds[(3, 8, 1)]["image"]]  # another epoch, another position
    assert all(not torch.equal(o, a) for o in others)


def test_records_are_checked(tmp_path, tiny_settings):
    with pytest.raises(ValueError, match="no 'path'"):
        MRIScanDataset([{"subject_id": "1"}], tiny_settings)
    with pytest.raises(ValueError, match="must not contain the key 'image'"):
        MRIScanDataset([{"path": "/a.nii.gz", "image": 1}], tiny_settings)


# ----------------------------------------------------------------------------------------------------------------------
# Damaged cache entries, interrupted entry writes, two processes filling one cache folder
# ----------------------------------------------------------------------------------------------------------------------
def _damage(kind: str, data: bytes) -> bytes:
    return {
        "truncated": data[: len(data) // 2],  # MONAI 1.6 re-raises this one (zip directory missing)
        "empty": b"",  # ... and this one (EOFError)
        "garbage": np.random.default_rng(0).integers(0, 255, len(data), dtype=np.uint8).tobytes(),
    }[kind]


@pytest.mark.parametrize("kind", ["truncated", "empty", "garbage"])
def test_corrupt_cache_entry_is_reported_and_rebuilt(kind, tmp_path, tiny_settings, caplog):
    recs = _records(tmp_path, n=2)
    first = MRIScanDataset(recs, tiny_settings, cache_dir=tmp_path / "cache")
    first.preload()
    entries = sorted(first.cache_path.glob("*.pt"))
    for entry in entries:
        entry.write_bytes(_damage(kind, entry.read_bytes()))

    caplog.set_level("WARNING", logger="neurojepa_pl.data_modules.datasets")
    again = MRIScanDataset(recs, tiny_settings, cache_dir=tmp_path / "cache")
    assert again.preload() == []  # the scans are fine: nothing is quarantined because of a bad cache file
    warnings = [r.getMessage() for r in caplog.records if "corrupt cache entry" in r.getMessage()]
    assert len(warnings) == 2
    for entry in entries:
        (message,) = [w for w in warnings if str(entry) in w]
        assert "(scan " in message and message.endswith("deleting and rebuilding it")
    fresh = MRIScanDataset(recs, tiny_settings, cache_dir=None)
    for i in range(2):
        torch.testing.assert_close(again[i]["image"], fresh[i]["image"], rtol=0, atol=0)
        assert torch.load(entries[i], weights_only=True)["image"].shape == (1, *TINY_RESIZE)  # rewritten whole


def test_interrupted_entry_write_leaves_nothing_at_the_final_path(tmp_path, tiny_settings, monkeypatch):
    recs = _records(tmp_path, n=1)
    dataset = MRIScanDataset(recs, tiny_settings, cache_dir=tmp_path / "cache")
    real_save = torch.save
    seen = {}

    def killed_halfway(obj, f, **kwargs):
        seen["folder"] = os.path.dirname(f.name)  # the partial file is in the cache folder: one rename, no copy
        seen["entries_meanwhile"] = sorted(dataset.cache_path.glob("*.pt"))
        buffer = io.BytesIO()
        real_save(obj, buffer, **kwargs)
        f.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
        raise KeyboardInterrupt  # what a kill looks like from inside the writer

    monkeypatch.setattr(torch, "save", killed_halfway)
    with pytest.raises(KeyboardInterrupt):
        dataset[0]
    assert seen == {"folder": str(dataset.cache_path), "entries_meanwhile": []}
    assert sorted(p.name for p in dataset.cache_path.iterdir()) == ["settings.json"]  # no entry, no partial file
    monkeypatch.setattr(torch, "save", real_save)
    assert float(dataset[0]["image"].max()) > 0.5 and len(_pt_files(dataset)) == 1


def test_preload_removes_partial_files_of_killed_writers(tmp_path, tiny_settings):
    recs = _records(tmp_path, n=1)
    dataset = MRIScanDataset(recs, tiny_settings, cache_dir=tmp_path / "cache")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    leftover = dataset.cache_path / f".partial-{int(dead.stdout)}-0123abcd.tmp"
    leftover.write_bytes(b"half an entry")
    dataset.preload()
    assert not leftover.exists() and len(_pt_files(dataset)) == 1


def _fill_cache(barrier, records, settings, cache_dir) -> list[str]:
    torch.set_num_threads(1)
    barrier.wait()
    return [f.path for f in MRIScanDataset(records, settings, cache_dir=cache_dir).preload()]


@pytest.mark.slow
def test_two_processes_filling_one_cache_folder_leave_valid_entries(tmp_path, tiny_settings):
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    recs = _records(tmp_path, n=6)
    context = mp.get_context("spawn")
    with context.Manager() as manager, ProcessPoolExecutor(2, mp_context=context) as pool:
        barrier = manager.Barrier(2)
        futures = [pool.submit(_fill_cache, barrier, recs, tiny_settings, tmp_path / "cache") for _ in range(2)]
        assert [f.result(timeout=300) for f in futures] == [[], []]  # neither saw a broken entry of the other

    cached = MRIScanDataset(recs, tiny_settings, cache_dir=tmp_path / "cache")
    assert sorted(p.name for p in cached.cache_path.iterdir() if p.suffix != ".pt") == ["settings.json"]
    assert len(_pt_files(cached)) == 6
    fresh = MRIScanDataset(recs, tiny_settings, cache_dir=None)
    for i in range(6):
        entry = cached._persistent.entry_path(cached._persistent.data[i])
        torch.testing.assert_close(torch.load(entry, weights_only=True)["image"], fresh[i]["image"], rtol=0, atol=0)
