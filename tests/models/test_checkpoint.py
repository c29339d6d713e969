"""Weight I/O: reference key layout (TSV), strict loading, source formats, export round trip, and equality with a
literal re-implementation of the reference forward (written here from docs/method.md §2.1-2.2, 3.2 and 4, independent of
the package's modules)."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from neurojepa_pl.models import build_encoder, build_predictor, export_backbone, load_backbone, load_predictor
from neurojepa_pl.models.checkpoint import native_to_reference, reference_to_native, strip_wrapper_prefixes

# Key, shape and dtype of every tensor of the reference ViT-B-MoE encoder and predictor (bare keys; reference
# checkpoints prefix them with ``module.backbone.``), read off the reference checkpoint.
REFERENCE_DIR = Path(__file__).resolve().parent / "reference"
PREFIX = "module.backbone."


def _read_tsv(name: str) -> dict[str, tuple[tuple[int, ...], str]]:
    rows = {}
    for line in (REFERENCE_DIR / name).read_text().splitlines()[1:]:
        key, shape, dtype = line.split("\t")
        rows[key] = (tuple(json.loads(shape)), dtype)
    return rows


# ============================================================================ literal reference forward (oracle)
def _ref_rotate(x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """V-JEPA 2 style rotation of one axis slice: x [B, H, N, D], pos [B, N]."""
    dim = x.shape[-1]
    omega = torch.arange(dim // 2, dtype=x.dtype) / (dim / 2.0)
    omega = 1.0 / 10000**omega
    freq = torch.einsum("bn,f->bnf", pos, omega)
    emb_sin = freq.sin().repeat(1, 1, 2).unsqueeze(1)
    emb_cos = freq.cos().repeat(1, 1, 2).unsqueeze(1)
    y1, y2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    rotated = torch.stack((-y2, y1), dim=-1).flatten(-2)
    return x * emb_cos + rotated * emb_sin


def _ref_positions(ids: torch.Tensor, h_patches: int, w_patches: int):
    tokens_per_frame = h_patches * w_patches
    frame = ids // tokens_per_frame
    height = (ids - tokens_per_frame * frame) // w_patches
    width = ids - tokens_per_frame * frame - w_patches * height
    return frame.float(), height.float(), width.float()


def _ref_linear(sd, name, x):
    bias = sd.get(f"{name}.bias")
    out = x @ sd[f"{name}.weight"].T
    return out if bias is None else out + bias


def _ref_layernorm(sd, name, x):
    mean = x.mean(-1, keepdim=True)
    var = x.var(-1, unbiased=False, keepdim=True)
    return (x - mean) / torch.sqrt(var + 1e-6) * sd[f"{name}.weight"] + sd[f"{name}.bias"]


def _ref_gelu(x):
    return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))


def _ref_attention(sd, name, x, ids, num_heads, h_patches, w_patches):
    batch, n, dim = x.shape
    head_dim = dim // num_heads
    qkv = _ref_linear(sd, f"{name}.qkv", x).unflatten(-1, (3, num_heads, -1)).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    d_pos, h_pos, w_pos = _ref_positions(ids, h_patches, w_patches)
    axis = int(2 * ((head_dim // 3) // 2))
    parts_q, parts_k, start = [], [], 0
    for pos in (d_pos, h_pos, w_pos):
        parts_q.append(_ref_rotate(q[..., start : start + axis], pos))
        parts_k.append(_ref_rotate(k[..., start : start + axis], pos))
        start += axis
    q = torch.cat(parts_q + [q[..., start:]], dim=-1)
    k = torch.cat(parts_k + [k[..., start:]], dim=-1)
    attn = (q @ k.transpose(-2, -1) * head_dim**-0.5).softmax(dim=-1)
    out = attn @ v  # [B, H, N, hd]
    gate = torch.sigmoid(_ref_linear(sd, f"{name}.proj_attn_gate", x))  # [B, N, H]
    out = out * gate.transpose(1, 2).unsqueeze(-1)
    return _ref_linear(sd, f"{name}.proj", out.transpose(1, 2).reshape(batch, n, dim))


def _ref_moe(sd, name, x, num_experts, top_k, route_scale=4.0):
    shape = x.shape
    x = x.reshape(-1, shape[-1])
    scores = (x @ sd[f"{name}.gate.gate.weight"].T).softmax(dim=-1, dtype=torch.float32)
    indices = torch.topk(scores + sd[f"{name}.gate.bias"], top_k, dim=-1)[1]
    weights = scores.gather(1, indices) * route_scale
    y = torch.zeros_like(x)
    for e in range(num_experts):
        idx, slot = torch.where(indices == e)
        if idx.numel():
            hidden = _ref_gelu(_ref_linear(sd, f"{name}.experts.{e}.fc1", x[idx]))
            y[idx] += _ref_linear(sd, f"{name}.experts.{e}.fc2", hidden) * weights[idx, slot, None]
    shared = _ref_linear(sd, f"{name}.shared_experts.fc2", _ref_gelu(_ref_linear(sd, f"{name}.shared_experts.fc1", x)))
    return (y + shared).view(shape)


def _ref_block(sd, name, x, ids, num_heads, h_patches, w_patches, moe):
    x = x + _ref_attention(
        sd, f"{name}.attn", _ref_layernorm(sd, f"{name}.norm1", x), ids, num_heads, h_patches, w_patches
    )
    normed = _ref_layernorm(sd, f"{name}.norm2", x)
    if f"{name}.mlp.gate.gate.weight" in sd:
        return x + _ref_moe(sd, f"{name}.mlp", normed, *moe)
    return x + _ref_linear(sd, f"{name}.mlp.fc2", _ref_gelu(_ref_linear(sd, f"{name}.mlp.fc1", normed)))


def reference_encoder_forward(sd, x, masks, *, patch, img, depth, num_heads, moe):
    """Reference encoder: patch embed on the full volume, gather masks, concat along batch, blocks, norm."""
    w = sd["patch_embed.proj.weight"]
    tokens = torch.nn.functional.conv3d(x, w, sd["patch_embed.proj.bias"], stride=patch).flatten(2).transpose(1, 2)
    ids = torch.cat(masks, dim=0)
    tokens = torch.cat([torch.stack([tokens[b, m[b]] for b in range(len(m))]) for m in masks], dim=0)
    h_patches, w_patches = img[0] // patch, img[1] // patch  # what the reference passes as H and W
    for i in range(depth):
        tokens = _ref_block(sd, f"blocks.{i}", tokens, ids, num_heads, h_patches, w_patches, moe)
    return _ref_layernorm(sd, "norm", tokens)


def reference_predictor_forward(sd, context, context_idx, target_idx, *, grid, depth, num_heads):
    """Reference predictor: embed, mask token 0 at targets, sort by id, blocks (cubic grid), norm, un-sort, proj."""
    x = _ref_linear(sd, "predictor_embed", context)
    batch, num_target = target_idx.shape
    x = torch.cat([x, sd["mask_tokens.0"].repeat(batch, num_target, 1)], dim=1)
    ids = torch.cat([context_idx, target_idx], dim=1)
    order = torch.argsort(ids, dim=1)
    x = torch.stack([x[b, order[b]] for b in range(batch)])
    ids = torch.stack([ids[b, order[b]] for b in range(batch)])
    for i in range(depth):
        x = _ref_block(sd, f"predictor_blocks.{i}", x, ids, num_heads, grid, grid, None)
    x = _ref_layernorm(sd, "predictor_norm", x)
    restore = torch.argsort(order, dim=1)
    x = torch.stack([x[b, restore[b]] for b in range(batch)])[:, context_idx.shape[1] :]
    return _ref_linear(sd, "predictor_proj", x)


# ============================================================================ helpers
def _random_reference_state(model: torch.nn.Module, seed: int, std: float = 0.2) -> dict[str, torch.Tensor]:
    """Random tensors under the reference key names of `model` (weights spread enough that routing/positions matter)."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for key, value in native_to_reference(model.state_dict()).items():
        if value.dtype == torch.int64:
            out[key] = torch.randint(0, 100, value.shape, generator=gen)
        elif key.endswith("gate.bias") and "attn" not in key:
            out[key] = 0.05 * torch.randn(value.shape, generator=gen)
        elif key.startswith("norm") or ".norm" in key or key.startswith("predictor_norm"):
            out[key] = 1.0 + 0.1 * torch.randn(value.shape, generator=gen)
        else:
            out[key] = std * torch.randn(value.shape, generator=gen)
    return out


def _prefixed(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {PREFIX + k: v for k, v in sd.items()}


@pytest.fixture(scope="module")
def tiny_reference_checkpoint(tmp_path_factory) -> tuple[Path, dict, dict, dict]:
    """A reference-format file with distinct target / context encoders and a predictor, tiny MoE config."""
    encoder, predictor = build_encoder("vit_tiny_moe"), build_predictor("predictor_tiny")
    target, context = _random_reference_state(encoder, 1), _random_reference_state(encoder, 2)
    pred = _random_reference_state(predictor, 3)
    path = tmp_path_factory.mktemp("ref") / "latest.pt"
    torch.save(
        {"encoder": _prefixed(context), "target_encoder": _prefixed(target), "predictor": _prefixed(pred),
         "opt": {"state": {}, "param_groups": []}, "scaler": None, "epoch": 3, "global_step": 4800, "loss": 0.25},
        path,
    )  # fmt: skip
    return path, target, context, pred


# ============================================================================ reference layout
def test_native_to_reference_names_match_tsv():
    encoder_rows, predictor_rows = _read_tsv("encoder_state_dict.tsv"), _read_tsv("predictor_state_dict.tsv")
    with torch.device("meta"):
        encoder, predictor = build_encoder("vit_base_moe"), build_predictor("predictor_base")
    for model, rows in ((encoder, encoder_rows), (predictor, predictor_rows)):
        reference = native_to_reference(model.state_dict())
        assert {k: tuple(v.shape) for k, v in reference.items()} == {k: shape for k, (shape, _) in rows.items()}
        assert {k: str(v.dtype).removeprefix("torch.") for k, v in reference.items()} == {
            k: dtype for k, (_, dtype) in rows.items()
        }
    assert len(encoder_rows) == 574 and len(predictor_rows) == 177


def test_key_conversion_round_trip_and_prefix_stripping():
    encoder = build_encoder("vit_tiny_moe")
    native = encoder.state_dict()
    reference = native_to_reference(native)
    assert "blocks.1.mlp.experts.3.fc2.bias" in reference and "blocks.1.mlp.experts.fc2_bias" not in reference
    back = reference_to_native(reference)
    assert back.keys() == native.keys() and all(torch.equal(back[k], native[k]) for k in native)
    wrapped = {f"module._orig_mod.backbone.{k}".replace("blocks.0.", "blocks.0._checkpoint_wrapped_module."): v
               for k, v in reference.items()}  # fmt: skip
    assert strip_wrapper_prefixes(wrapped).keys() == reference.keys()
    incomplete = dict(reference)
    del incomplete["blocks.1.mlp.experts.2.fc1.weight"]
    with pytest.raises(ValueError, match=r"blocks\.1\.mlp\.experts\.2\.fc1\.weight"):
        reference_to_native(incomplete)


@pytest.mark.slow
def test_paper_size_reference_checkpoint_from_tsv_loads_strictly(tmp_path):
    rows = _read_tsv("encoder_state_dict.tsv")
    pred_rows = _read_tsv("predictor_state_dict.tsv")
    dtypes = {"float32": torch.float32, "int64": torch.int64}
    shared = {k: torch.zeros(shape, dtype=dtypes[dtype]) for k, (shape, dtype) in rows.items()}
    target = dict(shared, **{"norm.weight": torch.full((768,), 2.0)})
    context = dict(shared, **{"norm.weight": torch.full((768,), 3.0)})
    predictor = {k: torch.zeros(shape, dtype=dtypes[dtype]) for k, (shape, dtype) in pred_rows.items()}
    path = tmp_path / "e200.pt"
    torch.save(
        {"encoder": _prefixed(context), "target_encoder": _prefixed(target), "predictor": _prefixed(predictor)}, path
    )
    loaded_target = load_backbone(path, which="target")
    assert sum(p.numel() for p in loaded_target.parameters()) == 122_054_544
    assert loaded_target.config["moe_block_indices"] == [1, 3, 5, 7, 9, 11]
    assert torch.all(loaded_target.norm.weight == 2.0)
    assert torch.all(load_backbone(path, which="context").norm.weight == 3.0)
    assert sum(p.numel() for p in load_predictor(path).parameters()) == 21_941_904


# ============================================================================ reference equality
def test_encoder_equals_literal_reference_forward(tiny_reference_checkpoint):
    path, target, _, _ = tiny_reference_checkpoint
    encoder = load_backbone(path, which="target").eval()
    x = torch.rand(2, 1, 48, 54, 48, generator=torch.Generator().manual_seed(5))
    gen = torch.Generator().manual_seed(6)
    masks = [torch.stack([torch.randperm(576, generator=gen)[:144] for _ in range(2)]) for _ in range(2)]
    kwargs = dict(patch=6, img=(48, 54, 48), depth=2, num_heads=4, moe=(4, 2))
    with torch.no_grad():
        ours_full = encoder(x)
        ours_masked = encoder(x, masks)
        ref_full = reference_encoder_forward(target, x, [torch.arange(576).expand(2, -1)], **kwargs)
        ref_masked = reference_encoder_forward(target, x, masks, **kwargs)
    assert torch.allclose(ours_full, ref_full, atol=2e-5)
    assert torch.allclose(ours_masked, ref_masked, atol=2e-5)
    # The quirky position layout matters: the true-grid layout gives different features for the same weights.
    grid = load_backbone(path, which="target", overrides={"rope_layout": "grid"}).eval()
    with torch.no_grad():
        assert not torch.allclose(grid(x), ref_full, atol=1e-3)


def test_predictor_equals_literal_reference_forward(tiny_reference_checkpoint):
    path, _, _, pred = tiny_reference_checkpoint
    predictor = load_predictor(path).eval()
    gen = torch.Generator().manual_seed(7)
    perms = torch.stack([torch.randperm(576, generator=gen) for _ in range(2)])
    context_idx, target_idx = perms[:, :100], perms[:, 100:250]
    context = torch.randn(2, 100, 64, generator=gen)
    with torch.no_grad():
        ours = predictor(context, context_idx, target_idx)
        ref = reference_predictor_forward(pred, context, context_idx, target_idx, grid=8, depth=2, num_heads=4)
    assert torch.allclose(ours, ref, atol=2e-5)


# ============================================================================ sources and strictness
def test_which_picks_target_or_context(tiny_reference_checkpoint):
    path, target, context, _ = tiny_reference_checkpoint
    as_target = native_to_reference(load_backbone(path).state_dict())
    as_context = native_to_reference(load_backbone(path, which="context").state_dict())
    assert all(torch.equal(as_target[k], target[k].to(as_target[k].dtype)) for k in target)
    assert all(torch.equal(as_context[k], context[k].to(as_context[k].dtype)) for k in context)
    with pytest.raises(ValueError, match="which"):
        load_backbone(path, which="online")


def test_target_missing_is_an_error_not_a_fallback(tmp_path, tiny_reference_checkpoint):
    _, _, context, _ = tiny_reference_checkpoint
    path = tmp_path / "online_only.pt"
    torch.save({"encoder": _prefixed(context)}, path)
    with pytest.raises(ValueError, match="which='context'"):
        load_backbone(path)
    assert isinstance(load_backbone(path, which="context"), torch.nn.Module)


@pytest.mark.parametrize("problem", ["missing", "unexpected", "misshaped"])
def test_strict_errors_name_the_key(tmp_path, tiny_reference_checkpoint, problem):
    _, target, _, _ = tiny_reference_checkpoint
    broken = dict(target)
    if problem == "missing":
        del broken["norm.weight"]
        key = "norm.weight"
    elif problem == "unexpected":
        broken["blocks.0.attn.extra_scale"] = torch.ones(3)
        key = "blocks.0.attn.extra_scale"
    else:
        broken["blocks.0.norm1.bias"] = torch.zeros(65)
        key = "blocks.0.norm1.bias"
    path = tmp_path / "broken.pt"
    torch.save({"target_encoder": _prefixed(broken)}, path)
    with pytest.raises(ValueError, match=rf"{problem.replace('misshaped', 'mis-shaped')}.*{key.replace('.', r'.')}"):
        load_backbone(path, name="vit_tiny_moe")
    excused = load_backbone(path, name="vit_tiny_moe", ignore_keys=[key])
    assert isinstance(excused, torch.nn.Module)
    with pytest.warns(UserWarning, match=key.replace(".", r"\.")):
        load_backbone(path, name="vit_tiny_moe", strict=False)


def test_architecture_inference_and_explicit_name(tmp_path):
    deeper = build_encoder("vit_tiny", depth=3)
    path = tmp_path / "deeper.safetensors"
    save_file(deeper.state_dict(), path)
    with pytest.raises(ValueError, match="depth=3"):
        load_backbone(path)
    loaded = load_backbone(path, name="vit_tiny", overrides={"depth": 3})
    assert len(loaded.blocks) == 3
    save_file(build_encoder("vit_tiny").state_dict(), tmp_path / "tiny.safetensors")
    assert load_backbone(tmp_path / "tiny.safetensors").config == build_encoder("vit_tiny").config


def test_bare_safetensors_in_both_layouts(tmp_path, tiny_reference_checkpoint):
    _, target, _, _ = tiny_reference_checkpoint
    save_file(_prefixed(target), tmp_path / "ref.safetensors")
    save_file(reference_to_native(target), tmp_path / "native.safetensors")
    x = torch.rand(1, 1, 48, 54, 48)
    with torch.no_grad():
        a = load_backbone(tmp_path / "ref.safetensors").eval()(x)
        b = load_backbone(tmp_path / "native.safetensors").eval()(x)
    assert torch.equal(a, b)


@dataclass
class _CustomHyperParameters:
    lr: float = 1e-3


def test_lightning_checkpoints(tmp_path, tiny_reference_checkpoint):
    _, target, context, pred = tiny_reference_checkpoint
    hparams = {"encoder": "vit_tiny_moe", "encoder_overrides": {"use_activation_checkpointing": True},
               "predictor": "predictor_tiny"}  # fmt: skip
    state = {f"target_encoder.{k}": v for k, v in reference_to_native(target).items()}
    state.update({f"context_encoder._orig_mod.{k}": v for k, v in reference_to_native(context).items()})
    state.update({f"predictor.{k}": v for k, v in pred.items()})
    state["online_probe.weight"] = torch.zeros(2, 64)
    pretrain = tmp_path / "pretrain.ckpt"
    torch.save({"state_dict": state, "hyper_parameters": hparams, "epoch": 1, "global_step": 10}, pretrain)
    encoder = load_backbone(pretrain)
    assert encoder.grad_checkpointing
    assert torch.equal(encoder.norm.weight, target["norm.weight"])
    assert torch.equal(load_backbone(pretrain, which="context").norm.weight, context["norm.weight"])
    assert torch.equal(load_predictor(pretrain).predictor_proj.bias, pred["predictor_proj.bias"])

    downstream = tmp_path / "finetune.ckpt"
    state = {f"backbone.{k}": v for k, v in reference_to_native(target).items()}
    state["head.linear.weight"] = torch.zeros(3, 64)
    torch.save({"state_dict": state, "hyper_parameters": {"encoder": "vit_tiny_moe"}}, downstream)
    assert torch.equal(load_backbone(downstream).norm.weight, target["norm.weight"])
    hparams = {"backbone": "vit_tiny_moe", "backbone_kwargs": {"rope_layout": "grid"}, "head": "linear"}
    torch.save({"state_dict": state, "hyper_parameters": hparams}, downstream)
    assert load_backbone(downstream).config["rope_layout"] == "grid"

    unsafe = tmp_path / "unsafe.ckpt"
    torch.save({"state_dict": state, "hyper_parameters": {"cfg": _CustomHyperParameters()}}, unsafe)
    with pytest.raises(ValueError, match="weights_only"):
        load_backbone(unsafe)


def test_export_round_trip_identical_outputs(tmp_path):
    torch.manual_seed(0)
    encoder = build_encoder("vit_tiny_moe", rope_layout="grid").eval()
    with torch.no_grad():
        encoder.blocks[1].mlp.gate.bias.copy_(torch.tensor([0.1, -0.1, 0.05, -0.05]))
    out = export_backbone(encoder, tmp_path / "export", name="vit_tiny_moe", overrides={"rope_layout": "grid"})
    config = json.loads((out / "config.json").read_text())
    assert config["format"] == "neurojepa_pl.backbone" and config["format_version"] == 1
    assert config["name"] == "vit_tiny_moe" and config["overrides"] == {"rope_layout": "grid"}
    assert "blocks.1.mlp.experts.0.fc1.weight" in load_file(out / "model.safetensors")  # reference layout on disk
    loaded = load_backbone(out).eval()
    assert loaded.config == encoder.config
    x = torch.rand(2, 1, 48, 54, 48)
    with torch.no_grad():
        assert torch.equal(loaded(x), encoder(x))
    with pytest.raises(ValueError, match="saved as"):
        load_backbone(out, name="vit_tiny")


def test_unrecognised_sources(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_backbone(tmp_path / "nope.pt")
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(ValueError, match="config.json"):
        load_backbone(tmp_path / "empty_dir")
    torch.save({"weights": [1, 2, 3]}, tmp_path / "odd.pt")
    with pytest.raises(ValueError, match="unrecognised"):
        load_backbone(tmp_path / "odd.pt")


def test_genuine_lightning_checkpoint_loads_with_weights_only(tmp_path):
    import lightning as L  # tests may use Lightning; the models package never does

    class _Pretrain(L.LightningModule):
        def __init__(self, encoder: str = "vit_tiny", encoder_overrides: dict | None = None):
            super().__init__()
            self.save_hyperparameters()
            self.target_encoder = build_encoder(encoder, **(encoder_overrides or {}))
            self.context_encoder = build_encoder(encoder, **(encoder_overrides or {}))

        def training_step(self, batch, batch_idx):
            return self.context_encoder(batch[0]).square().mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.context_encoder.parameters(), lr=0.1)

    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(1, 1, 48, 54, 48)), batch_size=1)
    module = _Pretrain(encoder_overrides={"depth": 1})
    trainer = L.Trainer(max_steps=1, default_root_dir=tmp_path, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu")  # fmt: skip
    trainer.fit(module, data)
    (ckpt,) = tmp_path.rglob("*.ckpt")
    context = load_backbone(ckpt, which="context")
    target = load_backbone(ckpt)
    assert len(context.blocks) == 1
    assert torch.equal(context.blocks[0].attn.qkv.weight, module.context_encoder.blocks[0].attn.qkv.weight)
    assert torch.equal(target.blocks[0].attn.qkv.weight, module.target_encoder.blocks[0].attn.qkv.weight)
    assert not torch.equal(context.blocks[0].attn.qkv.weight, target.blocks[0].attn.qkv.weight)  # distinct networks
