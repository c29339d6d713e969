"""Weight I/O: reference key layout (TSV), strict loading, source formats, export round trip, and equality with a
literal re-implementation of the reference forward (written here from docs/method.md §2.1-2.2, 3.2 and 4, independent of
the package's modules)."""

from __future__ import annotations

import json
import math
import re
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
def test_native_to_reference_names_match_tsv_in_order():
    encoder_rows, predictor_rows = _read_tsv("encoder_state_dict.tsv"), _read_tsv("predictor_state_dict.tsv")
    with torch.device("meta"):
        encoder, predictor = build_encoder("vit_base_moe"), build_predictor("predictor_base")
    for model, rows in ((encoder, encoder_rows), (predictor, predictor_rows)):
        reference = native_to_reference(model.state_dict())
        assert list(reference) == list(rows)  # the reference's state-dict order too (optimizer states depend on it)
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
    assert config["format"] == "neurojepa_pl.backbone" and config["format_version"] == 2
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


# ============================================================================ errors that help (docs/method.md §9.3)
FIX_REREAD = "fix: copy or download the file again (compare its size with the original), or save it again."
FIX_SOURCE = "fix: pass the checkpoint file itself (.pt / .ckpt / .safetensors) or an exported folder."
FIX_KEYS = (
    "fix: check the architecture (name= / overrides=; routed experts are compared stacked, experts.fc1_weight "
    "[E, ...]), excuse keys with ignore_keys=[...], or pass strict=False to load the tensors that match."
)


def _bad_files(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    """Each bad file and the exact first line of its error."""
    import gzip
    import zipfile

    encoder = build_encoder("vit_tiny")
    good = tmp_path / "good.pt"
    torch.save({"target_encoder": encoder.state_dict()}, good)
    data = good.read_bytes()
    files = {
        "truncated": (tmp_path / "latest.pt", data[: len(data) // 2]),
        "empty": (tmp_path / "empty.pt", b""),
        "text": (tmp_path / "notes.pt", b"hello world\n"),
        "scan": (tmp_path / "scan.nii.gz", gzip.compress(b"\x00" * 400)),
    }
    for path, content in files.values():
        path.write_bytes(content)
    legacy = tmp_path / "legacy.pt"
    torch.save({"target_encoder": encoder.state_dict()}, legacy, _use_new_zipfile_serialization=False)
    legacy.write_bytes(legacy.read_bytes()[:-100])
    save_file(encoder.state_dict(), tmp_path / "cut.safetensors")
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(cut.read_bytes()[:-1000])
    with zipfile.ZipFile(tmp_path / "notes.zip", "w") as archive:
        archive.writestr("a.txt", "x")
    sizes = {name: len(content) for name, (_, content) in files.items()}
    return {
        "truncated": (
            files["truncated"][0],
            f"{files['truncated'][0]} is a truncated or damaged zip archive ({sizes['truncated']:,} bytes, no central "
            "directory): a torch.save checkpoint that was not completely written or copied.",
        ),
        "empty": (files["empty"][0], f"{files['empty'][0]} is empty (0 bytes), not a checkpoint."),
        "text": (
            files["text"][0],
            f"{files['text'][0]} is not a checkpoint: 12 bytes starting with text 'hello world\\n'; expected a "
            "torch.save file (a zip archive) or safetensors.",
        ),
        "scan": (
            files["scan"][0],
            f"{files['scan'][0]} is not a checkpoint: {sizes['scan']} bytes starting with gzip-compressed data (a "
            ".nii.gz scan?); expected a torch.save file (a zip archive) or safetensors.",
        ),
        "legacy": (  # the byte count is torch's reader's (where it stopped), not ours: matched as a number
            legacy,
            f"{legacy} could not be read ({legacy.stat().st_size:,} bytes): it is truncated or damaged (unexpected "
            "EOF, expected <N> more bytes. The file might be corrupted.).",
        ),
        "safetensors": (
            cut,
            f"{cut} could not be read as safetensors ({cut.stat().st_size:,} bytes): Error while deserializing "
            "header: incomplete metadata, file not fully covered.",
        ),
        "zip": (
            tmp_path / "notes.zip",
            f"{tmp_path / 'notes.zip'} is a zip archive but not a torch.save checkpoint (no data.pkl among ['a.txt']).",
        ),
    }


@pytest.mark.parametrize("kind", ["truncated", "empty", "text", "scan", "legacy", "safetensors", "zip"])
def test_unreadable_files_name_the_file_and_what_was_found(tmp_path, kind):
    path, first_line = _bad_files(tmp_path)[kind]
    with pytest.raises(ValueError) as err:
        load_backbone(path)
    fix = FIX_SOURCE if kind in ("text", "scan", "zip") else FIX_REREAD
    expected = re.escape(f"{first_line}\n{fix}").replace("<N>", r"\d+")
    assert re.fullmatch(expected, str(err.value)), str(err.value)
    with pytest.raises(ValueError) as err:  # the same for the predictor loader
        load_predictor(path)
    assert re.fullmatch(re.escape(first_line).replace("<N>", r"\d+"), str(err.value).splitlines()[0])


def test_inferred_architecture_reports_the_key_against_the_closest_entry(tmp_path, tiny_reference_checkpoint):
    _, target, _, _ = tiny_reference_checkpoint
    missing, misshaped = dict(target), dict(target)
    del missing["blocks.1.mlp.gate.bias"]
    misshaped["blocks.0.attn.qkv.weight"] = torch.zeros(192, 32)
    closest = (
        "no registry encoder matches the weights (embed_dim=64, patch=(6, 6, 6), depth=2, moe_block_indices=[1], "
        "num_experts=4) exactly; compared with the closest, 'vit_tiny_moe' (38 of its 39 tensors agree)"
    )
    for broken, problem in (
        (missing, "1 missing key(s): ['blocks.1.mlp.gate.bias']"),
        (misshaped, "1 mis-shaped key(s): ['blocks.0.attn.qkv.weight: checkpoint [192, 32] vs model [192, 64]']"),
    ):
        path = tmp_path / "broken.pt"
        torch.save({"target_encoder": _prefixed(broken)}, path)
        with pytest.raises(ValueError) as err:
            load_backbone(path)
        assert str(err.value) == f"{path} (target encoder): {closest}: {problem}.\n{FIX_KEYS}"
        # strict=False loads every tensor that matches and warns naming the rest.
        with pytest.warns(UserWarning) as record:
            loaded = load_backbone(path, strict=False)
        assert str(record[0].message) == (
            f"{path} (target encoder): {closest}: {problem}. strict=False: loaded the 38 matching tensor(s); the "
            "others keep their initialisation."
        )
        state = native_to_reference(loaded.state_dict())
        agree = [k for k in broken if k in state and broken[k].shape == state[k].shape]
        assert agree and all(torch.equal(state[k], broken[k].to(state[k].dtype)) for k in agree)


def test_key_errors_of_every_source_name_the_source(tmp_path, tiny_reference_checkpoint):
    _, target, _, pred = tiny_reference_checkpoint
    native = reference_to_native(target)
    del native["norm.weight"]
    problem = "1 missing key(s): ['norm.weight']."
    # Lightning: architecture from the hyper-parameters (a full spec, as neurojepa fit saves it).
    from neurojepa_pl.models.registry import encoder_spec

    lightning = tmp_path / "run.ckpt"
    torch.save({"state_dict": {f"target_encoder.{k}": v for k, v in native.items()},
                "hyper_parameters": {"encoder": encoder_spec("vit_tiny_moe")}}, lightning)  # fmt: skip
    with pytest.raises(ValueError) as err:
        load_backbone(lightning)
    assert str(err.value).splitlines()[0] == (
        f"{lightning} (target encoder): the weights do not match the architecture stored with them "
        f"('vit_tiny_moe'): {problem}"
    )
    # Exported folder.
    folder = export_backbone(reference_to_native_module(target), tmp_path / "export", name="vit_tiny_moe")
    weights = load_file(folder / "model.safetensors")
    del weights["norm.weight"]
    save_file(weights, folder / "model.safetensors")
    with pytest.raises(ValueError) as err:
        load_backbone(folder)
    assert str(err.value).splitlines()[0] == (
        f"{folder} (target encoder): the weights do not match the architecture stored with them ('vit_tiny_moe'): "
        f"{problem}"
    )
    # Explicit name; and the predictor.
    path = tmp_path / "ref.pt"
    broken_pred = dict(pred, **{"predictor_embed.weight": torch.zeros(32, 48)})
    torch.save({"target_encoder": _prefixed(native_to_reference(native)), "predictor": _prefixed(broken_pred)}, path)
    with pytest.raises(ValueError) as err:
        load_backbone(path, name="vit_tiny_moe")
    assert (
        str(err.value).splitlines()[0] == f"{path} (target encoder): the weights do not match 'vit_tiny_moe': {problem}"
    )
    with pytest.raises(ValueError) as err:
        load_predictor(path)
    assert str(err.value).splitlines()[0] == (
        f"{path} (predictor): no registry predictor matches the weights (predictor_embed [32, 48], 2 blocks) exactly; "
        "compared with the closest, 'predictor_tiny' (36 of its 37 tensors agree): 1 mis-shaped key(s): "
        "['predictor_embed.weight: checkpoint [32, 48] vs model [32, 64]']."
    )


def test_nothing_close_is_refused(tmp_path):
    path = tmp_path / "alien.pt"
    torch.save({"target_encoder": {"foo.weight": torch.zeros(3)}}, path)
    with pytest.raises(ValueError) as err:
        load_backbone(path, strict=False)
    assert str(err.value) == (
        f"{path} (target encoder): cannot infer the encoder architecture: no registry encoder matches the weights "
        "(embed_dim=?, patch=?, depth=0, moe_block_indices=[], num_experts=0), and none is close (the closest, "
        "'vit_tiny', shares 0% of the key names).\nfix: pass name=<registry name> (and overrides={...} for "
        "non-registry sizes)."
    )


def test_folders_not_written_by_us_are_read_as_flat_weights(tmp_path, tiny_reference_checkpoint):
    """The authors' Hub layout: their own config.json (a model config, not ours) beside model.safetensors."""
    _, target, _, _ = tiny_reference_checkpoint
    folder = tmp_path / "authors"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model": {"model_name": "vit_base", "use_moe": True}}))
    save_file(_prefixed(target), folder / "model.safetensors")
    assert torch.equal(load_backbone(folder).norm.weight, target["norm.weight"])
    (folder / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"config\.json is not valid JSON"):
        load_backbone(folder)


def reference_to_native_module(reference: dict[str, torch.Tensor]) -> torch.nn.Module:
    encoder = build_encoder("vit_tiny_moe")
    encoder.load_state_dict(reference_to_native(reference))
    return encoder
