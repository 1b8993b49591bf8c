"""The output head of a causal LM as plain tensors: what every chunked statistic and loss projects through.

Hidden states are projected tile by tile instead of calling ``model.lm_head`` so that no [N, V] logits tensor ever
exists. ``LMHead`` carries everything the projection needs (weight, bias, logit scale, final softcapping) and the
vocabulary slice to distil over (same-family models whose embedding matrices differ only by padding rows are compared
over the tokenizer's real vocabulary).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class LMHead:
    weight: torch.Tensor  # [V_rows, H]; only the first `vocab_size` rows are used
    bias: torch.Tensor | None = None
    scale: float = 1.0
    softcap: float | None = None
    vocab_size: int | None = None  # None: all rows

    @property
    def vocab(self) -> int:
        return self.weight.shape[0] if self.vocab_size is None else self.vocab_size

    @property
    def sliced_weight(self) -> torch.Tensor:
        return self.weight if self.vocab_size is None else self.weight[: self.vocab_size]

    @property
    def sliced_bias(self) -> torch.Tensor | None:
        if self.bias is None or self.vocab_size is None:
            return self.bias
        return self.bias[: self.vocab_size]

    def raw_logits(self, hidden: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """`hidden` [n, H] @ weight.T + bias over the sliced vocabulary, as `dtype` [n, V] (the matmul itself runs in
        the weight's dtype, as the model's own lm_head would)."""
        weight = self.sliced_weight
        z = (hidden.to(weight.dtype) @ weight.t()).to(dtype)
        bias = self.sliced_bias
        return z if bias is None else z + bias.to(dtype)

    def transform(self, raw: torch.Tensor, temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor | float]:
        """Raw projection -> the logits fed to the softmax (scale, softcapping, temperature), and d logits / d raw:
        a tensor under softcapping, else the constant scale / temperature."""
        y = raw * self.scale if self.scale != 1.0 else raw
        if self.softcap is None:
            return (y / temperature if temperature != 1.0 else y), self.scale / temperature
        th = torch.tanh(y / self.softcap)
        return self.softcap * th / temperature, (1 - th * th) * (self.scale / temperature)

    def logits(self, hidden: torch.Tensor, temperature: float = 1.0,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Logits [n, V] of `hidden` [n, H] (float32 by default), after bias, scale, softcapping and temperature."""
        return self.transform(self.raw_logits(hidden, dtype), temperature)[0]


def logit_scale_of(config) -> float:
    """The multiplier a model applies to its logits before softmax (1.0 for most models)."""
    for name in ("logit_scale", "output_multiplier", "lm_head_multiplier"):
        value = getattr(config, name, None)
        if value is not None:
            return float(value)
    scaling = getattr(config, "logits_scaling", None)
    if scaling is not None:
        return float(scaling) if getattr(config, "model_type", "") == "hyperclovax" else 1.0 / float(scaling)
    return 1.0


def weight_rows(weight: torch.Tensor) -> int:
    """Rows of a (possibly sharded) weight: DeepSpeed ZeRO-3 leaves an empty placeholder with the real shape in
    `ds_shape` (models loaded under zero.Init are partitioned from the start); an FSDP2 DTensor reports the global
    shape itself."""
    shape = getattr(weight, "ds_shape", None)
    return int(shape[0]) if shape is not None else weight.shape[0]


def head_of(model, vocab_size: int | None = None) -> LMHead:
    """The output head of a (possibly PEFT-wrapped) causal LM."""
    module = model.get_output_embeddings()
    config = model.config.get_text_config()
    rows = weight_rows(module.weight)
    return LMHead(
        weight=module.weight,
        bias=getattr(module, "bias", None),
        scale=logit_scale_of(config),
        softcap=getattr(config, "final_logit_softcapping", None),
        vocab_size=None if vocab_size is None or vocab_size == rows else vocab_size,
    )
