"""Configuration of the OPD trainer: TRL's DistillationConfig plus the upstream baseline's options.

Usable from Python, YAML and the command line (TrlParser / HfArgumentParser). Field names follow upstream's
environment variables where one exists (see run_scripts/train_opd.sh for the mapping).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from trl import DistillationConfig

LOSS_TYPES = ("reverse_kl", "forward_kl", "jsd")
LOSS_NORMALIZATIONS = ("kept_tokens", "all_tokens", "sequence")
REWARD_WEIGHTINGS = ("global", "upstream")
DIVERGENCE_BACKENDS = ("auto", "trl", "chunked")


@dataclass
class OPDConfig(DistillationConfig):
    """DistillationConfig with upstream's loss options, normalization, length limits and memory knobs.

    `beta` of TRL is derived from `loss_type` (and `jsd_beta`); do not set it directly.
    """

    loss_type: str = field(
        default="reverse_kl",
        metadata={"help": "Per-token divergence: reverse_kl = KL(student||teacher) (OPD default), forward_kl = "
                  "KL(teacher||student), jsd = generalized JSD with mixture (1-jsd_beta)*P_S + jsd_beta*P_T."},
    )
    jsd_beta: float = field(default=0.5, metadata={"help": "Mixture weight of the teacher in jsd; in (0, 1)."})
    loss_normalization: str = field(
        default="kept_tokens",
        metadata={"help": "kept_tokens: mean over the tokens that enter the loss in the whole optimizer step (all "
                  "micro-batches and processes); all_tokens: sum over kept tokens / number of valid completion "
                  "tokens (dropped tokens count as zero); sequence: mean over each sequence's kept tokens, then "
                  "mean over sequences."},
    )
    reward_beta: float | None = field(
        default=None,
        metadata={"help": "Per-sample reward weighting w_i = n*softmax(r_i/reward_beta) over the generation batch "
                  "(upstream's OPD_REWARD_BETA). None or <= 0 disables it. Needs a reward function."},
    )
    reward_function: str | None = field(
        default=None, metadata={"help": "Name of the reward function (opsd.reward: math, math_dapo) used for reward "
                                "weighting, the accuracy of the training rollouts and in-training validation."}
    )
    reward_weighting: str = field(
        default="global",
        metadata={"help": "global: this project's objective, the weights scale each token of the step-wide "
                  "normalized loss (loss_normalization). upstream: the upstream OPD worker's objective, rewards "
                  "binarized to 0/1, per-sample token means weighted by w and renormalized by the weights' sum per "
                  "micro-batch, then the mean over micro-batches (without reward_beta: the mean of per-micro-batch "
                  "token means); it replaces loss_normalization."},
    )
    max_prompt_length: int | None = field(
        default=None, metadata={"help": "Prompts longer than this are truncated from the left. None: no limit."}
    )
    enable_thinking: bool | None = field(
        default=None,
        metadata={"help": "Passed to the chat template as enable_thinking (Qwen3-style templates). None: not passed."},
    )
    divergence_backend: str = field(
        default="auto",
        metadata={"help": "Gradient pass over the kept rows: trl = TRL's ChunkedDivergenceFunction (Triton on "
                  "CUDA), chunked = this project's token-chunked recomputing function (faster and leaner on CPU, "
                  "see BENCHMARKS.md), auto = trl on CUDA, chunked elsewhere."},
    )
    chunk_size: int = field(
        default=512,
        metadata={"help": "Rows per chunk of the chunked divergence and of the statistics pass (OPD_CHUNK_SIZE)."},
    )
    distill_vocab_size: int | None = field(
        default=None,
        metadata={"help": "Vocabulary rows to distil over. None: the shared lm_head size when both models agree, "
                  "else the tokenizer's real vocabulary (same-family models padded to different sizes)."},
    )
    rollout_n: int = field(
        default=1,
        metadata={"help": "Completions sampled per prompt (upstream's ROLLOUT_N). The per-device generation batch "
                  "must be divisible by it."},
    )
    teacher_quantization: str | None = field(
        default=None,
        metadata={"help": "Load the teacher quantized with bitsandbytes: '8bit' or '4bit' (nf4, compute dtype = the "
                  "teacher dtype). Needs bitsandbytes (requirements-gpu.txt)."},
    )
    teacher_offload: bool = field(
        default=False,
        metadata={"help": "Keep the teacher on the CPU except during its pass: once per optimizer step the teacher "
                  "moves to the GPU, computes its hidden states for every micro-batch of the generation batch (cached "
                  "for the student phase; ~V/H times smaller than cached logits) and moves back. Its lm_head stays "
                  "on the GPU. Single-process or DDP only (not with DeepSpeed/FSDP sharding)."},
    )
    skip_nonfinite_loss: bool = field(
        default=True,
        metadata={"help": "On a NaN/inf loss, log a warning and contribute a zero gradient instead of corrupting "
                  "the weights."},
    )

    def __post_init__(self):
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {self.loss_type!r}.")
        if self.loss_normalization not in LOSS_NORMALIZATIONS:
            raise ValueError(
                f"loss_normalization must be one of {LOSS_NORMALIZATIONS}, got {self.loss_normalization!r}."
            )
        if self.reward_weighting not in REWARD_WEIGHTINGS:
            raise ValueError(f"reward_weighting must be one of {REWARD_WEIGHTINGS}, got {self.reward_weighting!r}.")
        if self.divergence_backend not in DIVERGENCE_BACKENDS:
            raise ValueError(
                f"divergence_backend must be one of {DIVERGENCE_BACKENDS}, got {self.divergence_backend!r}."
            )
        if self.loss_type == "jsd" and not 0.0 < self.jsd_beta < 1.0:
            raise ValueError(f"jsd_beta must be in (0, 1) for loss_type='jsd', got {self.jsd_beta}.")
        if self.teacher_quantization not in (None, "8bit", "4bit"):
            raise ValueError(f"teacher_quantization must be None, '8bit' or '4bit', got {self.teacher_quantization!r}.")
        if self.chunk_size < 1:
            raise ValueError(f"chunk_size must be positive, got {self.chunk_size}.")
        if self.rollout_n < 1:
            raise ValueError(f"rollout_n must be >= 1, got {self.rollout_n}.")
        # TRL's beta: 0 = forward KL(teacher||student), 1 = reverse KL(student||teacher), between = JSD.
        self.beta = {"reverse_kl": 1.0, "forward_kl": 0.0, "jsd": self.jsd_beta}[self.loss_type]
        if self.enable_thinking is not None:
            kwargs = self.chat_template_kwargs
            if isinstance(kwargs, str):
                import json

                kwargs = json.loads(kwargs)
            self.chat_template_kwargs = {**(kwargs or {}), "enable_thinking": self.enable_thinking}
        if self.bf16 is None and not self.fp16:
            import torch

            # TRL turns bf16 mixed precision on by default; on CPU it is slow and lossy, so default it to GPUs.
            self.bf16 = torch.cuda.is_available()
        super().__post_init__()
