"""GPU memory planner for on-policy distillation: will this student/teacher/length/GPU combination fit, and if not,
what is the cheapest change that makes it fit?

    python -m opsd.plan --student qwen3-4b --teacher qwen3-8b --gpu_memory_gb 24 --lora --recommend
    python -m opsd.plan --student /models/Qwen3-1.7B --teacher /models/Qwen3-8B --gpu_memory_gb 80 --json

Python: `estimate(PlanInputs(...)) -> Estimate` (bytes per component, per phase, total) and
`recommend(plan, gpu_memory_gb) -> list[PlanInputs] | None` (fitting variants, cheapest change first).

The model follows what opsd's trainer does in one optimizer step, as phases that never overlap in time; the peak is
the largest phase plus a fragmentation margin and a constant CUDA context (GiB = 2**30 bytes throughout; pass
`--gpu_memory_gb` in GiB, e.g. nvidia-smi's MiB / 1024).

| phase            | resident besides the persistent state                                                        |
|------------------|----------------------------------------------------------------------------------------------|
| generation       | HF generate's KV cache for the per-device rollout batch, prefill transient (+ the gathered   |
|                  | student under ZeRO-3/FSDP)                                                                   |
| teacher          | (offload: the whole teacher backbone), one micro-batch's no-grad teacher forward, the cached |
|                  | teacher hidden states of the rollout batch                                                   |
| statistics       | the cached teacher hidden states, the selector's statistics pass over one micro-batch        |
|                  | (student no-grad forward, chunked [rows, V] buffers)                                         |
| student_forward  | activations saved by the student's forward; without a cache, the teacher's no-grad forward   |
|                  | that follows it                                                                              |
| student_backward | gradients, activations at the backward peak, divergence buffers, the teacher's hidden states  |

Persistent: student weights, LoRA adapters, optimizer states, the resident teacher (or its lm_head when offloaded).
The teacher and statistics phases exist only when opsd's trainer caches the teacher's hidden states for the whole step:
with a selector (`selector_ratio` set; its statistics pass too) or an offloaded teacher.

Formulas (N_gpu = num_gpus; b = bytes of the compute dtype; per-device rollout batch Bg = rollout_batch / N_gpu; micro
batch B; sequence S = prompt_length + response_length):

* Parameters: exact count from the architecture (embeddings, lm_head unless tied, per layer q/k/v/o (+ q/k/v biases
  for Qwen2, + q/k RMSNorm for Qwen3), gate/up/down, two RMSNorms, final norm); tests check it equals the count of
  the transformers model built from the same config.
* Weights: b per parameter; bitsandbytes 8-bit: 1 byte per decoder-linear weight + a float32 scale per output row;
  4-bit NF4: 0.5 byte + a float32 absmax per 64 weights (0.5625 byte; nested quantization ~0.516). Embeddings,
  norms, biases and the lm_head stay in b bytes (bitsandbytes never quantizes them).
* LoRA (PEFT keeps adapters in float32): r * (in + out) per targeted linear; 4 (weights) + 4 (grads) + 8 (AdamW m, v).
* Full fine-tuning, one device or DDP: `master_weights=fp32` (default) loads the model in float32 and trains under bf16
  autocast: 4 (weights) + 4 (grads) + 8 (AdamW) bytes per parameter, plus bf16 copies of the decoder-linear weights
  that autocast keeps during forward (2 bytes each). `master_weights=none` (pure bf16, the model loaded in bf16): 2 + 2
  + 4, but an AdamW step of lr 1e-6 is far below bf16's resolution (2^-8 relative) and mostly rounds away: keep fp32.
  Sharded (ZeRO-3 / FSDP2): 2 (bf16 params) + 2 (grads) + 12 (fp32 master, m, v) = 16 bytes per parameter / N_gpu
  (8 / N_gpu with master_weights=none), plus two gathered decoder layers and both gathered lm_heads in bf16; during
  generation the whole student is gathered (TRL's unwrap_model_for_generation does that under ZeRO-3).
* Teacher: by placement: `gpu` b bytes/param; `8bit`/`4bit` as above; `offload*`: only the lm_head stays resident,
  and the whole backbone (quantized or not) comes to the GPU for the teacher phase (opsd's trainer moves the teacher
  once per step, not layer by layer). Host RAM for the offloaded backbone is reported separately (not GPU memory).
* Activations of one micro-batch, T = B * S tokens, per token and decoder layer (the bytes autograd saves, counted
  exactly on CPU with torch.autograd.graph.saved_tensors_hooks for Llama/Qwen2/Qwen3 layouts in float32 and bf16;
  sdpa attention, so no S^2 term; the tests hold it to 5%):
      a_layer = b_c * (2H + 2A + 2Kv + 4I) + (4 + b_r) * (2H + qk_norm * (A + Kv))
  A = heads * head_dim, Kv = kv_heads * head_dim, I = intermediate size, b_c the matmul dtype, b_r the residual-stream
  dtype (RMSNorm saves a float32 upcast: the 4). LoRA adds b_c * (H + A) + 5 * r * n_targets (PEFT's input casts to
  the float32 adapters and the rank-r intermediates; fitted 4.9 * r per adapter under bf16 autocast). Saved after the
  forward: L * a_layer, or with gradient checkpointing L * b_r * H (the checkpointed layer inputs); at the backward
  peak add one recomputed layer's a_layer (checkpointing only) and a gradient transient b_c * (H + 2I). Once per
  token: (4 + b_r) * H + 4 * head_dim * b_r (final norm, rotary cos/sin). Checked against the exact peak of live
  tensor bytes of a forward/backward (tests/test_plan.py): activations + gradients come out 0.96-1.3x the measurement
  (bf16-autocast LoRA ~1.0; float32 LoRA and full fine-tuning err high because gradients really fill in while
  activations are freed).
* Generation (HF generate): KV cache 2 * L * kv_heads * head_dim * S * Bg * b, plus one more layer (DynamicCache grows
  by concatenation); prefill transient (Bg * prompt tokens) * b * (3H + 2A + 2Kv + 3I) + last-token logits in fp32.
  vLLM is not modelled.
* No-grad forward transient (teacher pass, statistics pass, prefill), T tokens: T * b * (3H + 2A + 2Kv + 3I), plus its
  output hidden states T * H * b (within 2% of the measured allocation peak on CPU).
* Cached teacher hidden states (selector active or teacher offloaded): Bg * S * H_teacher * b. TRL's backbone call
  returns hidden states for the whole sequence and the cache keeps that storage (a view of the completion part).
* Divergence (gradient pass) over the kept rows n = ceil(rho * B * response_length) (rho = 1 without selector):
  `trl` backend (CUDA, Triton): 2 float32 tiles [min(n, 4096), min(V, 32768)]; `chunked` backend: 9 float32
  [min(n, chunk_size), V] buffers (measured 8.7 on CPU by exact allocation tracking); plus the kept hidden rows and
  their float32 gradient n * H * (b + 4), plus a float32 lm_head gradient V * H * 4 when the lm_head trains (full FT).
* Statistics pass (selector active): 9 float32 [min(n_mb, chunk_size), V] buffers (tip_ext.stats measured 8.9), one
  no-grad student forward of a micro-batch, the student's hidden rows.
* CUDA context, cuBLAS workspace, NCCL buffers: `overhead_gb` (1 GiB) outside torch's allocator; fragmentation of the
  caching allocator: `fragmentation` (10%) of the peak allocated bytes.

Known omissions, all small next to the margin: bitsandbytes dequantization transients (one weight matrix), the
optimizer's step counters, RNG state, the tokenizer and data loader (host memory). Process RSS on CPU is not used for
calibration: allocator caching and library buffers make it noisy; tests count allocations exactly instead
(opsd.gpu_check.LiveTensorBytes). CUDA numbers come from `bash run_scripts/gpu_check.sh` on a GPU machine.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
import os
import sys
from dataclasses import dataclass, field

GiB = 2**30

# ----------------------------------------------------------------------------------------------------------------
# Architectures


@dataclass(frozen=True)
class Architecture:
    """The numbers of a decoder-only transformer that decide its memory (Llama/Qwen2/Qwen3 layout)."""

    name: str
    family: str  # "llama" | "qwen2" | "qwen3": decides biases (qwen2 q/k/v) and q/k RMSNorm (qwen3)
    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    tie_word_embeddings: bool
    attention_bias: bool = False
    qk_norm: bool = False

    @property
    def attn_dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    def linears(self) -> dict[str, tuple[int, int, bool]]:
        """Decoder-layer linear modules: name -> (in_features, out_features, has_bias)."""
        h, a, kv, i, bias = self.hidden_size, self.attn_dim, self.kv_dim, self.intermediate_size, self.attention_bias
        return {"q_proj": (h, a, bias), "k_proj": (h, kv, bias), "v_proj": (h, kv, bias), "o_proj": (a, h, False),
                "gate_proj": (h, i, False), "up_proj": (h, i, False), "down_proj": (i, h, False)}

    def layer_linear_weights(self) -> int:
        return sum(fin * fout for fin, fout, _ in self.linears().values())

    def layer_other_params(self) -> int:
        """Biases and norms of one decoder layer (never quantized)."""
        biases = sum(fout for _, fout, bias in self.linears().values() if bias)
        norms = 2 * self.hidden_size + (2 * self.head_dim if self.qk_norm else 0)
        return biases + norms

    def embedding_params(self) -> int:
        return self.vocab_size * self.hidden_size

    def lm_head_params(self) -> int:
        """lm_head rows that are not the embedding matrix (0 when tied)."""
        return 0 if self.tie_word_embeddings else self.vocab_size * self.hidden_size

    def num_params(self) -> int:
        per_layer = self.layer_linear_weights() + self.layer_other_params()
        return self.embedding_params() + self.lm_head_params() + self.num_layers * per_layer + self.hidden_size

    def linear_weight_params(self) -> int:
        """Parameters bitsandbytes quantizes (decoder-layer linear weights)."""
        return self.num_layers * self.layer_linear_weights()

    def lora_params(self, rank: int, targets) -> int:
        targets = resolve_lora_targets(targets)
        return self.num_layers * sum(rank * (fin + fout) for name, (fin, fout, _) in self.linears().items()
                                     if name in targets)

    def hf_config(self, **overrides):
        """A transformers config with these numbers (Qwen2Config / Qwen3Config / LlamaConfig)."""
        from transformers import LlamaConfig, Qwen2Config, Qwen3Config

        kwargs = dict(vocab_size=self.vocab_size, hidden_size=self.hidden_size,
                      intermediate_size=self.intermediate_size, num_hidden_layers=self.num_layers,
                      num_attention_heads=self.num_heads, num_key_value_heads=self.num_kv_heads,
                      tie_word_embeddings=self.tie_word_embeddings)
        if self.family == "qwen2":
            if self.head_dim != self.hidden_size // self.num_heads:
                raise ValueError("Qwen2 derives head_dim = hidden_size / num_heads.")
            cls = Qwen2Config
        elif self.family == "qwen3":
            cls = Qwen3Config
            kwargs.update(head_dim=self.head_dim, attention_bias=self.attention_bias)
        elif self.family == "llama":
            cls = LlamaConfig
            kwargs.update(head_dim=self.head_dim, attention_bias=self.attention_bias)
        else:
            raise ValueError(f"No transformers config for family {self.family!r}.")
        kwargs.update(overrides)
        return cls(**kwargs)

    @classmethod
    def from_config(cls, config, name: str | None = None) -> Architecture:
        """From a transformers config object or a config.json dict (Llama/Qwen2/Qwen3-style models)."""
        get = (lambda k, d=None: config.get(k, d)) if isinstance(config, dict) else (
            lambda k, d=None: getattr(config, k, d))
        model_type = get("model_type") or ""
        family = "qwen3" if model_type.startswith("qwen3") else "qwen2" if model_type.startswith("qwen2") else "llama"
        heads = get("num_attention_heads")
        hidden = get("hidden_size")
        head_dim = get("head_dim") or hidden // heads
        bias = get("attention_bias")
        return cls(name=name or get("_name_or_path") or model_type or "model", family=family,
                   num_layers=get("num_hidden_layers"), hidden_size=hidden,
                   intermediate_size=get("intermediate_size"), num_heads=heads,
                   num_kv_heads=get("num_key_value_heads") or heads, head_dim=head_dim,
                   vocab_size=get("vocab_size"), tie_word_embeddings=bool(get("tie_word_embeddings", False)),
                   attention_bias=(family == "qwen2") if bias is None else bool(bias), qk_norm=family == "qwen3")


# From the published config.json of each model on the Hugging Face Hub (Qwen/Qwen3-*, Qwen/Qwen2.5-*,
# meta-llama/Llama-3.1-8B, meta-llama/Llama-3.3-70B-Instruct), written from memory of those files; a local directory
# with config.json always takes precedence. tests/test_plan.py checks the resulting totals against the published
# parameter counts (e.g. Qwen3-8B 8.19B, Llama-3.3-70B 70.6B).
ARCHITECTURES: dict[str, Architecture] = {a.name: a for a in (
    Architecture("qwen3-1.7b", "qwen3", 28, 2048, 6144, 16, 8, 128, 151936, True, qk_norm=True),
    Architecture("qwen3-4b", "qwen3", 36, 2560, 9728, 32, 8, 128, 151936, True, qk_norm=True),
    Architecture("qwen3-8b", "qwen3", 36, 4096, 12288, 32, 8, 128, 151936, False, qk_norm=True),
    Architecture("qwen3-14b", "qwen3", 40, 5120, 17408, 40, 8, 128, 151936, False, qk_norm=True),
    Architecture("qwen2.5-1.5b", "qwen2", 28, 1536, 8960, 12, 2, 128, 151936, True, attention_bias=True),
    Architecture("qwen2.5-14b", "qwen2", 48, 5120, 13824, 40, 8, 128, 152064, False, attention_bias=True),
    Architecture("llama-3.1-8b", "llama", 32, 4096, 14336, 32, 8, 128, 128256, False),
    Architecture("llama-3.3-70b", "llama", 80, 8192, 28672, 64, 8, 128, 128256, False),
)}

LORA_ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def resolve_lora_targets(targets) -> tuple[str, ...]:
    """'all-linear' (PEFT's name; the lm_head is never a target here) or an iterable of module names."""
    if targets is None or targets == "all-linear" or list(targets) == ["all-linear"]:
        return LORA_ALL
    if isinstance(targets, str):
        targets = [t for t in targets.replace(",", " ").split() if t]
    unknown = sorted(set(targets) - set(LORA_ALL))
    if unknown:
        raise ValueError(f"Unknown LoRA target(s) {unknown}; the planner knows {list(LORA_ALL)} or 'all-linear'.")
    return tuple(t for t in LORA_ALL if t in targets)


def architecture(spec) -> Architecture:
    """An Architecture from itself, a preset name (see ARCHITECTURES) or a local model directory with config.json."""
    if isinstance(spec, Architecture):
        return spec
    key = str(spec).lower()
    if key in ARCHITECTURES:
        return ARCHITECTURES[key]
    path = os.path.join(str(spec), "config.json")
    if os.path.isfile(path):
        with open(path) as f:
            return Architecture.from_config(json.load(f), name=os.path.basename(os.path.normpath(str(spec))))
    raise ValueError(f"Unknown model {spec!r}: pass a local directory with config.json or one of "
                     f"{sorted(ARCHITECTURES)}.")


# ----------------------------------------------------------------------------------------------------------------
# Inputs and estimate

TEACHER_PLACEMENTS = ("gpu", "8bit", "4bit", "offload", "offload-8bit", "offload-4bit")
QUANTS = ("none", "8bit", "4bit")
SHARDINGS = ("none", "zero3", "fsdp")
DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
# Calibrated constants (see module docstring and tests/test_plan.py).
LORA_BYTES_PER_RANK = 5          # saved bytes per token, layer, adapter and unit of rank
CHUNKED_LOSS_BUFFERS = 9         # float32 [rows, V] buffers of opsd's token-chunked divergence (measured 8.7)
STATS_BUFFERS = 9                # float32 [rows, V] buffers of tip_ext's statistics pass (measured 8.9)
TRL_TILE_ROWS, TRL_TILE_COLS, TRL_TILES = 4096, 32768, 2
ZERO3_GATHERED_LAYERS = 2        # current + prefetched layer


@dataclass
class PlanInputs:
    """One training configuration to estimate. Lengths are tokens; `rollout_batch` is the generation batch of one
    optimizer step over all GPUs (TRAIN_BATCH_SIZE), `micro_batch` the per-device micro-batch
    (PPO_MICRO_BATCH_SIZE_PER_GPU)."""

    student: str | Architecture = "qwen3-4b"
    teacher: str | Architecture = "qwen3-8b"
    gpu_memory_gb: float = 80.0
    num_gpus: int = 1
    prompt_length: int = 1024
    response_length: int = 8192
    micro_batch: int = 1
    rollout_batch: int = 16
    rollout_n: int = 1  # the run scripts' ROLLOUT_N default (the papers use 16: --rollout_n 16)
    lora: bool = True
    lora_rank: int = 64
    lora_targets: tuple[str, ...] | str = "all-linear"
    student_quant: str = "none"
    teacher_placement: str = "gpu"
    gradient_checkpointing: bool = True
    dtype: str = "bf16"
    master_weights: str = "fp32"  # full fine-tuning only: "fp32" (mixed precision) or "none" (pure dtype)
    optimizer: str = "adamw"
    selector_ratio: float | None = None  # None: no selector (full-token baseline, no statistics pass)
    chunk_size: int = 512
    divergence_backend: str = "trl"  # what opsd's "auto" picks on CUDA; "chunked" elsewhere
    sharding: str = "none"
    bnb_nested_quant: bool = False
    overhead_gb: float = 1.0
    fragmentation: float = 0.10

    def __post_init__(self):
        for name, value, allowed in (("student_quant", self.student_quant, QUANTS),
                                     ("teacher_placement", self.teacher_placement, TEACHER_PLACEMENTS),
                                     ("sharding", self.sharding, SHARDINGS), ("dtype", self.dtype, tuple(DTYPE_BYTES)),
                                     ("master_weights", self.master_weights, ("fp32", "none")),
                                     ("divergence_backend", self.divergence_backend, ("trl", "chunked")),
                                     ("optimizer", self.optimizer, ("adamw",))):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {value!r}.")
        if self.selector_ratio is not None and not 0.0 < self.selector_ratio <= 1.0:
            raise ValueError(f"selector_ratio must be in (0, 1] or None, got {self.selector_ratio}.")
        if self.student_quant != "none" and not self.lora:
            raise ValueError("A quantized student can only be trained with LoRA (QLoRA); set lora=True.")
        if self.teacher_placement.startswith("offload") and self.sharding != "none":
            raise ValueError("Teacher offload is for one process or DDP; with ZeRO-3/FSDP the teacher is sharded.")
        if self.sharding != "none" and self.student_quant != "none":
            raise ValueError("bitsandbytes students are not sharded by ZeRO-3/FSDP here; use sharding='none'.")
        for name in ("num_gpus", "prompt_length", "response_length", "micro_batch", "rollout_batch", "rollout_n",
                     "chunk_size", "lora_rank"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}.")
        if self.rollout_batch % (self.micro_batch * self.num_gpus):
            raise ValueError(f"rollout_batch ({self.rollout_batch}) must be a multiple of micro_batch x num_gpus "
                             f"({self.micro_batch * self.num_gpus}).")
        if (self.rollout_batch // self.num_gpus) % self.rollout_n:
            raise ValueError(f"rollout_n ({self.rollout_n}) must divide the per-device rollout batch "
                             f"({self.rollout_batch // self.num_gpus}).")

    @property
    def student_arch(self) -> Architecture:
        return architecture(self.student)

    @property
    def teacher_arch(self) -> Architecture:
        return architecture(self.teacher)

    def replace(self, **changes) -> PlanInputs:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        for key in ("student", "teacher"):
            value = getattr(self, key)
            out[key] = value.name if isinstance(value, Architecture) else value
        if not isinstance(self.lora_targets, str):
            out["lora_targets"] = list(self.lora_targets)
        return out


@dataclass
class Estimate:
    """Bytes per component, the components resident in each phase, the peak and the verdict."""

    components: dict[str, int]
    phases: dict[str, dict[str, int]]  # phase -> {component: bytes}
    peak_phase: str
    peak_allocated: int
    total: int
    gpu_memory: int
    host_memory: int  # host RAM the offloaded teacher needs (not part of `total`)
    notes: list[str] = field(default_factory=list)

    @property
    def fits(self) -> bool:
        return self.total <= self.gpu_memory

    def to_dict(self) -> dict:
        return {"components_gib": {k: round(v / GiB, 3) for k, v in self.components.items()},
                "phases_gib": {p: round(sum(c.values()) / GiB, 3) for p, c in self.phases.items()},
                "peak_phase": self.peak_phase, "peak_allocated_gib": round(self.peak_allocated / GiB, 3),
                "total_gib": round(self.total / GiB, 3), "gpu_memory_gib": round(self.gpu_memory / GiB, 3),
                "host_memory_gib": round(self.host_memory / GiB, 3), "fits": self.fits, "notes": self.notes,
                "components_bytes": dict(self.components)}


def weight_bytes(arch: Architecture, quant: str, b: int, nested: bool = False) -> int:
    """Bytes of a model's weights in dtype size b, or bitsandbytes 8-bit / 4-bit NF4 decoder linears."""
    total = arch.num_params()
    linear = arch.linear_weight_params()
    rest = total - linear
    if quant == "none":
        return total * b
    if quant == "8bit":
        rows = arch.num_layers * sum(fout for _, fout, _ in arch.linears().values())
        return linear + 4 * rows + rest * b
    if quant == "4bit":
        blocks = linear // 64
        absmax = blocks * (1 + 4 / 256) if nested else blocks * 4
        return int(linear // 2 + absmax + rest * b)
    raise ValueError(f"Unknown quantization {quant!r}.")


def forward_transient_bytes(arch: Architecture, tokens: int, b: int) -> int:
    """Peak live bytes inside a no-grad forward (one layer at a time), not counting its output hidden states.
    Calibrated on CPU: within 2% of the exact allocation peak of Qwen3/Llama-layout models."""
    h, a, kv, i = arch.hidden_size, arch.attn_dim, arch.kv_dim, arch.intermediate_size
    return tokens * b * (3 * h + 2 * a + 2 * kv + 3 * i)


def activation_bytes_per_token_layer(arch: Architecture, b_c: int, b_r: int, lora_rank: int = 0,
                                     lora_targets=()) -> int:
    """Bytes autograd saves per token and decoder layer (exact for full fine-tuning on CPU, see module docstring)."""
    h, a, kv, i = arch.hidden_size, arch.attn_dim, arch.kv_dim, arch.intermediate_size
    per = b_c * (2 * h + 2 * a + 2 * kv + 4 * i) + (4 + b_r) * (2 * h + (a + kv if arch.qk_norm else 0))
    if lora_rank:
        per += b_c * (h + a) + LORA_BYTES_PER_RANK * lora_rank * len(resolve_lora_targets(lora_targets))
    return per


def activation_bytes(arch: Architecture, tokens: int, b_c: int, b_r: int, checkpointing: bool, lora_rank: int = 0,
                     lora_targets=(), stage: str = "backward") -> int:
    """Activations of one micro-batch of `tokens` tokens: what the forward leaves saved (`stage="forward"`) or the
    peak during backward (`"backward"`: with checkpointing, one layer recomputed, plus the gradient transient)."""
    h, i = arch.hidden_size, arch.intermediate_size
    per_layer = activation_bytes_per_token_layer(arch, b_c, b_r, lora_rank, lora_targets)
    once = (4 + b_r) * h + 4 * arch.head_dim * b_r  # final norm, rotary cos/sin
    if checkpointing:
        saved = arch.num_layers * b_r * h + once
        return tokens * (saved + (per_layer + b_c * (h + 2 * i) if stage == "backward" else 0))
    saved = arch.num_layers * per_layer + once
    return tokens * (saved + (b_c * (h + 2 * i) if stage == "backward" else 0))


def kv_cache_bytes(arch: Architecture, sequences: int, length: int, b: int, growth_layer: bool = True) -> int:
    """HF generate's KV cache of `sequences` x `length` tokens; `growth_layer` adds the one layer that DynamicCache
    holds twice while it concatenates the next token."""
    return 2 * (arch.num_layers + int(growth_layer)) * arch.kv_dim * length * sequences * b


def estimate(plan: PlanInputs) -> Estimate:
    """Peak GPU memory of one optimizer step of `plan` (see the module docstring for every formula)."""
    s, t = plan.student_arch, plan.teacher_arch
    b = DTYPE_BYTES[plan.dtype]
    n = plan.num_gpus
    sharded = plan.sharding != "none"
    shard = (lambda x: math.ceil(x / n)) if sharded else (lambda x: x)
    rollout_dev = plan.rollout_batch // n
    seq = plan.prompt_length + plan.response_length
    mb_tokens = plan.micro_batch * seq
    vocab = min(s.vocab_size, t.vocab_size)
    selector = plan.selector_ratio is not None
    notes: list[str] = []
    c: dict[str, int] = {}
    p_s = s.num_params()

    # --- student weights, trainable state
    full_ft = not plan.lora
    if full_ft:
        if sharded:
            per_param = (2, 2, 12) if plan.master_weights == "fp32" and plan.dtype != "fp32" else (b, b, 2 * b)
            c["student_weights"] = shard(p_s * per_param[0])
            c["gradients"] = shard(p_s * per_param[1])
            c["optimizer_states"] = shard(p_s * per_param[2])
            b_r = b
        elif plan.master_weights == "fp32" or plan.dtype == "fp32":
            c["student_weights"] = p_s * 4
            c["gradients"] = p_s * 4
            c["optimizer_states"] = p_s * 8
            if b < 4:
                c["autocast_weight_copies"] = s.linear_weight_params() * b
            b_r = 4
        else:
            c["student_weights"] = p_s * b
            c["gradients"] = p_s * b
            c["optimizer_states"] = p_s * 2 * b
            b_r = b
            notes.append("pure low-precision full fine-tuning: AdamW updates at lr ~1e-6 mostly round away in bf16.")
        trainable = p_s
    else:
        c["student_weights"] = shard(weight_bytes(s, plan.student_quant, b, plan.bnb_nested_quant))
        trainable = s.lora_params(plan.lora_rank, plan.lora_targets)
        c["lora_params"] = shard(trainable * 4)
        c["gradients"] = shard(trainable * 4)
        c["optimizer_states"] = shard(trainable * 8)
        b_r = b
    b_c = b

    # --- teacher
    offload = plan.teacher_placement.startswith("offload")
    t_quant = plan.teacher_placement.split("-")[-1] if plan.teacher_placement not in ("gpu", "offload") else "none"
    t_bytes = weight_bytes(t, t_quant, b, plan.bnb_nested_quant)
    t_head = t.vocab_size * t.hidden_size * b
    host = 0
    if offload:
        c["teacher_lm_head"] = t_head
        c["teacher_weights_during_pass"] = t_bytes - t_head
        host = t_bytes - t_head
    else:
        c["teacher_weights"] = shard(t_bytes)

    if sharded:
        gathered = ZERO3_GATHERED_LAYERS * 2 * (s.layer_linear_weights() + s.layer_other_params()
                                                + t.layer_linear_weights() + t.layer_other_params())
        c["sharded_gathered_params"] = gathered + 2 * vocab * (s.hidden_size + t.hidden_size)
        c["generation_gathered_student"] = p_s * 2

    # --- generation
    c["kv_cache"] = kv_cache_bytes(s, rollout_dev, seq, b)
    prefill = rollout_dev * plan.prompt_length
    c["generation_transient"] = (forward_transient_bytes(s, prefill, b) + prefill * s.hidden_size * b
                                 + rollout_dev * s.vocab_size * 4 * 2)

    # --- teacher pass (hidden states cached for the step) and statistics pass
    cache = selector or offload
    c["teacher_forward_transient"] = forward_transient_bytes(t, mb_tokens, b)
    if cache:
        c["cached_teacher_hidden"] = rollout_dev * seq * t.hidden_size * b
    else:
        c["teacher_hidden"] = mb_tokens * t.hidden_size * b
    mb_rows = plan.micro_batch * plan.response_length
    if selector:
        c["statistics_pass"] = (max(STATS_BUFFERS * min(mb_rows, plan.chunk_size) * vocab * 4,
                                    forward_transient_bytes(s, mb_tokens, b))
                                + mb_tokens * s.hidden_size * b + mb_rows * (s.hidden_size + t.hidden_size) * b)

    # --- student phase: forward (then, without a cache, the teacher's forward), loss and backward
    lora_rank = plan.lora_rank if plan.lora else 0
    c["activations_forward"] = activation_bytes(s, mb_tokens, b_c, b_r, plan.gradient_checkpointing, lora_rank,
                                                plan.lora_targets, stage="forward")
    c["activations_backward"] = activation_bytes(s, mb_tokens, b_c, b_r, plan.gradient_checkpointing, lora_rank,
                                                 plan.lora_targets, stage="backward")
    kept = math.ceil((plan.selector_ratio if selector else 1.0) * mb_rows)
    if plan.divergence_backend == "trl":
        tiles = TRL_TILES * min(kept, TRL_TILE_ROWS) * min(vocab, TRL_TILE_COLS) * 4
    else:
        tiles = CHUNKED_LOSS_BUFFERS * min(kept, plan.chunk_size) * vocab * 4
    c["loss_buffers"] = tiles + kept * s.hidden_size * (b + 4) + kept * t.hidden_size * b + (
        vocab * s.hidden_size * 4 if full_ft else 0)

    persistent = [k for k in ("student_weights", "lora_params", "optimizer_states", "teacher_weights",
                              "teacher_lm_head") if k in c]
    gathered = ["sharded_gathered_params"] if sharded else []
    autocast = ["autocast_weight_copies"] if "autocast_weight_copies" in c else []
    teacher_states = ["cached_teacher_hidden"] if cache else ["teacher_hidden"]
    phases: dict[str, list[str]] = {
        "generation": persistent + ["kv_cache", "generation_transient"]
        + (["generation_gathered_student"] if sharded else []),
    }
    if cache:
        phases["teacher"] = (persistent + (["teacher_weights_during_pass"] if offload else [])
                             + ["teacher_forward_transient", "cached_teacher_hidden"] + gathered)
    if selector:
        phases["statistics"] = persistent + ["cached_teacher_hidden", "statistics_pass"] + gathered
    phases["student_forward"] = (persistent + ["activations_forward"] + autocast + teacher_states
                                 + ([] if cache else ["teacher_forward_transient"]) + gathered)
    phases["student_backward"] = (persistent + ["gradients", "activations_backward", "loss_buffers"] + autocast
                                  + teacher_states + gathered)
    phase_bytes = {p: {k: c[k] for k in ks} for p, ks in phases.items()}
    peak_phase = max(phase_bytes, key=lambda p: sum(phase_bytes[p].values()))
    peak = sum(phase_bytes[peak_phase].values())
    c["fragmentation_margin"] = int(plan.fragmentation * peak)
    c["cuda_context"] = int(plan.overhead_gb * GiB)
    total = peak + c["fragmentation_margin"] + c["cuda_context"]
    if offload:
        notes.append(f"teacher offload needs {host / GiB:.1f} GiB of host RAM per process for the teacher backbone.")
    if plan.selector_ratio is not None and plan.selector_ratio < 1:
        notes.append("a selector cuts lm_head/divergence compute to the kept rows; memory barely changes because no "
                     "[N, V] logits are ever materialized (the statistics pass and cached teacher states add some).")
    return Estimate(components=c, phases=phase_bytes, peak_phase=peak_phase, peak_allocated=peak, total=total,
                    gpu_memory=int(plan.gpu_memory_gb * GiB), host_memory=host, notes=notes)


# ----------------------------------------------------------------------------------------------------------------
# Recommendation

TEACHER_LADDER = {"gpu": 0, "8bit": 3, "4bit": 5, "offload": 6, "offload-8bit": 8, "offload-4bit": 9}
RESPONSE_FLOOR = 1024
RESPONSE_CUT_COST = 25  # per halving: more than every other change together, so it is the last resort


def _knob_levels(plan: PlanInputs, allow_response_cut: bool) -> list[list[tuple[dict, float, str]]]:
    """For each knob, (changes, cost, description) levels, the unchanged level first. Costs say how much a change
    alters the recipe or the speed: checkpointing and smaller micro-batches keep the math, LoRA / quantization change
    the optimization or the teacher, a shorter response changes the task (last resort)."""
    knobs = []
    knobs.append([({}, 0, "")] + ([({"gradient_checkpointing": True}, 1, "gradient checkpointing on")]
                                  if not plan.gradient_checkpointing else []))
    micro = [({}, 0, "")]
    m, cost = plan.micro_batch, 0.0
    while m > 1:
        m //= 2
        cost += 0.5
        micro.append(({"micro_batch": m}, cost, f"micro_batch {m}"))
    knobs.append(micro)
    knobs.append([({}, 0, "")] + ([({"lora": True}, 4, "LoRA instead of full fine-tuning")] if not plan.lora else []))
    start = TEACHER_LADDER[plan.teacher_placement]
    knobs.append([({}, 0, "")] + [({"teacher_placement": p}, c - start, f"teacher {p}")
                                  for p, c in TEACHER_LADDER.items() if c > start and (plan.sharding == "none"
                                                                                       or not p.startswith("offload"))])
    squant = [({}, 0, "")]
    if plan.student_quant == "none" and plan.sharding == "none":
        squant += [({"student_quant": "8bit"}, 6, "student 8-bit + LoRA"),
                   ({"student_quant": "4bit"}, 7, "student 4-bit + LoRA (QLoRA)")]
    elif plan.student_quant == "8bit":
        squant += [({"student_quant": "4bit"}, 1, "student 4-bit + LoRA (QLoRA)")]
    knobs.append(squant)
    resp = [({}, 0, "")]
    if allow_response_cut:
        r, cost = plan.response_length, 0
        while r // 2 >= RESPONSE_FLOOR:
            r //= 2
            cost += RESPONSE_CUT_COST
            resp.append(({"response_length": r}, cost, f"response_length {r} (shorter rollouts: changes the task)"))
    knobs.append(resp)
    return knobs


def candidates(plan: PlanInputs, allow_response_cut: bool = True) -> list[tuple[float, PlanInputs, list[str]]]:
    """Every combination of knob levels as (cost, plan, changes), cheapest first."""
    out = []
    for combo in itertools.product(*_knob_levels(plan, allow_response_cut)):
        changes: dict = {}
        for level in combo:
            changes.update(level[0])
        if changes.get("student_quant") and not (changes.get("lora") or plan.lora):
            continue
        try:
            variant = plan.replace(**changes)
        except ValueError:
            continue
        cost = sum(level[1] for level in combo)
        out.append((cost, variant, [level[2] for level in combo if level[2]]))
    out.sort(key=lambda x: x[0])
    return out


def recommend(plan: PlanInputs, gpu_memory_gb: float | None = None,
              allow_response_cut: bool = True) -> list[PlanInputs] | None:
    """Variants of `plan` that fit `gpu_memory_gb` (default: plan's), cheapest change first (ties: smaller total);
    the first one is the recommendation. `plan` itself comes first when it fits. None when nothing fits."""
    if gpu_memory_gb is not None:
        plan = plan.replace(gpu_memory_gb=gpu_memory_gb)
    scored = [(cost, estimate(v).total, v) for cost, v, _ in candidates(plan, allow_response_cut)]
    limit = int(plan.gpu_memory_gb * GiB)
    fitting = sorted([x for x in scored if x[1] <= limit], key=lambda x: (x[0], x[1]))
    return [v for _, _, v in fitting] or None


def smallest(plan: PlanInputs, allow_response_cut: bool = True) -> tuple[PlanInputs, Estimate]:
    """The variant with the smallest total among every knob combination (for 'nothing fits' messages)."""
    best = min((v for _, v, _ in candidates(plan, allow_response_cut)), key=lambda v: estimate(v).total)
    return best, estimate(best)


def describe_changes(base: PlanInputs, variant: PlanInputs) -> list[str]:
    diff = []
    for f in dataclasses.fields(PlanInputs):
        old, new = getattr(base, f.name), getattr(variant, f.name)
        if old != new:
            diff.append(f"{f.name}: {old} -> {new}")
    return diff


# ----------------------------------------------------------------------------------------------------------------
# Report and CLI

PHASE_ORDER = ("generation", "teacher", "statistics", "student_forward", "student_backward")


def format_table(plan: PlanInputs, est: Estimate) -> str:
    s, t = plan.student_arch, plan.teacher_arch
    lines = [f"student {s.name} ({s.num_params() / 1e9:.2f}B params), teacher {t.name} ({t.num_params() / 1e9:.2f}B)"
             f", {plan.num_gpus} x {plan.gpu_memory_gb:g} GiB, sharding {plan.sharding}",
             f"prompt {plan.prompt_length} + response {plan.response_length}, micro_batch {plan.micro_batch}, "
             f"rollout_batch {plan.rollout_batch} (n={plan.rollout_n}), "
             + (f"LoRA r={plan.lora_rank}" if plan.lora else f"full FT (master {plan.master_weights})")
             + f", student {plan.student_quant}, teacher {plan.teacher_placement}, "
             f"checkpointing {'on' if plan.gradient_checkpointing else 'off'}, "
             f"selector {'none' if plan.selector_ratio is None else plan.selector_ratio}", ""]
    phases = [p for p in PHASE_ORDER if p in est.phases]
    header = f"{'component (GiB)':<30}" + "".join(f"{p:>17}" for p in phases)
    lines += [header, "-" * len(header)]
    for name, value in est.components.items():
        if name in ("fragmentation_margin", "cuda_context"):
            continue
        cells = "".join(f"{est.phases[p][name] / GiB:>17.2f}" if name in est.phases[p] else f"{'':>17}"
                        for p in phases)
        lines.append(f"{name:<30}{cells}")
    lines.append("-" * len(header))
    lines.append(f"{'phase total':<30}" + "".join(f"{sum(est.phases[p].values()) / GiB:>17.2f}" for p in phases))
    frag = est.components["fragmentation_margin"]
    lines += ["",
              f"{f'peak allocated ({est.peak_phase})':<36}{est.peak_allocated / GiB:8.2f} GiB",
              f"{f'+ fragmentation {plan.fragmentation:.0%}':<36}{frag / GiB:8.2f} GiB",
              f"{'+ CUDA context/overhead':<36}{est.components['cuda_context'] / GiB:8.2f} GiB",
              f"{'= total':<36}{est.total / GiB:8.2f} GiB of {plan.gpu_memory_gb:g} GiB per GPU: "
              + ("FITS" if est.fits else "DOES NOT FIT")]
    if est.host_memory:
        lines.append(f"host RAM for the offloaded teacher: {est.host_memory / GiB:.1f} GiB")
    lines += [f"note: {n}" for n in est.notes]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m opsd.plan", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    d = PlanInputs()
    p.add_argument("--student", default=d.student, help=f"local dir with config.json or one of {sorted(ARCHITECTURES)}")
    p.add_argument("--teacher", default=d.teacher, help="same as --student")
    p.add_argument("--gpu_memory_gb", type=float, default=d.gpu_memory_gb, help="per GPU, GiB")
    p.add_argument("--num_gpus", type=int, default=d.num_gpus)
    p.add_argument("--prompt_length", type=int, default=d.prompt_length)
    p.add_argument("--response_length", type=int, default=d.response_length)
    p.add_argument("--micro_batch", type=int, default=d.micro_batch, help="per device")
    p.add_argument("--rollout_batch", type=int, default=d.rollout_batch, help="generation batch per step, all GPUs")
    p.add_argument("--rollout_n", type=int, default=d.rollout_n)
    ft = p.add_mutually_exclusive_group()
    ft.add_argument("--lora", dest="lora", action="store_true", default=d.lora, help="LoRA student (default)")
    ft.add_argument("--full", dest="lora", action="store_false", help="full fine-tuning")
    p.add_argument("--lora_rank", type=int, default=d.lora_rank)
    p.add_argument("--lora_targets", default="all-linear", help="'all-linear' or module names, comma separated")
    p.add_argument("--student_quant", choices=QUANTS, default=d.student_quant)
    p.add_argument("--teacher_placement", choices=TEACHER_PLACEMENTS, default=d.teacher_placement)
    gc = p.add_mutually_exclusive_group()
    gc.add_argument("--gradient_checkpointing", dest="gradient_checkpointing", action="store_true",
                    default=d.gradient_checkpointing)
    gc.add_argument("--no_gradient_checkpointing", dest="gradient_checkpointing", action="store_false")
    p.add_argument("--dtype", choices=tuple(DTYPE_BYTES), default=d.dtype)
    p.add_argument("--master_weights", choices=("fp32", "none"), default=d.master_weights)
    p.add_argument("--optimizer", choices=("adamw",), default=d.optimizer)
    p.add_argument("--selector", type=float, default=None, dest="selector_ratio",
                   help="retention ratio rho of an active selector (omit: no selector, full-token baseline)")
    p.add_argument("--chunk_size", type=int, default=d.chunk_size)
    p.add_argument("--divergence_backend", choices=("trl", "chunked"), default=d.divergence_backend)
    sh = p.add_mutually_exclusive_group()
    sh.add_argument("--zero3", dest="sharding", action="store_const", const="zero3", default="none")
    sh.add_argument("--fsdp", dest="sharding", action="store_const", const="fsdp")
    p.add_argument("--overhead_gb", type=float, default=d.overhead_gb)
    p.add_argument("--fragmentation", type=float, default=d.fragmentation)
    p.add_argument("--recommend", action="store_true", help="search for the cheapest change that fits "
                   "(automatic when the configuration does not fit)")
    p.add_argument("--no_response_cut", action="store_true", help="never recommend a shorter response_length")
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")
    return p


def plan_from_args(args: argparse.Namespace) -> PlanInputs:
    names = {f.name for f in dataclasses.fields(PlanInputs)}
    values = {k: v for k, v in vars(args).items() if k in names}
    return PlanInputs(**values)


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    try:
        plan = plan_from_args(args)
        est = estimate(plan)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    result: dict = {"plan": plan.to_dict(), "estimate": est.to_dict()}
    text = [format_table(plan, est)]
    if args.recommend or not est.fits:
        fits = recommend(plan, allow_response_cut=not args.no_response_cut)
        if fits:
            best = fits[0]
            best_est = estimate(best)
            changes = describe_changes(plan, best)
            result["recommendation"] = {"plan": best.to_dict(), "changes": changes, "estimate": best_est.to_dict(),
                                        "alternatives": [describe_changes(plan, v) for v in fits[1:6]]}
            text += ["", "recommendation (cheapest change that fits): "
                     + ("none needed" if not changes else "; ".join(changes)), "",
                     format_table(best, best_est)]
            if len(fits) > 1:
                text += ["", "next alternatives:"] + [f"  - {'; '.join(describe_changes(plan, v)) or 'as is'} "
                                                      f"({estimate(v).total / GiB:.1f} GiB)" for v in fits[1:6]]
        else:
            low, low_est = smallest(plan, allow_response_cut=not args.no_response_cut)
            result["recommendation"] = None
            result["smallest"] = {"plan": low.to_dict(), "changes": describe_changes(plan, low),
                                  "estimate": low_est.to_dict()}
            text += ["", f"NOTHING FITS in {plan.gpu_memory_gb:g} GiB: the smallest configuration the search found "
                     f"needs {low_est.total / GiB:.1f} GiB ({'; '.join(describe_changes(plan, low))}). "
                     f"Use more/larger GPUs (--num_gpus with --zero3/--fsdp) or a smaller teacher/student."]
    print(json.dumps(result, indent=2) if args.json else "\n".join(text))
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
