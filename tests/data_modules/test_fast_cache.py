"""Fast memmap cache: same volumes as the NIfTI chain, quarantine, invalidation, dataset samples, CLI."""

from __future__ import annotations

import dataclasses
import io
import json
import pickle
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from volume_factory import blob_volume, make_cohort, truncate_file, write_nifti

from neurojepa_pl.data import load_manifest
from neurojepa_pl.data.transforms import loading_transforms, pretrain_augmentations
from neurojepa_pl.data_modules.fast_cache import (
    FastCacheDataset,
    _npy_header,
    build_fast_cache,
    cache_folder,
    dequantize,
    quantize,
)


@pytest.fixture
def cohort(tmp_path):
    manifest_path = make_cohort(tmp_path / "cohort", n_subjects=6)
    manifest = load_manifest(manifest_path)
    broken = tmp_path / "cohort" / "broken"
    truncated = truncate_file(write_nifti(broken / "truncated_T1w.nii.gz", blob_volume(seed=11)))
    nan_volume = blob_volume(seed=12)
    nan_volume[10, 10, 10] = np.nan
    with_nan = write_nifti(broken / "nan_T1w.nii.gz", nan_volume)
    extra = pd.DataFrame(
        [
            {**manifest.iloc[0].to_dict(), "subject_id": "bad1", "path": str(truncated)},
            {**manifest.iloc[0].to_dict(), "subject_id": "bad2", "path": str(with_nan)},
        ]
    )
    return pd.concat([manifest.iloc[:3], extra, manifest.iloc[3:]], ignore_index=True)


@pytest.fixture
def small_cohort(tmp_path):
    return load_manifest(make_cohort(tmp_path / "small", n_subjects=5))


def test_npy_header_padding_keeps_the_file_loadable():
    shape = (9, 4, 5, 6)
    long_header = _npy_header(np.dtype("uint8"), (10**6, 4, 5, 6))
    padded = _npy_header(np.dtype("uint8"), shape, total_length=len(long_header))
    assert len(padded) == len(long_header) and len(padded) % 64 == 0
    data = np.arange(np.prod(shape), dtype=np.uint8).reshape(shape)
    loaded = np.load(io.BytesIO(padded + data.tobytes()))
    np.testing.assert_array_equal(loaded, data)


def test_quantize_round_trip_error_is_half_a_step():
    volume = np.linspace(-0.02, 1.02, 1000, dtype=np.float32)  # spline overshoot outside [0, 1] is clipped
    restored = dequantize(quantize(volume, "uint8")).numpy()
    assert np.abs(restored - np.clip(volume, 0, 1)).max() <= 0.5 / 255 + 1e-7
    restored16 = dequantize(quantize(volume, "float16")).numpy()
    assert np.abs(restored16 - volume).max() < 1e-3


def test_cache_matches_the_nifti_chain_and_quarantines_failures(cohort, tmp_path, tiny_settings):
    index = build_fast_cache(cohort, tmp_path / "cache", tiny_settings, dtype="uint8")
    folder = cache_folder(tmp_path / "cache", tiny_settings, "uint8")
    assert index.attrs["cache_dir"] == str(folder) and folder.name.startswith(tiny_settings.digest())

    quarantine = index.attrs["quarantine"]
    assert quarantine["manifest_row"].tolist() == [3, 4]
    assert "non-finite" in quarantine["reason"].iloc[1]
    assert quarantine["reason"].iloc[0]  # the truncated gzip's reader error
    assert index["manifest_row"].tolist() == [0, 1, 2, 5, 6, 7]
    volumes = np.load(folder / "volumes.npy", mmap_mode="r")
    assert volumes.shape == (6, *tiny_settings.resize_to) and volumes.dtype == np.uint8

    dataset = FastCacheDataset(folder)
    chain = loading_transforms(tiny_settings)
    for i in range(len(dataset)):
        sample = dataset[i]
        row = cohort.iloc[int(index["manifest_row"].iloc[i])]
        expected = chain({"image": row["path"]})["image"]
        assert sample["image"].shape == (1, *tiny_settings.resize_to) and sample["image"].dtype == torch.float32
        assert float((sample["image"] - expected.clamp(0, 1)).abs().max()) <= 0.5 / 255 + 1e-6
        assert (sample["subject_id"], sample["path"], sample["tumour"]) == (
            row["subject_id"], row["path"], row["tumour"]
        )  # fmt: skip
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["quarantined"] == 2 and meta["shape"] == [6, *tiny_settings.resize_to]


def test_float16_cache_and_parallel_build_give_the_same_volumes(cohort, tmp_path, tiny_settings):
    serial = build_fast_cache(cohort, tmp_path / "a", tiny_settings, dtype="float16", workers=1)
    parallel = build_fast_cache(cohort, tmp_path / "b", tiny_settings, dtype="float16", workers=2)
    first = np.load(cache_folder(tmp_path / "a", tiny_settings, "float16") / "volumes.npy")
    second = np.load(cache_folder(tmp_path / "b", tiny_settings, "float16") / "volumes.npy")
    np.testing.assert_array_equal(first, second)
    assert serial["manifest_row"].tolist() == parallel["manifest_row"].tolist()
    sample = FastCacheDataset(serial.attrs["cache_dir"])[0]["image"]
    expected = loading_transforms(tiny_settings)({"image": cohort["path"].iloc[0]})["image"]
    assert float((sample - expected).abs().max()) < 1e-3


def test_reuse_and_invalidation(small_cohort, tmp_path, tiny_settings):
    cohort = small_cohort
    index = build_fast_cache(cohort, tmp_path / "cache", tiny_settings)
    volumes = cache_folder(tmp_path / "cache", tiny_settings, "uint8") / "volumes.npy"
    built = volumes.stat().st_mtime_ns
    build_fast_cache(cohort, tmp_path / "cache", tiny_settings)
    assert volumes.stat().st_mtime_ns == built  # same manifest and files: reused

    changed = dataclasses.replace(tiny_settings, fg_margin=2)
    other = build_fast_cache(cohort, tmp_path / "cache", changed)
    assert other.attrs["cache_dir"] != index.attrs["cache_dir"]  # a changed setting never reuses the folder

    replaced = cohort["path"].iloc[0]
    write_nifti(Path(replaced), blob_volume(seed=99))  # same path, new content
    rebuilt = build_fast_cache(cohort, tmp_path / "cache", tiny_settings)
    assert volumes.stat().st_mtime_ns != built
    fresh = loading_transforms(tiny_settings)({"image": replaced})["image"]
    sample = FastCacheDataset(rebuilt.attrs["cache_dir"])[0]["image"]
    assert float((sample - fresh.clamp(0, 1)).abs().max()) <= 0.5 / 255 + 1e-6


def test_dataset_rows_augmentation_and_pickling(small_cohort, tmp_path, tiny_settings):
    cohort = small_cohort
    index = build_fast_cache(cohort, tmp_path / "cache", tiny_settings)
    train_rows = index.index[index["split"] == "train"]
    dataset = FastCacheDataset(index.attrs["cache_dir"], rows=train_rows, augment=pretrain_augmentations(tiny_settings))
    assert len(dataset) == len(train_rows)
    assert {s["split"] for s in (dataset[i] for i in range(len(dataset)))} == {"train"}
    first, again, other = dataset[(0, 1, 0)], dataset[(0, 1, 0)], dataset[(1, 1, 0)]
    assert first["image"].shape == (1, *tiny_settings.spatial_size)
    torch.testing.assert_close(first["image"], again["image"], rtol=0, atol=0)
    assert not torch.equal(first["image"], other["image"])
    clone = pickle.loads(pickle.dumps(dataset))
    torch.testing.assert_close(clone[(0, 1, 0)]["image"], first["image"], rtol=0, atol=0)


def test_errors_are_explicit(tmp_path, tiny_settings):
    with pytest.raises(ValueError, match="dtype"):
        cache_folder(tmp_path, tiny_settings, "int16")
    with pytest.raises(ValueError, match="per-scan manifest"):
        build_fast_cache(pd.DataFrame({"t1w_path": ["x"]}), tmp_path, tiny_settings)
    with pytest.raises(FileNotFoundError, match="build-cache"):
        FastCacheDataset(tmp_path)
    bad = tmp_path / "bad.nii.gz"
    bad.write_bytes(b"not a nifti")
    frame = pd.DataFrame({"subject_id": ["a"], "session_id": ["1"], "modality": ["T1w"], "path": [str(bad)]})
    with pytest.raises(ValueError, match="no scan of the manifest could be loaded"):
        build_fast_cache(frame, tmp_path / "c", tiny_settings)


def test_build_cache_cli(tmp_path, capsys):
    from neurojepa_pl.cli import main

    manifest_path = make_cohort(tmp_path / "cohort", n_subjects=3)
    argv = ["build-cache", str(manifest_path), "--out", str(tmp_path / "cache"), "--pad-crop-size", "none",
            "--target-spacing", "none", "--resize-to", "34", "40", "34",
            "--spatial-size", "32", "36", "32"]  # fmt: skip
    assert main(argv) == 0
    assert "3 scans cached, 0 quarantined" in capsys.readouterr().out
    (folder,) = (tmp_path / "cache").iterdir()
    assert (folder / "meta.json").is_file() and folder.name.endswith("-uint8")
