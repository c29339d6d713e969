"""LitData shard cache: stored volumes against the float32 chain, quarantine, keys, a killed build resumed, data module
reading, ranks."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from volume_factory import TINY_CROP, TINY_RESIZE, blob_volume, make_cohort, truncate_file, write_nifti

from neurojepa_pl.data import load_manifest
from neurojepa_pl.data.transforms import TransformSettings, loading_transforms
from neurojepa_pl.data_modules import shards
from neurojepa_pl.data_modules.base import EpochSampler
from neurojepa_pl.data_modules.pretrain import PretrainDataModule
from neurojepa_pl.data_modules.shards import (
    ShardReader,
    build_shards,
    decode_volume,
    encode_volume,
    error_bound,
    read_samples,
    shard_folder,
)
from neurojepa_pl.errors import UserFileNotFoundError, UserValueError

# Ceilings of the errors the module docstring states for each dtype (chain output within [-0.3, 1.25]).
STATED_ERROR = {"uint16": 1.3e-5, "uint8": 3.1e-3, "float16": 5e-4}


@pytest.fixture(scope="module")
def synth_manifest(tmp_path_factory) -> pd.DataFrame:
    """Two SynthBrain subjects (T1w + FLAIR, one session) on the 48x54x48 grid (~3.2 mm voxels)."""
    from neurojepa_pl.synth import generate_cohort

    out = tmp_path_factory.mktemp("synth")
    generate_cohort(out, n_subjects=2, seed=3, modalities=("T1w", "FLAIR"), grid=(48, 54, 48), sessions=(1, 1))
    return load_manifest(out / "manifest.csv")


@pytest.fixture(scope="module")
def resampling_settings() -> TransformSettings:
    # 3.2 -> 3.5 mm: the order-5 spline runs (and overshoots [0, 1] a little), at a test-sized cost.
    return TransformSettings(pad_crop_size=None, target_spacing=(3.5, 3.5, 3.5), resize_to=TINY_RESIZE,
                             spatial_size=TINY_CROP)  # fmt: skip


@pytest.fixture
def blob_manifest(tmp_path) -> pd.DataFrame:
    return load_manifest(make_cohort(tmp_path / "cohort", n_subjects=5))


# ----------------------------------------------------------------------------------------------------------------------
# Stored values
# ----------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", ["uint16", "uint8", "float16"])
def test_encode_decode_error_is_within_the_bound(dtype):
    rng = np.random.default_rng(0)
    volume = rng.uniform(-0.29, 1.23, size=(9, 10, 11)).astype(np.float32)  # the spline's ringing included
    stored, scale, offset = encode_volume(volume, dtype)
    decoded = decode_volume(stored, scale, offset).numpy()
    error = np.abs(decoded - volume).max()
    assert stored.dtype == np.dtype(dtype) and decoded.dtype == np.float32
    assert error <= error_bound(dtype, scale, float(np.abs(volume).max())) <= STATED_ERROR[dtype]
    # the extremes are kept, not clipped to [0, 1]
    assert decoded.min() == pytest.approx(volume.min(), abs=error_bound(dtype, scale, 1.23))
    assert decoded.max() == pytest.approx(volume.max(), abs=error_bound(dtype, scale, 1.23))


def test_constant_volume_encodes_exactly():
    stored, scale, offset = encode_volume(np.full((3, 4, 5), 0.25, dtype=np.float32), "uint16")
    assert scale == 1.0 and np.all(decode_volume(stored, scale, offset).numpy() == 0.25)


@pytest.mark.parametrize("dtype", ["uint16", "uint8", "float16"])
def test_shards_equal_the_float32_chain_within_the_stated_error(dtype, synth_manifest, resampling_settings, tmp_path):
    samples = build_shards(synth_manifest, tmp_path, resampling_settings, dtype=dtype, workers=2)
    reader = ShardReader(samples.attrs["cache_dir"])
    chain = loading_transforms(resampling_settings)  # MONAI's Spacingd (SciPy) on the CPU: the reference
    errors = []
    for row, path in enumerate(synth_manifest["path"]):
        reference = chain({"image": path})["image"]
        stored = reader.volume(row)
        assert stored.shape == reference.shape == (1, *TINY_RESIZE) and stored.dtype == torch.float32
        error = float((stored - reference).abs().max())
        scale = float(reader.sample(row)["scale"])
        assert error <= error_bound(dtype, scale, float(reference.abs().max())), (row, error)
        errors.append(error)
    assert 0 < max(errors) <= STATED_ERROR[dtype]
    meta = samples.attrs["meta"]
    voxels = int(np.prod(TINY_RESIZE))
    assert meta["dtype"] == dtype and meta["quarantined"] == 0 and len(samples) == len(synth_manifest)
    # the stored bytes are the voxels plus a small header per sample (scale, offset, row, reason, record)
    assert voxels * np.dtype(dtype).itemsize < meta["bytes_per_scan"] < voxels * np.dtype(dtype).itemsize + 2048
    assert list(samples["shard_row"]) == list(range(len(synth_manifest)))
    assert json.loads(reader.sample(1)["record"])["path"] == synth_manifest["path"].iloc[1]


# ----------------------------------------------------------------------------------------------------------------------
# Quarantine, keys, reuse
# ----------------------------------------------------------------------------------------------------------------------
def test_a_failing_scan_is_quarantined_and_keeps_its_row(blob_manifest, tmp_path, tiny_settings):
    broken = truncate_file(write_nifti(tmp_path / "broken" / "cut_T1w.nii.gz", blob_volume(seed=9)))
    manifest = pd.concat(
        [blob_manifest.iloc[:2], pd.DataFrame([{**blob_manifest.iloc[0].to_dict(), "path": str(broken)}]),
         blob_manifest.iloc[2:]], ignore_index=True,
    )  # fmt: skip
    samples = build_shards(manifest, tmp_path / "cache", tiny_settings, workers=2)

    assert list(samples["status"]) == ["ok", "ok", "failed", "ok", "ok", "ok"]
    assert samples["reason"].iloc[2].startswith(("EOFError", "OSError", "error", "ImageFileError", "zlib"))
    folder = Path(samples.attrs["cache_dir"])
    quarantine = pd.read_csv(folder / "quarantine.csv")
    assert list(quarantine["path"]) == [str(broken)] and list(quarantine["shard_row"]) == [2]
    reader = ShardReader(folder)
    with pytest.raises(RuntimeError, match="quarantined when the shards were built"):
        reader.volume(2)
    assert reader.volume(3).shape == (1, *TINY_RESIZE)  # rows after the failed one are still at their place


def test_every_scan_failing_is_an_error(tmp_path, tiny_settings):
    bad = tmp_path / "bad_T1w.nii.gz"
    bad.write_bytes(b"not a nifti")
    frame = pd.DataFrame({"subject_id": ["a"], "session_id": ["1"], "modality": ["T1w"], "path": [str(bad)]})
    with pytest.raises(UserValueError, match="no scan of the manifest could be loaded"):
        build_shards(frame, tmp_path / "cache", tiny_settings)


def test_a_complete_folder_is_reused_and_a_stale_key_gets_a_new_folder(blob_manifest, tmp_path, tiny_settings):
    first = build_shards(blob_manifest, tmp_path, tiny_settings)
    again = build_shards(blob_manifest, tmp_path, tiny_settings)
    assert first.attrs["built"] and not again.attrs["built"]
    assert again.attrs["cache_dir"] == first.attrs["cache_dir"]

    other_setting = TransformSettings(**{**tiny_settings.to_dict(), "fg_margin": 2})
    assert build_shards(blob_manifest, tmp_path, other_setting).attrs["cache_dir"] != first.attrs["cache_dir"]
    assert (
        build_shards(blob_manifest, tmp_path, tiny_settings, dtype="uint8").attrs["cache_dir"]
        != first.attrs["cache_dir"]
    )
    # a replaced scan (new content, size and mtime) is a new key: the old shards are never served for it
    write_nifti(Path(blob_manifest["path"].iloc[1]), blob_volume(seed=77))
    replaced = build_shards(blob_manifest, tmp_path, tiny_settings)
    assert replaced.attrs["built"] and replaced.attrs["cache_dir"] != first.attrs["cache_dir"]
    fresh = loading_transforms(tiny_settings)({"image": blob_manifest["path"].iloc[1]})["image"]
    assert float((ShardReader(replaced.attrs["cache_dir"]).volume(1) - fresh).abs().max()) < 1e-5
    # label columns are not part of the key: a label edit reuses the shards
    relabelled = blob_manifest.assign(tumour=1 - blob_manifest["tumour"])
    assert not build_shards(relabelled, tmp_path, tiny_settings).attrs["built"]


def test_shard_folder_is_the_key_of_settings_dtype_and_scans(blob_manifest, tmp_path, tiny_settings):
    paths = list(blob_manifest["path"])
    folder = shard_folder(tmp_path, tiny_settings, "uint16", paths)
    assert folder == shard_folder(tmp_path, tiny_settings, "uint16", paths)
    assert folder != shard_folder(tmp_path, tiny_settings, "uint16", paths[::-1])  # the order is the sample index
    with pytest.raises(UserValueError, match="shard dtype"):
        shard_folder(tmp_path, tiny_settings, "int32", paths)


# ----------------------------------------------------------------------------------------------------------------------
# A build killed half-way
# ----------------------------------------------------------------------------------------------------------------------
KILLER = """
import os, signal, sys
from neurojepa_pl.data import load_manifest
from neurojepa_pl.data.transforms import TransformSettings
from neurojepa_pl.data_modules import shards

original = shards.ChainWriter.__call__

def call(self, row):
    if row == {kill_at}:
        os.killpg(0, signal.SIGKILL)  # the builder and all its LitData workers, like a node going down
    return original(self, row)

shards.ChainWriter.__call__ = call
settings = TransformSettings(**{settings})
shards.build_shards(load_manifest(sys.argv[1]), sys.argv[2], settings, workers=2, chunk_bytes=100_000)
"""


def test_a_killed_build_is_refused_then_resumed(tmp_path, tiny_settings, monkeypatch, caplog):
    manifest_path = make_cohort(tmp_path / "cohort", n_subjects=10)
    manifest = load_manifest(manifest_path)
    settings = {k: (list(v) if isinstance(v, tuple) else v) for k, v in tiny_settings.to_dict().items()}
    script = textwrap.dedent(KILLER).format(kill_at=3, settings=settings)
    killed = subprocess.run([sys.executable, "-c", script, str(manifest_path), str(tmp_path / "cache")],
                            start_new_session=True, capture_output=True, timeout=300)  # fmt: skip
    assert killed.returncode == -9, killed.stderr.decode()[-2000:]
    folder = shard_folder(tmp_path / "cache", tiny_settings, "uint16", list(manifest["path"]))
    assert (folder / "build.json").is_file() and not (folder / "shards.json").exists()
    assert list(folder.glob("chunk-*.bin")), "the kill came after some chunks were written"
    with pytest.raises(UserFileNotFoundError, match="(?s)not a complete shard cache.*build-cache"):
        ShardReader(folder)

    computed = tmp_path / "computed.txt"
    original = shards.ChainWriter.__call__

    def counting(self, row):
        with open(computed, "a") as handle:  # one short append per row: atomic across the forked workers
            handle.write(f"{row}\n")
        return original(self, row)

    monkeypatch.setattr(shards.ChainWriter, "__call__", counting)
    caplog.set_level("WARNING", logger="neurojepa_pl.data_modules.shards")
    resumed = build_shards(manifest, tmp_path / "cache", tiny_settings, workers=1)  # the build's own 2 are used

    assert any("resuming an interrupted build with its 2 workers" in r.getMessage() for r in caplog.records)
    redone = sorted(int(line) for line in computed.read_text().split())
    assert 0 < len(redone) < len(manifest) and 0 not in redone  # rows 0.. of worker 0 were kept from the killed run
    assert resumed.attrs["meta"]["samples"] == len(manifest) and resumed.attrs["meta"]["workers"] == 2
    monkeypatch.setattr(shards.ChainWriter, "__call__", original)
    fresh = build_shards(manifest, tmp_path / "fresh", tiny_settings, workers=2)
    a, b = ShardReader(resumed.attrs["cache_dir"]), ShardReader(fresh.attrs["cache_dir"])
    for row in range(len(manifest)):
        assert torch.equal(a.volume(row), b.volume(row)), row
    listed = {c["filename"] for c in json.loads((folder / "index.json").read_text())["chunks"]}
    assert {p.name for p in folder.glob("chunk-*.bin")} == listed  # no stray chunk of the killed run is left


def test_read_samples_refuses_another_format_version(blob_manifest, tmp_path, tiny_settings):
    folder = Path(build_shards(blob_manifest, tmp_path, tiny_settings).attrs["cache_dir"])
    meta = json.loads((folder / "shards.json").read_text())
    (folder / "shards.json").write_text(json.dumps({**meta, "version": 0}))
    with pytest.raises(UserValueError, match="(?s)format version 0.*--rebuild"):
        read_samples(folder)


# ----------------------------------------------------------------------------------------------------------------------
# Data module
# ----------------------------------------------------------------------------------------------------------------------
def _dm(manifest: str, cache_dir: Path | None, cache: str, **kwargs) -> PretrainDataModule:
    args = dict(manifest=manifest, cache_dir=cache_dir and str(cache_dir), cache=cache, batch_size=2, num_workers=0,
                spatial_size=TINY_CROP, resize_to=TINY_RESIZE, pad_crop_size=None, target_spacing=None, seed=4,
                patch_size=4, quarantine_path=cache_dir and str(cache_dir / "quarantine.csv"))  # fmt: skip
    args.update(kwargs)
    return PretrainDataModule(**args)


def test_datamodule_reads_shards_like_the_persistent_cache(tmp_path):
    manifest = str(make_cohort(tmp_path / "cohort", n_subjects=5))
    shard_dm, persistent_dm = _dm(manifest, tmp_path / "s", "shards"), _dm(manifest, tmp_path / "p", "persistent")
    shard_dm.setup("fit")
    persistent_dm.setup("fit")
    for split in ("train", "val"):
        a, b = shard_dm.datasets[split], persistent_dm.datasets[split]
        assert type(a).__name__ == "ShardScanDataset" and len(a) == len(b)
        for key in [(0, 0, 0), (1, 5, len(a) - 1), (2, 1, 0)]:
            x, y = a[key], b[key]
            assert x["path"] == y["path"] and x["subject_id"] == y["subject_id"]
            # the same per-sample transform (the crop; augmentation follows the transfer, keyed by the sample) on
            # volumes that differ by the uint16 step only
            assert float((x["image"] - y["image"]).abs().max()) < 1e-4
    batch = shard_dm.on_after_batch_transfer(next(iter(shard_dm.train_dataloader())), 0)  # augmentation + masks
    assert batch["image"].shape == (2, 1, *TINY_CROP) and len(batch["context_idx"]) == 3
    (folder,) = (tmp_path / "s").glob("shards-*")
    assert len(read_samples(folder)) == 5  # the whole manifest, whatever the split


def test_datamodule_quarantines_what_the_shards_could_not_store(tmp_path):
    manifest_path = make_cohort(tmp_path / "cohort", n_subjects=10)
    frame = pd.read_csv(manifest_path, dtype=str)
    truncate_file(tmp_path / "cohort" / frame["path"].iloc[1])
    dm = _dm(str(manifest_path), tmp_path / "cache", "shards", max_failed_fraction=0.2)
    dm.setup("fit")
    assert len(dm.datasets["train"]) == 5 and [f.path for f in dm.failure_log] == [
        str((tmp_path / "cohort" / frame["path"].iloc[1]).resolve())
    ]
    assert pd.read_csv(tmp_path / "cache" / "quarantine.csv")["path"].tolist() == [dm.failure_log.failures[0].path]


def test_shards_need_a_cache_dir_and_a_known_dtype(tmp_path):
    manifest = str(make_cohort(tmp_path / "cohort", n_subjects=3))
    dm = _dm(manifest, None, "shards")
    with pytest.raises(UserValueError, match="cache_dir is not set"):
        dm.setup("fit")
    with pytest.raises(UserValueError, match="shard_dtype must be one of"):
        _dm(manifest, tmp_path, "shards", shard_dtype="int8")
    with pytest.raises(UserValueError, match="cache must be one of"):
        _dm(manifest, tmp_path, "memmap")


def test_two_ranks_see_disjoint_scans_whose_union_is_the_split(tmp_path):
    manifest = str(make_cohort(tmp_path / "cohort", n_subjects=10, sessions=2))
    dm = _dm(manifest, tmp_path / "cache", "shards")
    dm.setup("fit")
    dataset = dm.datasets["train"]
    everything = sorted(r["path"] for r in dataset.records)
    for epoch in range(2):
        seen = []
        for rank in range(2):
            sampler = EpochSampler(len(dataset), seed=4, shuffle=True, num_replicas=2, rank=rank)
            sampler.set_epoch(epoch)
            seen.append([dataset[key]["path"] for key in sampler])
        assert not set(seen[0]) & set(seen[1])
        assert sorted(seen[0] + seen[1]) == everything  # 12 scans: every one once per epoch, none padded
    assert len(everything) == 12


def test_dataset_workers_reopen_the_shards(tmp_path):
    manifest = str(make_cohort(tmp_path / "cohort", n_subjects=5))
    dm = _dm(manifest, tmp_path / "cache", "shards", num_workers=2)
    dm.setup("fit")
    images = torch.cat([b["image"] for b in dm.train_dataloader()])
    in_process = _dm(manifest, tmp_path / "cache", "shards")
    in_process.setup("fit")
    assert torch.equal(images, torch.cat([b["image"] for b in in_process.train_dataloader()]))
