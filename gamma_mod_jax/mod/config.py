"""γ-MoD configuration. Every choice that differs from the official PyTorch code is a
named option whose default is the official behaviour."""

from __future__ import annotations

import dataclasses
from typing import Optional, Tuple

from gamma_mod_jax import token_types as tt

# Which token types are always computed ("masked routing"). The official code forces
# every token after its hard-coded image + system prefix: questions, answers and the
# right padding. The paper's ablation default forces only the question.
ALWAYS_KEEP = {
    "official": (tt.QUESTION, tt.ANSWER, tt.PADDING),
    "question": (tt.QUESTION,),
    "question_answer": (tt.QUESTION, tt.ANSWER),
    "none": (),
    # Mini-Gemini's γ-MoD: past its 2880-position prefix (MGM-HD's image) everything is kept;
    # in its short-sequence branch the tokens without a label (all but answers) are.
    "all_but_image": (tt.SYSTEM, tt.QUESTION, tt.ANSWER, tt.PADDING),
    "all_but_answer": (tt.IMAGE, tt.SYSTEM, tt.QUESTION, tt.PADDING),
}



def check_layer_indices(layers, num_layers: Optional[int] = None, *, source: str = "MoD layers",
                        selection: bool = False) -> Tuple[int, ...]:
    """The one check of 0-based decoder-layer indices (MoD layers from configs, selection
    files, --mod-layers): the indices sorted, or ValueError naming `source` for an index
    that is not an integer, is negative, is listed twice, or (with `num_layers`) is beyond
    the model. `selection` (a γ-MoD layer choice for a model of `num_layers` layers): none
    at all, or every layer (one must stay dense: it numbers decode positions), are errors too."""
    values = list(layers)
    if not all(isinstance(i, int) or (hasattr(i, "__index__") and not isinstance(i, float)) for i in values) \
            or any(isinstance(i, bool) for i in values):
        raise ValueError(f"{source}: layer indices must be integers, got {values!r}")
    values = [int(i) for i in values]
    twice = sorted({i for i in values if values.count(i) > 1})
    if twice:
        raise ValueError(f"{source}: layer(s) {twice} listed twice")
    bad = [i for i in values if i < 0 or (num_layers is not None and i >= num_layers)]
    if bad:
        has = f": the model has {num_layers} layers (0-{num_layers - 1})" if num_layers is not None else \
            " (0-based indices)"
        raise ValueError(f"{source}: layer(s) {bad} do not exist{has}")
    out = tuple(sorted(values))
    if selection and not out:
        raise ValueError(f"{source}: the selection has no γ-MoD layers (every layer stays dense); choose a rule "
                         "that leaves some layers to γ-MoD (--keep-dense N below the number of layers, "
                         "--threshold X) or name them with --mod-layers")
    if selection and len(out) == num_layers:
        raise ValueError(f"{source}: every layer would be a MoD layer; at least one must stay dense")
    return out

@dataclasses.dataclass(frozen=True)
class MoDConfig:
    """Which decoder layers are MoD layers, and how they route.

    routing_ratio is the share of the *routable* tokens (those not always kept) that skip
    each MoD layer; the official code hard-codes 0.5 of its 1024 image + 35 system tokens,
    i.e. 529 skipped tokens, which at the paper's mean length of 1400 tokens is 37.8% of
    the whole sequence: that is the paper's "0.3" / released "0.34" model (skip 37.9%).
    The paper's "0.5" model skips 57.7% of 1400 tokens, a routing_ratio of about 0.76.
    `routing_ratio_for_skip` converts a share of the whole sequence at a given length (the
    paper's measured skip ratios) into this share; configs/train.py's recipes use it.
    """
    layers: Tuple[int, ...] = ()                 # 0-based indices of MoD layers
    routing_ratio: float = 0.5
    always_keep: str = "official"                # see ALWAYS_KEEP
    # Number of routable tokens the capacity is computed from (a trace-time constant, so
    # shapes stay static). None: the model's image tokens + `system_tokens`.
    num_routable_tokens: Optional[int] = None
    system_tokens: int = 35                      # vicuna_v1 system prompt length (official constant)
    # Padding: official keeps it (forced under 'official') and counts it in the routing
    # loss. skip_padding_first=True makes padding the first thing skipped and takes it out
    # of the loss and the skip metrics.
    skip_padding_first: bool = False
    positions: str = "renumbered"                # official: selected tokens get 0..k-1; or 'original'
    router_scales: str = "mlp"                   # official: p scales the MLP branch; 'block' (MoD paper)
    # What multiplies that branch: official 'probability' (p itself, so a freshly adapted
    # dense model has its MLPs halved at p ~ 0.5); 'straight_through' is 1 in the forward
    # pass with p's gradient (a model with every token kept then equals the dense model).
    router_weight: str = "probability"
    aux_loss_coef: float = 0.01                  # routing loss coefficient (router_aux_loss_coef)
    router_init: str = "torch_default"           # LLaVA-HR code: nn.Linear default; or 'xavier_uniform'
    inference: str = "threshold"                 # official: thresholds; or 'capacity' (top-k as in training)
    prefill_threshold: float = 0.005             # prefill keeps tokens with p > this
    decode_threshold: float = 0.5                # decode skips the layer when p < this (per example)
    # Sequences no longer than the routable prefix: LLaVA-HR code 'keep_all' (nothing skips);
    # Mini-Gemini code 'half' (floor(s / 2) skip, k = ceil(s / 2)).
    short_sequence: str = "keep_all"
    # Threshold prefill computes only a static bucket of tokens per MoD layer: the smallest
    # of these fractions of the sequence (rounded up to a multiple of
    # threshold_bucket_multiple) that covers the batch's largest kept count. Exact whatever
    # the buckets (they end at 1.0); more buckets waste less compute and compile longer.
    threshold_buckets: Tuple[float, ...] = (0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 0.875, 1.0)
    threshold_bucket_multiple: int = 64

    def __post_init__(self):
        checks = (("always_keep", self.always_keep, tuple(ALWAYS_KEEP)),
                  ("positions", self.positions, ("renumbered", "original")),
                  ("router_scales", self.router_scales, ("mlp", "block")),
                  ("router_weight", self.router_weight, ("probability", "straight_through")),
                  ("router_init", self.router_init, ("torch_default", "xavier_uniform")),
                  ("inference", self.inference, ("threshold", "capacity")),
                  ("short_sequence", self.short_sequence, ("keep_all", "half")))
        for name, value, allowed in checks:
            if value not in allowed:
                raise ValueError(f"MoDConfig.{name} must be one of {allowed}, got {value!r}")
        if not 0.0 <= self.routing_ratio < 1.0:
            raise ValueError(f"MoDConfig.routing_ratio must be in [0, 1), got {self.routing_ratio}")
        buckets = tuple(self.threshold_buckets)
        if not buckets or any(not 0.0 < f <= 1.0 for f in buckets) or max(buckets) != 1.0:
            raise ValueError(f"MoDConfig.threshold_buckets must be fractions in (0, 1] ending at 1.0, got {buckets}")
        if self.threshold_bucket_multiple < 1:
            raise ValueError(f"MoDConfig.threshold_bucket_multiple must be >= 1, got {self.threshold_bucket_multiple}")
        check_layer_indices(self.layers, source="MoDConfig.layers")

    @property
    def enabled(self) -> bool:
        return bool(self.layers)

    def routable_count(self, num_image_tokens: int) -> int:
        return self.num_routable_tokens if self.num_routable_tokens is not None else num_image_tokens + self.system_tokens

    def num_skipped(self, seq_len: int, num_image_tokens: int) -> int:
        """Tokens skipped per MoD layer at this (static) sequence length. Official:
        k = ceil(S * (1 - 0.5 * 1059 / S)), and nothing is skipped when S <= 1059
        (`short_sequence='half'`: floor(S / 2) are, as in the Mini-Gemini code)."""
        routable = self.routable_count(num_image_tokens)
        if seq_len <= routable:
            return 0 if self.short_sequence == "keep_all" else seq_len // 2
        return int(self.routing_ratio * routable)

    @classmethod
    def from_dict(cls, d) -> "MoDConfig":
        d = dict(d.to_dict() if hasattr(d, "to_dict") else d)
        for key in ("layers", "threshold_buckets"):
            if key in d:
                d[key] = tuple(d[key])
        return cls(**d)


def routing_ratio_for_skip(skip_share: float, seq_len: int, routable: int) -> float:
    """The routing_ratio (share of the `routable` tokens) that skips round(skip_share x
    seq_len) tokens per MoD layer: the paper states its ratios as measured shares of the
    whole sequence (37.9% of 1400 tokens), the official code's constant counts the
    routable prefix. The ratio is put half a token above the count so that
    `int(routing_ratio * routable)` gives it exactly despite float rounding."""
    if not 0.0 <= skip_share < 1.0:
        raise ValueError(f"skip share must be in [0, 1), got {skip_share}")
    skipped = round(skip_share * seq_len)
    if not 0 <= skipped < routable or seq_len <= routable:
        raise ValueError(f"cannot skip {skipped} of {seq_len} tokens from {routable} routable ones "
                         f"(the sequence must be longer than the routable prefix and the skip fit in it)")
    return (skipped + 0.5) / routable
