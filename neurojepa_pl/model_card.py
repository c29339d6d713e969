"""The ``README.md`` model card of an exported folder (``neurojepa export``; docs/method.md §9.3).

What a Hub user looks for first, from what the export knows: the architecture (registry name and the sizes that
matter), parameter counts (total, and active per token for MoE encoders), what the encoder was pretrained on (the
manifest named by the run's ``config.yaml``: path, row count, SHA-256), the optimizer step, the run's configuration
itself, the test metrics with their confidence intervals when the run folder has a ``metrics.json``, the licence and
a three-line loading example. The metadata block (licence, library, tags) is ``huggingface_hub``'s ``ModelCardData``,
so the Hub indexes it; the body is written here.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from torch import nn

from neurojepa_pl.models.moe import MoEFeedForward

__all__ = ["ParameterCounts", "parameter_counts", "ManifestDigest", "manifest_digest", "RunRecord", "read_run",
           "model_card_text"]  # fmt: skip

CARD_TAGS = ["neuro-jepa", "jepa", "self-supervised", "mri", "brain", "3d", "vision-transformer", "mixture-of-experts"]


@dataclass(frozen=True)
class ParameterCounts:
    """Parameters of a network: all of them, and those one token passes through (MoE: shared + top-k experts).

    Attributes:
        total: every parameter.
        active: per token: ``total`` minus, in each MoE layer, the ``num_experts - top_k`` experts it does not use.
    """

    total: int
    active: int


def parameter_counts(module: nn.Module) -> ParameterCounts:
    """Total and active-per-token parameters (for the paper's encoder: 122,054,544 and 86,595,984)."""
    total = sum(p.numel() for p in module.parameters())
    inactive = 0
    for layer in module.modules():
        if isinstance(layer, MoEFeedForward):
            per_expert = sum(p[0].numel() for p in layer.experts.parameters())  # stacked: [E, ...]
            inactive += (layer.config.num_experts - layer.config.top_k) * per_expert
    return ParameterCounts(total, total - inactive)


@dataclass(frozen=True)
class ManifestDigest:
    """The pretraining manifest as the run's config names it.

    Attributes:
        path: as written in the config.
        found: where it was read at export time, or None if it is not there any more.
        rows: data rows (scans), when found.
        sha256: hex digest of the file's bytes, when found.
    """

    path: str
    found: Path | None = None
    rows: int | None = None
    sha256: str | None = None


def manifest_digest(path: str, search: Sequence[Path] = ()) -> ManifestDigest:
    """Row count and SHA-256 of a manifest CSV, looked up as given, then relative to each folder of ``search``."""
    candidates = [Path(path)] + [base / path for base in search if not Path(path).is_absolute()]
    found = next((c for c in candidates if c.is_file()), None)
    if found is None:
        return ManifestDigest(path)
    digest = hashlib.sha256()
    with found.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    with found.open(newline="") as handle:
        rows = max(sum(1 for _ in csv.reader(handle)) - 1, 0)  # csv: quoted fields may hold newlines
    return ManifestDigest(path, found, rows, digest.hexdigest())


@dataclass
class RunRecord:
    """What the run folder of a checkpoint tells about it.

    Attributes:
        folder: the run folder (``<save_dir>/<name>/version_<k>``), or None.
        config_text: its ``config.yaml`` (as saved by ``neurojepa fit``), or None.
        manifest: the pretraining manifest named there, or None.
        metrics: its ``metrics.json`` (written by ``neurojepa test``), or None.
    """

    folder: Path | None = None
    config_text: str | None = None
    manifest: ManifestDigest | None = None
    metrics: dict[str, Any] | None = field(default=None)


def read_run(folder: Path | None) -> RunRecord:
    """Read ``config.yaml`` (and the manifest it names) and ``metrics.json`` of a run folder, when present."""
    if folder is None or not folder.is_dir():
        return RunRecord(folder)
    record = RunRecord(folder)
    config_path = folder / "config.yaml"
    if config_path.is_file():
        record.config_text = config_path.read_text()
        config = yaml.safe_load(record.config_text) or {}
        data = config.get("data") or {}
        manifest = (data.get("init_args") or {}).get("manifest") if isinstance(data, Mapping) else None
        if isinstance(manifest, str):
            record.manifest = manifest_digest(manifest, [Path.cwd(), folder, *folder.parents])
    metrics_path = folder / "metrics.json"
    if metrics_path.is_file():
        record.metrics = json.loads(metrics_path.read_text())
    return record


def _number(value: Any) -> str:
    return "n/a" if value is None or (isinstance(value, float) and not math.isfinite(value)) else f"{value:.3f}"


def _metrics_table(report: Mapping[str, Any]) -> list[str]:
    level = report.get("ci_level")
    ci = f"{level:.0%} CI" if isinstance(level, (int, float)) else "CI"
    lines = [
        f"Test split of the run: task {report.get('task', '?')}, n = {report.get('n', '?')}, {ci} from "
        f"{report.get('n_bootstrap', '?')} bootstrap resamples (`metrics.json`).",
        "",
        f"| metric | value | {ci} |",
        "|---|---|---|",
    ]
    for name, entry in (report.get("metrics") or {}).items():
        if "/" in name:
            continue  # per-class rows stay in metrics.json
        flag = " (flagged: " + ", ".join(w["code"] for w in entry.get("warnings") or ()) + ")"
        lines.append(
            f"| {name} | {_number(entry.get('value'))} | [{_number(entry.get('ci_low'))}, "
            f"{_number(entry.get('ci_high'))}]{flag if entry.get('warnings') else ''} |"
        )
    return lines


def _architecture_rows(name: str | None, config: Mapping[str, Any], overrides: Mapping[str, Any]) -> list[str]:
    img, patch = config["img_size"], config["patch_size"]
    patches = [patch] * 3 if isinstance(patch, int) else list(patch)
    tokens = math.prod(i // p for i, p in zip(img, patches))
    rows = [
        "| | |",
        "|---|---|",
        f"| registry name | `{name}` |" if name else "| registry name | none (see `config.json`) |",
        f"| input -> output | `[B, {config['in_chans']}, {', '.join(map(str, img))}]` -> tokens `[B, {tokens}, "
        f"{config['embed_dim']}]` (patch {patch}) |",
        f"| width / depth / heads | {config['embed_dim']} / {config['depth']} / {config['num_heads']} |",
    ]
    moe = config.get("moe")
    if moe and config.get("moe_block_indices"):
        rows.append(
            f"| Mixture of Experts | blocks {list(config['moe_block_indices'])}: {moe['num_experts']} routed experts "
            f"(width {moe['expert_hidden']}), top-{moe['top_k']}, route scale {moe['route_scale']}, shared expert "
            f"width {moe['shared_hidden']} |"
        )
    else:
        rows.append(f"| MLP | dense, ratio {config['mlp_ratio']} |")
    rows.append(f"| attention gate / RoPE layout | {config['attn_gate']} / {config['rope_layout']} |")
    if overrides:
        rows.append(f"| differs from the registry entry | `{json.dumps(dict(overrides))}` |")
    return rows


def model_card_text(
    *,
    title: str,
    source: str,
    which: str,
    name: str | None,
    config: Mapping[str, Any],
    overrides: Mapping[str, Any],
    encoder_counts: ParameterCounts,
    contents: Sequence[str],
    predictor: tuple[str | None, ParameterCounts] | None,
    step: int | None,
    run: RunRecord,
    license: str | None,
    load_id: str,
) -> str:
    """The full ``README.md``: ``huggingface_hub`` metadata block + body.

    Args:
        title: heading (the Hub repository id, or the folder name).
        source: the exported checkpoint, as given.
        which: ``"target"`` or ``"context"`` (the encoder in ``model.safetensors`` for an encoder-only export).
        name: the encoder's registry name, if any.
        config: the encoder's constructor arguments (``config.json["config"]``).
        overrides: what differs from the registry entry.
        encoder_counts: its parameter counts.
        contents: ``config.json["contents"]``.
        predictor: ``(registry name, counts)`` for a full export.
        step: the optimizer step of the checkpoint, if recorded.
        run: the run folder's record.
        license: a Hub licence id (e.g. ``cc-by-nc-nd-4.0``), or None when not stated.
        load_id: what the loading example passes to ``load_backbone`` (repository id or folder).
    """
    from huggingface_hub import ModelCard, ModelCardData

    data = ModelCardData(license=license, library_name="neurojepa_pl", tags=CARD_TAGS)
    encoder_role = "EMA target encoder" if which == "target" else "online context encoder"
    what = (
        "the full self-supervised state: EMA target encoder, context encoder and predictor"
        if len(contents) > 1
        else f"the {encoder_role}"
    )
    counts = f"{encoder_counts.total:,} parameters"
    if encoder_counts.active != encoder_counts.total:
        counts += f", {encoder_counts.active:,} active per token"
    body = [
        f"# {title}",
        "",
        f"Neuro-JEPA 3D ViT encoder for brain MRI, exported by `neurojepa export` from `{source}`. It holds {what}.",
        "",
        "## Architecture",
        "",
        *_architecture_rows(name, config, overrides),
        f"| parameters (encoder) | {counts} |",
    ]
    if predictor is not None:
        body.append(f"| predictor | `{predictor[0]}`, {predictor[1].total:,} parameters |")
    body += [
        "",
        "Every constructor argument is in `config.json` (`config`); `model.safetensors` holds "
        + (
            "the networks under the prefixes " + ", ".join(f"`{c}.`" for c in contents)
            if len(contents) > 1
            else "the encoder"
        )
        + " in the reference key layout (one tensor per routed expert).",
        "",
        "## Pretraining",
        "",
        f"- optimizer step of the checkpoint: {step:,}" if step is not None else "- optimizer step: not recorded",
    ]
    manifest = run.manifest
    if manifest is None:
        body.append("- data: the run folder names no manifest (no `config.yaml` beside the checkpoint)")
    elif manifest.found is None:
        body.append(f"- data: manifest `{manifest.path}` (not found at export time: row count and digest unknown)")
    else:
        body.append(f"- data: manifest `{manifest.path}`, {manifest.rows:,} rows, SHA-256 `{manifest.sha256}`")
    if run.config_text is not None:
        body += ["", "<details><summary>The run's config.yaml</summary>", "", "```yaml", run.config_text.rstrip(),
                 "```", "", "</details>"]  # fmt: skip
    body += ["", "## Evaluation", ""]
    body += _metrics_table(run.metrics) if run.metrics else ["No `metrics.json` in the run folder: no test metrics."]
    body += [
        "",
        "## Licence",
        "",
        f"`{license}` (the `license` field above)." if license else "Not stated (export with `--license ID`).",
        "",
        "## Loading",
        "",
        "```python",
        "from neurojepa_pl.models import load_backbone",
        f'encoder = load_backbone("{load_id}")  # strict: any key mismatch is an error',
        f"tokens = encoder(volume)  # [B, {config['in_chans']}, {', '.join(map(str, config['img_size']))}] -> "
        f"[B, N, {config['embed_dim']}]",
        "```",
        "",
    ]
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(body)))
