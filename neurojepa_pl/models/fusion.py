"""The five multimodal fusion heads of the paper (Appendix B.4; docs/method.md §8.6), over one shared backbone.

Every head takes the backbone's tokens of all M modalities of a sample and a validity mask:

    forward(tokens [B, M, N, C], validity [B, M] bool) -> [B, num_classes]

The backbone is run once on the M modalities stacked along the batch (the multimodal LightningModule does that); a
missing modality arrives as a placeholder with validity 0 and, in every head here, has no influence on the output
(it "never votes"). That is a deliberate fix of the reference, where zero images still voted in PoE, sat in the MIL
softmax and entered the late-fusion gate.

Whatever the placeholder holds (zeros, noise, 1e30, +-Inf, NaN), neither the output nor any gradient depends on it:

1. every head first replaces the tokens of invalid modalities by zeros with a *selection* (``masked_fill``), before
   any arithmetic touches them. Multiplying by the validity would not do: 0 * NaN and 0 * Inf are NaN, and even a
   ``torch.where`` applied *after* a computation on NaN input leaves NaN in the backward pass (the unselected branch
   gets a zero gradient, and 0 times its NaN local derivative is NaN again);
2. then each head drops the missing modality's contributions by selection too (``torch.where`` / ``masked_fill`` /
   an attention key mask), never by multiplying with the validity.

So a sample's output with a modality missing is the same as with a zero placeholder in that slot, which in turn is
the head's single-/fewer-modality path (tests/models/test_fusion.py checks both, forward and backward).

Output kinds (``FusionHead.returns_log_probs``):

=================================  =================  ==============
head                               output             training loss
=================================  =================  ==============
``LogitAveraging``                 logits             cross-entropy
``GatedCrossAttentionFusion``      logits             cross-entropy
``ClassifyThenAggregateMIL``       logits             cross-entropy
``ProductOfExperts``               log-probabilities  NLL
``ProductOfExpertsJoint``          log-probabilities  NLL
=================================  =================  ==============

``torch.softmax`` of either kind gives the class probabilities (log-probabilities are normalised logits), so metric code
can treat them alike.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from neurojepa_pl.losses.poe import product_of_experts
from neurojepa_pl.models.heads import AttentiveClassifier, LinearProbe


class FusionHead(nn.Module):
    """Base class: input checks shared by all fusion heads.

    Args:
        embed_dim: backbone token width C.
        num_classes: number of output classes (2 for binary, as docs/method.md §8.3: two logits).
        num_modalities: M, the number of modality slots in a sample.
    """

    returns_log_probs: bool = False

    def __init__(self, embed_dim: int, num_classes: int, num_modalities: int) -> None:
        super().__init__()
        if num_modalities < 1:
            raise ValueError(f"num_modalities must be >= 1; got {num_modalities}.")
        self.embed_dim = embed_dim
        self.num_classes = num_classes
        self.num_modalities = num_modalities

    def _prepare(self, tokens: Tensor, validity: Tensor) -> tuple[Tensor, Tensor]:
        """Check the inputs and blank the placeholders.

        Args:
            tokens: ``[B, M, N, C]``.
            validity: ``[B, M]`` bool or 0/1.

        Returns:
            ``(tokens, validity)``: the tokens with every invalid modality's slot replaced by zeros (a selection, so
            NaN/Inf placeholders can reach neither the output nor the gradients), and validity as bool ``[B, M]``.
        """
        validity = self._check_inputs(tokens, validity)
        return tokens.masked_fill(~validity[:, :, None, None], 0.0), validity

    def _check_inputs(self, tokens: Tensor, validity: Tensor) -> Tensor:
        """Check shapes and that every sample has a valid modality; return validity as bool ``[B, M]``."""
        expected = f"[B, {self.num_modalities}, N, {self.embed_dim}]"
        if tokens.dim() != 4 or tokens.shape[1] != self.num_modalities or tokens.shape[3] != self.embed_dim:
            raise ValueError(
                f"{type(self).__name__} expects tokens {expected}; got {tuple(tokens.shape)}. "
                "Stack the per-modality backbone outputs along dim 1 in the data module's modality order."
            )
        if validity.shape != tokens.shape[:2]:
            raise ValueError(
                f"{type(self).__name__} expects validity [B, M] = {tuple(tokens.shape[:2])}; "
                f"got {tuple(validity.shape)}."
            )
        validity = validity.bool()
        empty = (~validity.any(dim=1)).nonzero().flatten()
        if empty.numel():
            raise ValueError(
                f"samples {empty.tolist()} of the batch have no valid modality; every sample needs at least one "
                "(the multimodal data module drops such rows, check its `require_all` / modality dropout settings)."
            )
        return validity


class LogitAveraging(FusionHead):
    """Logit-averaging ensemble (reference ``vit_avg``).

    Per modality: mean-pooled tokens -> its own ``Linear(C, classes)`` (a ``LinearProbe``); the fused logits are the
    mean of the valid modalities' logits, sum(v_m * l_m) / sum(v_m). Returns logits ``[B, classes]``.
    """

    def __init__(self, embed_dim: int, num_classes: int, num_modalities: int) -> None:
        super().__init__(embed_dim, num_classes, num_modalities)
        self.classifiers = nn.ModuleList(LinearProbe(embed_dim, num_classes) for _ in range(num_modalities))

    def forward(self, tokens: Tensor, validity: Tensor) -> Tensor:
        """Args: tokens ``[B, M, N, C]``, validity ``[B, M]``. Returns logits ``[B, classes]``."""
        tokens, validity = self._prepare(tokens, validity)
        logits = torch.stack([clf(tokens[:, m]) for m, clf in enumerate(self.classifiers)], dim=1)  # [B, M, K]
        # Selected, not multiplied by the validity: a missing modality's logits are dropped, whatever they are.
        logits = logits.masked_fill(~validity.unsqueeze(-1), 0.0)
        return logits.sum(dim=1) / validity.sum(dim=1, keepdim=True).to(logits.dtype)


class ProjectionHead(nn.Module):
    """Residual projection of docs/method.md §8.6 ``vit_late``: p = Lin(x); out = Dropout(Lin(GELU(p))) + p.

    Shapes: ``[.., C] -> [.., P]``.
    """

    def __init__(self, in_dim: int, proj_dim: int, dropout: float = 0.1) -> None:
        super().__init__()
        self.proj = nn.Linear(in_dim, proj_dim)
        self.fc = nn.Linear(proj_dim, proj_dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        p = self.proj(x)
        return self.dropout(self.fc(F.gelu(p))) + p


class CrossAttention(nn.Module):
    """Multi-head cross-attention of ``query`` onto ``context`` (q/k/v without bias, output projection with bias).

    Written out rather than ``nn.MultiheadAttention`` because the reference has bias-free q/k/v but a biased output
    projection, which ``nn.MultiheadAttention`` cannot express.

    Args:
        dim: width P of both inputs.
        num_heads: heads; ``dim`` must be divisible by it.
        dropout: dropout on the attention weights and on the output.
    """

    def __init__(self, dim: int, num_heads: int = 8, dropout: float = 0.1) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"CrossAttention: dim {dim} is not divisible by num_heads {num_heads}.")
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim, bias=False)
        self.k = nn.Linear(dim, dim, bias=False)
        self.v = nn.Linear(dim, dim, bias=False)
        self.out_proj = nn.Linear(dim, dim)
        self.attn_dropout = dropout
        self.out_dropout = nn.Dropout(dropout)

    def forward(self, query: Tensor, context: Tensor) -> Tensor:
        """Args: query ``[B, Nq, P]``, context ``[B, Nk, P]``. Returns ``[B, Nq, P]``."""
        b, nq, dim = query.shape
        heads = lambda x: x.unflatten(-1, (self.num_heads, dim // self.num_heads)).transpose(1, 2)  # noqa: E731
        out = F.scaled_dot_product_attention(
            heads(self.q(query)),
            heads(self.k(context)),
            heads(self.v(context)),
            dropout_p=self.attn_dropout if self.training else 0.0,
        )
        return self.out_dropout(self.out_proj(out.transpose(1, 2).reshape(b, nq, dim)))


class GatedCrossAttentionFusion(FusionHead):
    """Gated cross-attention late fusion of two modalities (reference ``vit_late``, ``MultiModalLateFusion``).

    1. Per modality a ``ProjectionHead`` C -> P.
    2. Bidirectional cross-attention: f1' = LN1(f1 + LN3(CA12(f1 -> f2))), f2' = LN2(f2 + LN4(CA21(f2 -> f1))).
    3. Mean pooling over tokens -> p1, p2 ``[B, P]``.
    4. Gate g = act(Lin(P -> P)(ReLU(Lin(2P -> P)([p1; p2])))), fused = g * p1 + (1 - g) * p2, logits = Lin(P -> K).

    ``gate="sigmoid"`` (default) makes g a dimension-wise interpolation coefficient in (0, 1), as the paper describes;
    the reference code uses tanh (g in (-1, 1), extrapolating rather than interpolating) — ``gate="tanh"`` reproduces it
    for parity (docs/method.md §8.6 [PAPER≠CODE]).

    Missing modalities (deliberate fix; the reference only multiplies their features by 0): the cross-attention term
    from a missing modality is dropped and the fused vector is the valid modality's (as if g = 1 when only modality 1 is
    valid, g = 0 when only modality 2 is), both by selection, so the output equals the single-modality path.
    Returns logits ``[B, classes]``.

    Args:
        embed_dim: backbone width C (768 for ViT-B).
        num_classes: K.
        num_modalities: must be 2 (the method is defined for a pair).
        proj_dim: P (512 in the reference).
        num_heads: cross-attention heads (8).
        dropout: dropout in the projection heads and the cross-attention (0.1).
        gate: ``"sigmoid"`` or ``"tanh"``.
    """

    def __init__(
        self,
        embed_dim: int,
        num_classes: int,
        num_modalities: int = 2,
        proj_dim: int = 512,
        num_heads: int = 8,
        dropout: float = 0.1,
        gate: str = "sigmoid",
    ) -> None:
        super().__init__(embed_dim, num_classes, num_modalities)
        if num_modalities != 2:
            raise ValueError(
                f"GatedCrossAttentionFusion is defined for exactly 2 modalities (anchor + one); got {num_modalities}. "
                "Use LogitAveraging, MIL or PoE for more."
            )
        if gate not in ("sigmoid", "tanh"):
            raise ValueError(f"gate must be 'sigmoid' (paper) or 'tanh' (reference code); got {gate!r}.")
        self.gate_kind = gate
        self.proj1 = ProjectionHead(embed_dim, proj_dim, dropout)
        self.proj2 = ProjectionHead(embed_dim, proj_dim, dropout)
        self.cross_12 = CrossAttention(proj_dim, num_heads, dropout)
        self.cross_21 = CrossAttention(proj_dim, num_heads, dropout)
        self.norm1 = nn.LayerNorm(proj_dim)
        self.norm2 = nn.LayerNorm(proj_dim)
        self.norm3 = nn.LayerNorm(proj_dim)
        self.norm4 = nn.LayerNorm(proj_dim)
        self.gate = nn.Sequential(nn.Linear(2 * proj_dim, proj_dim), nn.ReLU(), nn.Linear(proj_dim, proj_dim))
        self.classifier = nn.Linear(proj_dim, num_classes)

    def gate_values(self, p1: Tensor, p2: Tensor) -> Tensor:
        """The learned gate before the missing-modality override: ``[B, P]`` in (0, 1) (sigmoid) or (-1, 1) (tanh)."""
        pre = self.gate(torch.cat([p1, p2], dim=-1))
        return torch.sigmoid(pre) if self.gate_kind == "sigmoid" else torch.tanh(pre)

    def forward(self, tokens: Tensor, validity: Tensor) -> Tensor:
        """Args: tokens ``[B, 2, N, C]``, validity ``[B, 2]``. Returns logits ``[B, classes]``."""
        tokens, validity = self._prepare(tokens, validity)
        valid1, valid2 = validity[:, 0, None, None], validity[:, 1, None, None]  # [B, 1, 1]
        f1, f2 = self.proj1(tokens[:, 0]), self.proj2(tokens[:, 1])
        # The cross-attention term from a missing modality is selected away (the reference multiplied it by 0).
        f1_new = self.norm1(torch.where(valid2, f1 + self.norm3(self.cross_12(f1, f2)), f1))
        f2_new = self.norm2(torch.where(valid1, f2 + self.norm4(self.cross_21(f2, f1)), f2))
        p1, p2 = f1_new.mean(dim=1), f2_new.mean(dim=1)
        g = self.gate_values(p1, p2)
        # With one modality the fused vector IS that modality's (g forced to 1 or 0), chosen by selection.
        single = torch.where(validity[:, :1], p1, p2)
        fused = torch.where(validity.all(dim=1, keepdim=True), g * p1 + (1 - g) * p2, single)
        return self.classifier(fused)


class ClassifyThenAggregateMIL(FusionHead):
    """Classify-then-aggregate multiple-instance learning (reference ``vit_mil``, adapted from NeuroVFM).

    The bag of a sample is all tokens of all its modalities, ``[M*N, C]``. On dropout-ed inputs, two branches with
    their own LayerNorm (eps 1e-6):

    - gated attention scores s = W(tanh(V x) * sigmoid(U x)) ``[M*N, K]``; per class a softmax over the bag (fp32);
    - instance logits z = MLP(x) (C -> 256, GELU, -> K).

    Bag logit_k = scale_k * sum_i a_ik z_ik + bias_k. Tokens of missing modalities are EXCLUDED from the softmax
    (deliberate fix: the reference keeps zeroed tokens in the bag). Returns logits ``[B, classes]``.

    ``scale`` and ``bias`` are per class (init 1 and 0); the spec does not say their shape, and a scalar bias would be
    a no-op under softmax.

    Args:
        embed_dim: C.
        num_classes: K.
        num_modalities: M.
        hidden_dim: width of the gated attention (512).
        instance_hidden_dim: hidden width of the instance MLP (256).
        dropout: dropout on the input tokens (0.5).
    """

    def __init__(
        self,
        embed_dim: int,
        num_classes: int,
        num_modalities: int,
        hidden_dim: int = 512,
        instance_hidden_dim: int = 256,
        dropout: float = 0.5,
    ) -> None:
        super().__init__(embed_dim, num_classes, num_modalities)
        self.input_dropout = nn.Dropout(dropout)
        self.attention_norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.attention_v = nn.Linear(embed_dim, hidden_dim)
        self.attention_u = nn.Linear(embed_dim, hidden_dim)
        self.attention_w = nn.Linear(hidden_dim, num_classes)
        self.instance_norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.instance_mlp = nn.Sequential(
            nn.Linear(embed_dim, instance_hidden_dim), nn.GELU(), nn.Linear(instance_hidden_dim, num_classes)
        )
        self.scale = nn.Parameter(torch.ones(num_classes))
        self.bias = nn.Parameter(torch.zeros(num_classes))
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.trunc_normal_(module.weight, std=0.02, a=-0.04, b=0.04)
            nn.init.zeros_(module.bias)

    def _bag(self, tokens: Tensor, validity: Tensor) -> tuple[Tensor, Tensor]:
        """Flatten modalities into one bag: tokens ``[B, M*N, C]`` and per-token validity ``[B, M*N]``."""
        b, m, n, c = tokens.shape
        return tokens.reshape(b, m * n, c), validity.unsqueeze(-1).expand(b, m, n).reshape(b, m * n)

    def _attention(self, x: Tensor, token_valid: Tensor) -> Tensor:
        h = self.attention_norm(x)
        scores = self.attention_w(torch.tanh(self.attention_v(h)) * torch.sigmoid(self.attention_u(h)))
        # fp32 softmax: under bf16 autocast the per-class weights over ~1k instances would lose too much precision.
        scores = scores.float().masked_fill(~token_valid.unsqueeze(-1), float("-inf"))
        return scores.softmax(dim=1)

    def attention(self, tokens: Tensor, validity: Tensor) -> Tensor:
        """Per-class attention weights over each bag.

        Args:
            tokens: ``[B, M, N, C]``.
            validity: ``[B, M]``.

        Returns:
            ``[B, M*N, K]`` float32; for each sample and class the weights sum to 1 and are 0 on missing modalities.
        """
        tokens, validity = self._prepare(tokens, validity)
        bag, token_valid = self._bag(tokens, validity)
        return self._attention(self.input_dropout(bag), token_valid)

    def forward(self, tokens: Tensor, validity: Tensor) -> Tensor:
        """Args: tokens ``[B, M, N, C]``, validity ``[B, M]``. Returns logits ``[B, classes]``."""
        tokens, validity = self._prepare(tokens, validity)
        bag, token_valid = self._bag(tokens, validity)
        x = self.input_dropout(bag)
        weights = self._attention(x, token_valid)  # [B, M*N, K], exactly 0 on missing modalities
        instance_logits = self.instance_mlp(self.instance_norm(x)).float()
        # Selected away, so the weighted sum below adds exact zeros for the missing modalities' instances.
        instance_logits = instance_logits.masked_fill(~token_valid.unsqueeze(-1), 0.0)
        bag_logits = (weights * instance_logits).sum(dim=1)
        return (bag_logits * self.scale + self.bias).to(tokens.dtype)


class ProductOfExperts(FusionHead):
    """Product of experts (reference ``vit_poe``): one ``AttentiveClassifier`` per modality, probabilities multiplied.

    log p = sum over VALID modalities of log_softmax(l_m), renormalised (``losses.poe.product_of_experts``). The
    reference passed no mask, so zero placeholders voted; here they do not. Returns log-probabilities
    ``[B, classes]`` (train with NLL).

    Args:
        embed_dim: C.
        num_classes: K.
        num_modalities: M.
        head_depth: depth of each attentive head (1).
        head_heads: attention heads of each attentive head (16).
    """

    returns_log_probs = True

    def __init__(
        self, embed_dim: int, num_classes: int, num_modalities: int, head_depth: int = 1, head_heads: int = 16
    ) -> None:
        super().__init__(embed_dim, num_classes, num_modalities)
        self.experts = nn.ModuleList(
            AttentiveClassifier(embed_dim, num_classes, depth=head_depth, num_heads=head_heads)
            for _ in range(num_modalities)
        )

    def modality_logits(self, tokens: Tensor) -> Tensor:
        """Each modality's expert on its own tokens: ``[B, M, N, C] -> [B, M, K]`` logits."""
        return torch.stack([expert(tokens[:, m]) for m, expert in enumerate(self.experts)], dim=1)

    def forward(self, tokens: Tensor, validity: Tensor) -> Tensor:
        """Args: tokens ``[B, M, N, C]``, validity ``[B, M]``. Returns log-probabilities ``[B, classes]``."""
        tokens, validity = self._prepare(tokens, validity)
        return product_of_experts(self.modality_logits(tokens), validity)


class ProductOfExpertsJoint(ProductOfExperts):
    """Product of experts with a joint head (reference ``vit_poe_joint``; paper ref. [50]).

    Adds an ``AttentiveClassifier`` over the token-concatenated features ``[B, M*N, C]`` as an extra, always-valid
    expert. The joint head's attention ignores the tokens of missing modalities (key padding mask), so it sees the
    concatenation of the valid modalities only. A key mask alone does not protect against a NaN placeholder (a masked
    key's weight is 0, and 0 * NaN value = NaN), which is why the placeholders are blanked first (module docstring).
    Returns log-probabilities ``[B, classes]`` (train with NLL).
    """

    def __init__(
        self, embed_dim: int, num_classes: int, num_modalities: int, head_depth: int = 1, head_heads: int = 16
    ) -> None:
        super().__init__(embed_dim, num_classes, num_modalities, head_depth, head_heads)
        self.joint_expert = AttentiveClassifier(embed_dim, num_classes, depth=head_depth, num_heads=head_heads)

    def forward(self, tokens: Tensor, validity: Tensor) -> Tensor:
        """Args: tokens ``[B, M, N, C]``, validity ``[B, M]``. Returns log-probabilities ``[B, classes]``."""
        tokens, validity = self._prepare(tokens, validity)
        b, m, n, c = tokens.shape
        token_valid = validity.unsqueeze(-1).expand(b, m, n).reshape(b, m * n)
        joint = self.joint_expert(tokens.reshape(b, m * n, c), key_mask=token_valid)
        logits = torch.cat([self.modality_logits(tokens), joint.unsqueeze(1)], dim=1)  # [B, M+1, K]
        expert_valid = torch.cat([validity, validity.new_ones(b, 1)], dim=1)
        return product_of_experts(logits, expert_valid)


FUSION_HEADS: dict[str, type[FusionHead]] = {
    "avg": LogitAveraging,
    "late": GatedCrossAttentionFusion,
    "mil": ClassifyThenAggregateMIL,
    "poe": ProductOfExperts,
    "poe_joint": ProductOfExpertsJoint,
}


def build_fusion_head(name: str, embed_dim: int, num_classes: int, num_modalities: int, **kwargs: Any) -> FusionHead:
    """Build a fusion head by name.

    Args:
        name: one of ``avg``, ``late``, ``mil``, ``poe``, ``poe_joint`` (reference ``vit_<name>``).
        embed_dim: backbone width C.
        num_classes: K.
        num_modalities: M.
        **kwargs: head-specific options (e.g. ``gate="tanh"`` for ``late``, ``head_heads`` for the PoE heads).

    Returns:
        The head module.
    """
    key = name.removeprefix("vit_")
    if key not in FUSION_HEADS:
        raise ValueError(f"unknown fusion head {name!r}; choose one of {sorted(FUSION_HEADS)}.")
    return FUSION_HEADS[key](embed_dim, num_classes, num_modalities, **kwargs)
