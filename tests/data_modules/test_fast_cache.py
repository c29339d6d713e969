"""Fast memmap cache: same volumes as the NIfTI chain, quarantine, invalidation, dataset samples, CLI; damaged caches
reported and repaired, killed builds leaving nothing that looks finished, concurrent builds taking turns."""

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
    argv = ["build-cache", str(manifest_path), "--out", str(tmp_path / "cache"), "--format", "memmap",
            "--pad-crop-size", "none", "--target-spacing", "none", "--resize-to", "34", "40", "34",
            "--spatial-size", "32", "36", "32"]  # fmt: skip
    assert main(argv) == 0
    assert "3 scans cached, 0 quarantined" in capsys.readouterr().out
    (folder,) = [p for p in (tmp_path / "cache").iterdir() if not p.name.startswith(".")]  # not the lock file
    assert (folder / "meta.json").is_file() and folder.name.endswith("-uint8")


# ----------------------------------------------------------------------------------------------------------------------
# Damaged caches, killed builds, concurrent builds
# ----------------------------------------------------------------------------------------------------------------------
def _volumes(index) -> np.ndarray:
    return np.load(Path(index.attrs["cache_dir"]) / "volumes.npy")


def test_truncated_cache_is_reported_and_its_rows_rebuilt(small_cohort, tmp_path, tiny_settings, caplog):
    fresh = _volumes(build_fast_cache(small_cohort, tmp_path / "fresh", tiny_settings))
    index = build_fast_cache(small_cohort, tmp_path / "cache", tiny_settings)
    folder = Path(index.attrs["cache_dir"])
    meta = json.loads((folder / "meta.json").read_text())
    volumes = folder / "volumes.npy"
    truncated = meta["header_bytes"] + 5 * meta["row_bytes"] // 2  # a partial copy: 2.5 of 5 rows left
    with open(volumes, "r+b") as handle:
        handle.truncate(truncated)

    with pytest.raises(RuntimeError, match=r"volumes\.npy has \d+ bytes, meta\.json describes \d+.*build-cache"):
        FastCacheDataset(folder)[0]
    caplog.set_level("WARNING", logger="neurojepa_pl.data_modules.fast_cache")
    repaired = build_fast_cache(small_cohort, tmp_path / "cache", tiny_settings)

    assert repaired.attrs["built"] is False and repaired.attrs["repaired"] == [2, 3, 4]
    (warning,) = [r.getMessage() for r in caplog.records if "is damaged" in r.getMessage()]
    expected = meta["header_bytes"] + 5 * meta["row_bytes"]
    assert f"fast cache {folder} is damaged (volumes.npy has {truncated} bytes, expected {expected})" in warning
    assert "3 damaged rows" in warning and f"row 2 ({small_cohort['path'].iloc[2]}): beyond the end" in warning
    np.testing.assert_array_equal(_volumes(repaired), fresh)  # byte for byte what a fresh build writes
    assert not json.loads((folder / "meta.json").read_text()).get("repairing")
    assert float(FastCacheDataset(folder)[4]["image"].max()) > 0.5


def test_overwritten_row_is_found_by_verify_and_rebuilt(small_cohort, tmp_path, tiny_settings, caplog):
    fresh = _volumes(build_fast_cache(small_cohort, tmp_path / "fresh", tiny_settings))
    index = build_fast_cache(small_cohort, tmp_path / "cache", tiny_settings)
    folder = Path(index.attrs["cache_dir"])
    meta = json.loads((folder / "meta.json").read_text())
    with open(folder / "volumes.npy", "r+b") as handle:  # garbage over row 1, size unchanged
        handle.seek(meta["header_bytes"] + meta["row_bytes"] + 100)
        handle.write(np.random.default_rng(0).integers(0, 255, 5000, dtype=np.uint8).tobytes())

    # the cheap check (size, header) cannot see it; verify reads every row's CRC-32
    assert build_fast_cache(small_cohort, tmp_path / "cache", tiny_settings).attrs["repaired"] == []
    caplog.set_level("WARNING", logger="neurojepa_pl.data_modules.fast_cache")
    repaired = build_fast_cache(small_cohort, tmp_path / "cache", tiny_settings, verify=True)
    assert repaired.attrs["repaired"] == [1]
    assert any(f"row 1 ({small_cohort['path'].iloc[1]}): CRC-32 mismatch" in r.getMessage() for r in caplog.records)
    np.testing.assert_array_equal(_volumes(repaired), fresh)
    assert build_fast_cache(small_cohort, tmp_path / "cache", tiny_settings, verify=True).attrs["repaired"] == []


def test_interrupted_repair_is_refused_then_resumed(small_cohort, tmp_path, tiny_settings):
    fresh = _volumes(build_fast_cache(small_cohort, tmp_path / "fresh", tiny_settings))
    folder = Path(build_fast_cache(small_cohort, tmp_path / "cache", tiny_settings).attrs["cache_dir"])
    meta = json.loads((folder / "meta.json").read_text())
    # what a kill leaves mid-repair: the file already at full size (zeros in row 3), meta.json marked
    with open(folder / "volumes.npy", "r+b") as handle:
        handle.seek(meta["header_bytes"] + 3 * meta["row_bytes"])
        handle.write(bytes(meta["row_bytes"]))
    (folder / "meta.json").write_text(json.dumps({**meta, "repairing": True}))

    with pytest.raises(RuntimeError, match="is being repaired"):
        FastCacheDataset(folder)
    resumed = build_fast_cache(small_cohort, tmp_path / "cache", tiny_settings)  # full check because of the mark
    assert resumed.attrs["repaired"] == [3]
    np.testing.assert_array_equal(_volumes(resumed), fresh)
    FastCacheDataset(folder)  # accepted again


KILLED_BUILD = """
import os, sys, time
from pathlib import Path
sys.path.insert(0, {tests!r})
from neurojepa_pl.data import load_manifest
from neurojepa_pl.data.transforms import TransformSettings
from neurojepa_pl.data_modules import fast_cache

real, done = fast_cache._load_one, []
def slow_after_two(task):
    if len(done) == 2:  # two scans written: tell the parent, then wait for SIGKILL
        Path({marker!r}).write_text("2")
        time.sleep(600)
    done.append(task[0])
    return real(task)
fast_cache._load_one = slow_after_two
settings = TransformSettings(pad_crop_size=None, target_spacing=None, resize_to={resize}, spatial_size={crop})
fast_cache.build_fast_cache(load_manifest({manifest!r}), {out!r}, settings)
"""


@pytest.mark.slow
def test_killed_build_leaves_no_folder_that_looks_finished(tmp_path, tiny_settings):
    import os
    import signal
    import subprocess
    import sys
    import time

    from volume_factory import TINY_CROP, TINY_RESIZE

    manifest_path = make_cohort(tmp_path / "cohort", n_subjects=5)
    marker = tmp_path / "marker"
    code = KILLED_BUILD.format(
        tests=str(Path(__file__).parent), marker=str(marker), resize=TINY_RESIZE, crop=TINY_CROP,
        manifest=str(manifest_path), out=str(tmp_path / "cache"),
    )  # fmt: skip
    child = subprocess.Popen([sys.executable, "-c", code], env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.monotonic() + 240
    while not marker.exists() and child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert marker.exists(), "the build never reached its third scan"
    os.kill(child.pid, signal.SIGKILL)
    child.wait()

    folder = cache_folder(tmp_path / "cache", tiny_settings, "uint8")
    assert not folder.exists()  # nothing at the final path that a reader could take for a cache
    (leftover,) = (tmp_path / "cache").glob(f".{folder.name}.build-*")
    assert (leftover / "volumes.npy").stat().st_size > 0 and not (leftover / "meta.json").exists()
    with pytest.raises(FileNotFoundError, match="not a complete fast cache"):
        FastCacheDataset(folder)

    cohort = load_manifest(manifest_path)
    index = build_fast_cache(cohort, tmp_path / "cache", tiny_settings)
    assert index.attrs["built"] and not list((tmp_path / "cache").glob(f".{folder.name}.build-*"))
    np.testing.assert_array_equal(_volumes(index), _volumes(build_fast_cache(cohort, tmp_path / "b", tiny_settings)))


def _build_at_the_same_time(barrier, manifest_path: str, out: str, settings) -> tuple[bool, list[int]]:
    import torch as _torch

    _torch.set_num_threads(1)
    manifest = load_manifest(manifest_path)
    barrier.wait()
    index = build_fast_cache(manifest, out, settings)
    return bool(index.attrs["built"]), index["manifest_row"].tolist()


@pytest.mark.slow
def test_two_processes_building_one_folder_agree_and_build_once(tmp_path, tiny_settings):
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    manifest_path = str(make_cohort(tmp_path / "cohort", n_subjects=5))
    context = mp.get_context("spawn")
    with context.Manager() as manager, ProcessPoolExecutor(2, mp_context=context) as pool:
        barrier = manager.Barrier(2)
        futures = [
            pool.submit(_build_at_the_same_time, barrier, manifest_path, str(tmp_path / "cache"), tiny_settings)
            for _ in range(2)
        ]
        results = [f.result(timeout=300) for f in futures]

    assert sorted(built for built, _ in results) == [False, True]  # one built it, the other waited and reused it
    assert results[0][1] == results[1][1] == [0, 1, 2, 3, 4]
    folder = cache_folder(tmp_path / "cache", tiny_settings, "uint8")
    fresh = build_fast_cache(load_manifest(manifest_path), tmp_path / "fresh", tiny_settings)
    np.testing.assert_array_equal(np.load(folder / "volumes.npy"), _volumes(fresh))
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [f".{folder.name}.lock", folder.name]
