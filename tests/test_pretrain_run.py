"""A pretraining run's checkpoints: discovery by step, the recorded setup, random inits and strict loading."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent / "tools"))
from learning_curve_tiny import GRID, IMG, PATCH, write_checkpoints  # noqa: E402

from neurojepa_pl.pretrain_run import (  # noqa: E402
    PretrainingSetup,
    checkpoint_step,
    find_checkpoints,
    load_run_encoder,
    random_init_encoder,
    read_pretraining_setup,
)


def test_find_checkpoints_one_per_step_in_order(tmp_path):
    run = tmp_path / "version_0"
    paths = write_checkpoints(run / "checkpoints", steps=(0, 2, 10))
    found = find_checkpoints([run])
    assert [(c.step, c.path.name) for c in found] == [(0, "step=0.ckpt"), (2, "step=2.ckpt"), (10, "step=10.ckpt")]
    assert find_checkpoints([run / "checkpoints"]) == found  # last.ckpt repeats step 10 and is dropped
    assert [c.step for c in find_checkpoints([paths[2], paths[0]])] == [0, 10]
    assert checkpoint_step(run / "checkpoints" / "last.ckpt") == 10
    with pytest.raises(ValueError, match="both hold step 10"):
        find_checkpoints([paths[2], run / "checkpoints" / "last.ckpt"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="save_top_k"):
        find_checkpoints([tmp_path / "empty"])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        find_checkpoints([tmp_path / "nowhere.ckpt"])
    torch.save({"state_dict": {}}, tmp_path / "no_step.ckpt")
    with pytest.raises(ValueError, match="global_step"):
        checkpoint_step(tmp_path / "no_step.ckpt")


def test_setup_is_read_from_the_hyper_parameters(tmp_path):
    path = write_checkpoints(tmp_path, steps=(0,))[0]
    setup = read_pretraining_setup(path)
    assert setup.preset == "vit_tiny" and setup.data_settings == GRID
    assert (
        setup.encoder_kwargs()["img_size"] in ([24, 24, 24], (24, 24, 24)) and setup.encoder_kwargs()["patch_size"] == 8
    )
    assert setup.transform_settings().spatial_size == tuple(IMG)
    name, kwargs = setup.backbone_args()
    assert name == "vit_tiny" and kwargs["patch_size"] == PATCH
    # A registry name with overrides (how checkpoints recorded the encoder before full specs) gives the same net.
    named = PretrainingSetup("vit_tiny", {"img_size": IMG, "patch_size": PATCH}, GRID)
    assert named.backbone_args() == ("vit_tiny", {"img_size": IMG, "patch_size": PATCH})
    assert random_init_encoder(named, 5).config == random_init_encoder(setup, 5).config
    bare = tmp_path / "bare.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {"encoder": "vit_tiny"}}, bare)
    with pytest.raises(ValueError, match="spatial_size"):
        read_pretraining_setup(bare)


def test_random_inits_are_a_pure_function_of_the_seed(tmp_path):
    setup = read_pretraining_setup(write_checkpoints(tmp_path, steps=(0,))[0])
    rng = torch.random.get_rng_state()
    a, b, c = random_init_encoder(setup, 1), random_init_encoder(setup, 1), random_init_encoder(setup, 2)
    assert torch.equal(torch.random.get_rng_state(), rng)  # the global RNG is untouched
    assert a.grid_size == (3, 3, 3)
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())
    assert not torch.equal(a.patch_embed.proj.weight, c.patch_embed.proj.weight)


def test_load_run_encoder_reads_the_chosen_encoder_strictly(tmp_path):
    paths = write_checkpoints(tmp_path, steps=(0, 2))
    setup = read_pretraining_setup(paths[1])
    saved = torch.load(paths[1], weights_only=True)["state_dict"]
    target = load_run_encoder(paths[1], setup, "target")
    context = load_run_encoder(paths[1], setup, "context")
    for name, value in target.state_dict().items():
        assert torch.equal(value, saved[f"target_encoder.{name}"])
    assert not torch.equal(target.patch_embed.proj.weight, context.patch_embed.proj.weight)  # step 2 moved the target
    other = PretrainingSetup("vit_tiny", {"img_size": IMG, "patch_size": PATCH, "depth": 3}, GRID)
    with pytest.raises(ValueError, match="missing key"):
        load_run_encoder(paths[1], other, "target")
    with pytest.raises(ValueError, match="which must be"):
        load_run_encoder(paths[1], setup, "online")
