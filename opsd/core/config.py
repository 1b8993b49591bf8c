"""Configuration of the OPD trainer: TRL's DistillationConfig plus the upstream baseline's options.

Usable from Python, YAML and the command line (TrlParser / HfArgumentParser). Field names follow upstream's
environment variables where one exists (see run_scripts/train_opd.sh for the mapping).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from trl import DistillationConfig

from .estimators import CONTROL_VARIATES, LOSS_SUPPORTS

LOSS_TYPES = ("reverse_kl", "forward_kl", "jsd")
LOSS_NORMALIZATIONS = ("kept_tokens", "all_tokens", "sequence")
REWARD_WEIGHTINGS = ("global", "upstream")
DIVERGENCE_BACKENDS = ("auto", "trl", "chunked", "fused")
STATISTICS_SOURCES = ("generation", "separate_pass")


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
    temperature_in_loss: bool = field(
        default=True,
        metadata={"help": "True (TRL's convention, the Python/CLI default): both models' logits are divided by "
                  "`temperature` inside the divergence, its statistics and the selectors' statistics, so the "
                  "objective is the divergence between the temperature-scaled distributions. False (upstream's "
                  "objective; run_scripts/*.sh pass it): the loss and every statistic use the raw logits (T = 1) and "
                  "`temperature` only shapes the sampling of the rollouts. temperature 0 (greedy rollouts) needs "
                  "False."},
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
        metadata={"help": "Gradient pass over the kept rows: fused = sum f_t * l_t with its gradient computed in "
                  "the forward pass (4 lm_head matmuls per row, no [N, V] state; fastest and leanest on CPU, see "
                  "BENCHMARKS.md), chunked = token-chunked function recomputing the logits in backward, trl = TRL's "
                  "ChunkedDivergenceFunction (Triton on CUDA), auto = trl on CUDA (fused not yet measured on a GPU), "
                  "fused elsewhere."},
    )
    chunk_size: int = field(
        default=512,
        metadata={"help": "Rows per chunk of the fused and chunked divergences and of the statistics pass "
                  "(OPD_CHUNK_SIZE)."},
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
        metadata={"help": "On a NaN/inf loss in any micro-batch (on any process), log a warning and skip that "
                  "optimizer step: no weight update, no weight decay, no optimizer-state update. False: stop."},
    )
    max_consecutive_skipped_steps: int = field(
        default=5,
        metadata={"help": "Stop with an error after this many optimizer steps in a row were skipped for a "
                  "non-finite loss (a teacher that is NaN on every step). 0 = never stop."},
    )

    loss_support: str = field(
        default="full",
        metadata={"help": "Estimator of the per-token objective (opsd/core/estimators.py): full = the divergence over "
                  "the whole vocabulary; student_topk / teacher_topk / intersection / union = the divergence with "
                  "both distributions renormalized on that top-k token set (biased); sampled = REINFORCE on the "
                  "sampled token with advantage log P_T(y) - log P_S(y) (unbiased gradient; reverse_kl only); teacher_free = "
                  "OPSA's control: the same update with a fixed advantage -1, no teacher signal (reverse_kl only)."},
    )
    loss_support_k: int = field(default=16, metadata={"help": "k of the top-k loss supports (and of the topk "
                                                             "control variate)."})
    loss_support_control_variate: str = field(
        default="none",
        metadata={"help": "For loss_support=sampled (vOPD): subtract the detached per-token KL from the "
                  "score-function coefficient: none, full (KL over the vocabulary) or topk (KL renormalized on the "
                  "student's top-k)."},
    )
    overlap_diagnostics: bool = field(
        default=False,
        metadata={"help": "Log the overlap diagnostics (overlap/ratio, overlap/student_mass, overlap/teacher_mass, "
                  "overlap/entropy_gap, each also by response third) over the tokens in the loss every step. "
                  "Without a selector this costs one extra no-grad student forward per micro-batch; a selector "
                  "that logs them itself (TokenSelector.logs_overlap) computes them in its own statistics pass."},
    )
    overlap_k: int = field(default=16, metadata={"help": "K of the overlap diagnostics' top-K sets."})
    statistics_source: str = field(
        default="generation",
        metadata={"help": "Where the student's hidden states for the selector's statistics (and the overlap "
                  "diagnostics) come from: generation = captured while the student samples the rollouts (HF "
                  "generate; the statistics pass is then head projections only, no second student backbone "
                  "forward), separate_pass = one no-grad student forward per micro-batch (the exact reference). "
                  "generation falls back to separate_pass where capture cannot work (vLLM, tool calls, "
                  "multimodal inputs)."},
    )
    padding_free: bool = field(
        default=True,
        metadata={"help": "Pay for real tokens, not the padded rectangle, in the teacher pass and the student's "
                  "gradient forward: each micro-batch is trimmed to its own longest prompt and completion, the "
                  "step's sequences are sorted by length before they are split into micro-batches (not with "
                  "scope=micro_batch selectors or reward_weighting=upstream, whose objective depends on the "
                  "split), and each sequence runs unpadded (on CUDA with a flash-attention model: one packed row "
                  "with restarting position_ids). false = the padded rectangle (PADDING_FREE in the scripts)."},
    )
    unpadded_fill_threshold: float = field(
        default=0.7,
        metadata={"help": "With padding_free on CPU (or without flash attention): run each sequence unpadded only when "
                  "real tokens fill less than this fraction of the micro-batch's trimmed rectangle, else the trimmed "
                  "rectangle (one pass per sequence costs more per token than a batched pass: BENCHMARKS.md). "
                  "1 = always unpadded, 0 = never (trim and length grouping only). Packed flash-attention rows on CUDA "
                  "are used whatever the fill."},
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
        if self.max_consecutive_skipped_steps < 0:
            raise ValueError(f"max_consecutive_skipped_steps must be >= 0, got {self.max_consecutive_skipped_steps}.")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy rollouts), got {self.temperature}.")
        if self.temperature == 0:
            if self.temperature_in_loss:
                raise ValueError("temperature 0 (greedy rollouts) cannot scale the loss's logits: set "
                                 "--temperature_in_loss false (the loss on raw logits, upstream's objective).")
            if not self.use_vllm:  # transformers generate: greedy is do_sample False (vLLM takes temperature 0)
                self.generation_kwargs = {**(self.generation_kwargs or {}), "do_sample": False}
        if self.rollout_n < 1:
            raise ValueError(f"rollout_n must be >= 1, got {self.rollout_n}.")
        if not 0.0 <= self.unpadded_fill_threshold <= 1.0:
            raise ValueError(f"unpadded_fill_threshold must be in [0, 1], got {self.unpadded_fill_threshold}.")
        if self.statistics_source not in STATISTICS_SOURCES:
            raise ValueError(f"statistics_source must be one of {STATISTICS_SOURCES}, got {self.statistics_source!r}.")
        self._check_loss_support()
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

    def _check_loss_support(self):
        if self.loss_support not in LOSS_SUPPORTS:
            raise ValueError(f"loss_support must be one of {LOSS_SUPPORTS}, got {self.loss_support!r}.")
        if self.loss_support_k < 1:
            raise ValueError(f"loss_support_k must be >= 1, got {self.loss_support_k}.")
        if self.loss_support_control_variate not in CONTROL_VARIATES:
            raise ValueError(f"loss_support_control_variate must be one of {CONTROL_VARIATES}, got "
                             f"{self.loss_support_control_variate!r}.")
        if self.loss_support_control_variate != "none" and self.loss_support != "sampled":
            raise ValueError("loss_support_control_variate applies to loss_support=sampled only; set "
                             "--loss_support sampled or --loss_support_control_variate none.")
        if self.loss_support == "teacher_free" and self.loss_type != "reverse_kl":
            raise ValueError("loss_support=teacher_free (OPSA's control) uses no divergence: leave --loss_type "
                             "reverse_kl.")
        if self.loss_support == "sampled" and self.loss_type != "reverse_kl":
            raise ValueError("loss_support=sampled estimates the reverse KL only: use --loss_type reverse_kl (or a "
                             "top-k --loss_support for forward_kl / jsd).")
        if self.overlap_k < 1:
            raise ValueError(f"overlap_k must be >= 1, got {self.overlap_k}.")
