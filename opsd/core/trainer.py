"""OPDTrainer: memory-efficient on-policy distillation as a subclass of TRL's DistillationTrainer.

One optimizer step, top to bottom (README "Layout", patches/README.md, docs/METHODS.md for the formulas):
1. `_prepare_inputs`: the student samples completions for the generation batch (TRL's generation, HF or vLLM; with
   statistics_source=generation its final hidden states are recorded on the way, one per sampled token), rollout
   metrics (prompts, completions, accuracy when a reward function is set), optional reward weights, shuffle (with
   padding_free: sorted by length where the split does not matter) and split into gradient-accumulation
   micro-batches (with padding_free: each trimmed to its own rectangle).
2. `_select_tokens` (THE place a token's keep mask is decided): with a selector, the teacher's hidden states at the
   valid completion positions are computed and cached (the teacher runs once per step) and the student's are the
   recorded ones (or, with statistics_source=separate_pass, a no-grad forward); the selector turns them into
   per-token statistics and a keep mask per scope; then per-token loss factors are built for the configured
   normalization. Without a selector: keep every valid token.
   Backbone passes (`_completion_hidden`) run padding-free (docs/METHODS.md 3b) unless padding_free=false.
   Every step logs time/generation, time/teacher, time/statistics, time/forward_backward, time/optimizer: process
   CPU seconds per optimizer step (`_phase`).
3. `_compute_loss` (per micro-batch, inside the DDP/FSDP-wrapped forward): student backbone with grad, the rows
   `_select_tokens` kept (`loss_keep`) go through the lm_heads and the divergence
   (`opsd.core.losses.weighted_divergence_loss`), loss = sum f_t * l_t. A micro-batch that keeps nothing still puts the
   head's parameters into the graph (DDP with gradient checkpointing waits for every parameter).
4. The optimizer step is skipped on every process when any micro-batch had a non-finite loss (`_skip_this_step`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
import warnings
from collections import defaultdict

import torch
from trl import DistillationTrainer
from accelerate.utils import is_peft_model
from trl.trainer.utils import (
    RepeatSampler,
    shuffle_sequence_dict,
    split_pixel_values_by_grid,
    split_tensor_dict,
    unsplit_pixel_values_by_grid,
)

from .config import OPDConfig
from .heads import LMHead, head_of, weight_rows
from .losses import weighted_divergence_loss
from .memory import peak_memory_gb
from .models import load_causal_lm, resolve_distill_vocab
from .selection import SCOPES, TokenChoice, TokenSelector, TokenView, loss_weights, valid_token_index
from .weighting import upstream_loss_factors


def quantization_config_for(kind: str, dtype):
    """bitsandbytes config for an 8-bit or 4-bit (nf4) frozen model computing in `dtype`."""
    import importlib.util

    from transformers import BitsAndBytesConfig

    from .models import resolve_dtype

    if importlib.util.find_spec("bitsandbytes") is None:
        raise ImportError(f"{kind} quantization needs bitsandbytes: pip install -r requirements-gpu.txt")
    if kind == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    compute = resolve_dtype(dtype)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                              bnb_4bit_compute_dtype=compute if isinstance(compute, torch.dtype) else torch.bfloat16)


def _whole(tensor):
    """A plain tensor of a possibly sharded parameter: FSDP2 keeps DTensor shards, gathered here (differentiably)."""
    if tensor is not None and isinstance(tensor, torch.distributed.tensor.DTensor):
        return tensor.full_tensor()
    return tensor


@contextlib.contextmanager
def whole_heads(*heads: LMHead):
    """The heads with whole weights, for reading them outside the wrapped model's forward.

    Under FSDP2 the weights are DTensor shards (gathered with `full_tensor()`); under DeepSpeed ZeRO-3 they are empty
    placeholders outside their module's forward (gathered read-only with `GatheredParameters` while the context is
    open). Anything computed inside must not keep references to ZeRO-3 weights after the context closes.
    """
    # ZeRO-3: only weights that are partitioned now; one a ZeRO-3 module hook holds gathered (a tied embedding inside
    # the model's forward) stays that hook's to release.
    partitioned = [t for h in heads for t in (h.weight, h.bias)
                   if t is not None and hasattr(t, "ds_id") and t.ds_status.name == "NOT_AVAILABLE"]
    gather = contextlib.nullcontext()
    if partitioned:
        import deepspeed

        gather = deepspeed.zero.GatheredParameters(partitioned, modifier_rank=None)
    with gather:
        yield [dataclasses.replace(h, weight=_whole(h.weight), bias=_whole(h.bias)) for h in heads]


class OPDTrainer(DistillationTrainer):
    """Full-token OPD (no selector) or OPD on the tokens a `TokenSelector` keeps.

    Args beyond TRL's: `token_selector` (see opsd.core.selection); `reward_fn(completion_text, answer) -> float` for
    upstream's reward weighting w_i = n * softmax(r_i / reward_beta) over the whole generation batch (all processes);
    `teacher_tokenizer` (checked against the student's).
    """

    _tag_names = ["trl", "distillation", "on-policy-distillation", "opsd-tip"]
    _name = "OPD (opsd-tip)"
    model_card_extra = ""  # markdown appended to TRL's model card (opsd.train: the method, selector and papers)

    def create_accelerator_and_postprocess(self):
        super().create_accelerator_and_postprocess()
        self._fsdp_on_cpu_processes()

    def _fsdp_on_cpu_processes(self) -> None:
        """FSDP on CPU processes (gloo), as `accelerate launch` with an FSDP config starts them on a machine without
        GPUs (run_scripts/train_opd.sh, NPROC>1 with ACCELERATE_CONFIG): accelerate 1.16 attaches its FSDP plugin
        only for accelerator devices and would silently fall back to DDP; here the plugin (read from the FSDP_*
        variables the launcher sets) is attached to the CPU processes, so the same config shards on CPU."""
        from accelerate import PartialState
        from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin, parse_flag_from_env

        state = self.accelerator.state
        if state.distributed_type != DistributedType.MULTI_CPU or not parse_flag_from_env("ACCELERATE_USE_FSDP"):
            return
        # both shared states: every later AcceleratorState() copies PartialState's distributed_type over its own
        PartialState().distributed_type = state.distributed_type = DistributedType.FSDP
        state.fsdp_plugin = FullyShardedDataParallelPlugin()
        self.is_fsdp_enabled = True

    def create_model_card(self, *args, **kwargs):
        super().create_model_card(*args, **kwargs)
        if self.model_card_extra and self.is_world_process_zero():
            import os

            with open(os.path.join(self.args.output_dir, "README.md"), "a") as f:
                f.write(self.model_card_extra)

    def __init__(self, model, teacher_model=None, args: OPDConfig | None = None, train_dataset=None,
                 eval_dataset=None, processing_class=None, callbacks=None, optimizers=(None, None),
                 quantization_config=None, peft_config=None, tools=None, token_selector: TokenSelector | None = None,
                 reward_fn=None, teacher_tokenizer=None):
        if args is None:
            args = OPDConfig(output_dir="opd-output")
        if not isinstance(args, OPDConfig):
            raise TypeError(f"OPDTrainer needs an OPDConfig, got {type(args).__name__}.")
        if train_dataset is not None and hasattr(train_dataset, "__len__") and len(train_dataset) == 0:
            raise ValueError("The training dataset is empty: check the prompt file (OPD needs at least one prompt).")
        if token_selector is not None and token_selector.scope not in SCOPES:
            raise ValueError(f"Selector scope must be one of {SCOPES}, got {token_selector.scope!r}.")
        local_batch = args.per_device_train_batch_size * args.gradient_accumulation_steps
        if local_batch % args.rollout_n:
            raise ValueError(f"rollout_n={args.rollout_n} must divide the per-device generation batch "
                             f"(per_device_train_batch_size x gradient_accumulation_steps = {local_batch}).")
        if isinstance(teacher_model, str):
            init = dict(args.teacher_model_init_kwargs or {})
            dtype = init.pop("dtype", "float32")
            if args.teacher_quantization:
                init["quantization_config"] = quantization_config_for(args.teacher_quantization, dtype)
            teacher_model = load_causal_lm(teacher_model, dtype=dtype, what="Teacher model", **init)
        if teacher_model is None:
            raise ValueError("OPDTrainer needs a teacher model (a local path or a loaded model).")
        # TRL refuses teachers whose vocab_size differs; we compare over the shared real vocabulary instead, so the
        # teacher is attached after TRL's constructor (which then sees no teacher) and checked here.
        super().__init__(model=model, teacher_model=None, args=args, train_dataset=train_dataset,
                         eval_dataset=eval_dataset, processing_class=processing_class, callbacks=callbacks,
                         optimizers=optimizers, quantization_config=quantization_config, peft_config=peft_config,
                         tools=tools)
        self.distill_vocab_size = resolve_distill_vocab(
            self.accelerator.unwrap_model(self.model), teacher_model, self._tokenizer, teacher_tokenizer,
            args.distill_vocab_size,
        )
        if self.is_deepspeed_enabled:
            from trl.models import prepare_deepspeed

            self.teacher_model = prepare_deepspeed(teacher_model, self.accelerator)
        else:
            self.teacher_model = self.accelerator.prepare_model(teacher_model, evaluation_mode=True)
        self.teacher_model.eval()
        self._check_zero3_loss_backend()
        if args.teacher_offload:
            if self.is_deepspeed_enabled or self.is_fsdp_enabled:
                raise ValueError("teacher_offload is for single-process/DDP runs; with DeepSpeed ZeRO-3 the teacher "
                                 "is sharded instead, with FSDP each process holds it whole (run_scripts/accelerate/).")
            self._place_teacher(torch.device("cpu"))
        self.token_selector = token_selector
        self._check_prompts_fit_the_tokenizer(train_dataset)
        self._suppress_ids_without_tokens()
        self._nonfinite_in_step = False  # set by _compute_loss, read when the optimizer steps
        self._skipped_in_a_row = 0
        self._entropy_totals = {"train": torch.zeros(2), "eval": torch.zeros(2)}  # (sum over tokens, tokens)
        self._capture_wanted = False  # set per step: record the student's hidden states during generation
        self._captured_hidden = None
        self._phase_stack: list[list] = []  # [phase, start, time in nested phases] (process CPU seconds)
        self._phase_totals: dict[str, float] = defaultdict(float)
        self._timed_steps = 0
        if reward_fn is None and args.reward_beta and args.reward_beta > 0 and args.reward_function:
            from ..reward import get_reward_fn

            reward_fn = get_reward_fn(args.reward_function)
        self.reward_fn = reward_fn

    _zero3_heads = False  # set under DeepSpeed ZeRO-3 by _check_zero3_loss_backend

    def _loss_backend(self) -> str:
        """divergence_backend, with `auto` meaning fused under ZeRO-3 (the one backend whose backward reads no head)."""
        return "fused" if self._zero3_heads else self.args.divergence_backend

    def _check_zero3_loss_backend(self) -> None:
        """DeepSpeed ZeRO-3: the loss reads both lm_heads outside their modules' forward, so `_compute_loss` gathers
        them (whole_heads) for its forward only. The fused backend computes the head's gradient there and backward
        only hands it on (DeepSpeed reduce-scatters it as any other); trl/chunked recompute logits in backward, when
        the heads are partitioned again, so they are refused and `auto` means fused; so are the loss_support
        estimators, which do the same (measured: "size mismatch ... vec (0)" in backward)."""
        if not (self.is_deepspeed_enabled and self.accelerator.state.deepspeed_plugin.zero_stage == 3):
            return
        if self.args.divergence_backend in ("trl", "chunked"):
            raise ValueError(f"divergence_backend={self.args.divergence_backend} recomputes logits in backward, where "
                             "DeepSpeed ZeRO-3 has partitioned the lm_heads again: use fused (what auto means under "
                             "ZeRO-3).")
        if self.args.loss_support != "full":
            raise ValueError(f"loss_support={self.args.loss_support} recomputes logits in backward, where DeepSpeed "
                             "ZeRO-3 has partitioned the lm_heads again: use loss_support=full under ZeRO-3 (or "
                             "FSDP2/DDP for the estimators).")
        self._zero3_heads = True

    def _check_prompts_fit_the_tokenizer(self, dataset) -> None:
        """Conversational prompts need a chat template: fail at start, not at step 1."""
        if dataset is None or not hasattr(dataset, "__getitem__") or not len(dataset):
            return
        prompt = dataset[0].get("prompt") if isinstance(dataset[0], dict) else None
        if isinstance(prompt, list) and getattr(self._tokenizer, "chat_template", None) is None:
            raise ValueError("The prompts are chat messages but the student's tokenizer has no chat template: save a "
                             "tokenizer with a chat_template, or use plain-text prompts (opsd.data writes either).")

    def _suppress_ids_without_tokens(self) -> None:
        """Never sample an id the tokenizer (and so the teacher) does not have.

        Embedding matrices are often padded past the tokenizer (151936 rows for 151669 Qwen tokens); a student with
        more rows than the distilled vocabulary could sample a padding id, which the teacher cannot embed
        (IndexError on CPU, a device-side assert on CUDA). Those ids are suppressed in generation.
        """
        rows = weight_rows(self.accelerator.unwrap_model(self.model).get_output_embeddings().weight)
        if rows <= self.distill_vocab_size:
            return
        padding_ids = list(range(self.distill_vocab_size, rows))
        suppressed = sorted(set(self.generation_kwargs.get("suppress_tokens") or []) | set(padding_ids))
        self.generation_kwargs["suppress_tokens"] = suppressed
        self.generation_config.suppress_tokens = suppressed
        if self.args.use_vllm:
            raise ValueError(f"The student's head has {rows} rows but only {self.distill_vocab_size} tokens are shared "
                             "with the teacher; vLLM generation cannot suppress the padding ids here. Resize the "
                             "student's embeddings to the tokenizer (model.resize_token_embeddings) or use HF generate.")

    # ----- data -----------------------------------------------------------------------------------------------
    @property
    def loss_temperature(self) -> float:
        """The temperature dividing both models' logits in the loss and every statistic: `temperature` with
        temperature_in_loss (TRL's convention), 1.0 (raw logits, upstream's objective) without; sampling always
        uses `temperature`."""
        return self.temperature if self.args.temperature_in_loss else 1.0

    def _get_train_sampler(self, dataset=None):
        dataset = self.train_dataset if dataset is None else dataset
        generation_batch = (self.args.per_device_train_batch_size * self.accelerator.num_processes
                            * self.args.gradient_accumulation_steps)
        # rollout_n completions per prompt: each prompt appears rollout_n times in a row in the generation batch
        return RepeatSampler(data_source=dataset, mini_repeat_count=self.args.rollout_n,
                             batch_size=generation_batch // self.args.rollout_n,
                             repeat_count=self.args.gradient_accumulation_steps, shuffle=self.shuffle_dataset,
                             seed=self.args.seed)

    def _tokenize_prompts(self, prompts: list):
        prompt_ids, images, multimodal_fields = super()._tokenize_prompts(prompts)
        limit = self.args.max_prompt_length
        if limit is not None:
            prompt_ids = [ids[-limit:] for ids in prompt_ids]  # keep the end of the prompt, next to the answer
        return prompt_ids, images, multimodal_fields

    # ----- step preparation -------------------------------------------------------------------------------------
    def _prepare_inputs(self, generation_batch):
        if not self.model.training:
            batch = self._generate_and_score_completions(generation_batch)
            if self.args.teacher_offload:
                self._teacher_phase([batch])
            mask = self._loss_mask(batch)
            batch["loss_keep"] = mask
            batch["loss_weights"] = mask.float() / mask.sum().clamp_min(1.0)  # evaluation: full-token mean
            return batch
        accumulation = self.args.gradient_accumulation_steps
        if self._step % accumulation == 0 or self._buffered_inputs is None:
            self._timed_steps += 1
            with self._phase("other"):
                wanted = self._capture_wanted = self._wants_generation_capture()
                with self._phase("generation"):
                    try:
                        batch = self._generate_and_score_completions(generation_batch)
                    finally:
                        self._capture_wanted = False
                captured, self._captured_hidden = self._captured_hidden, None
                # (a generation split over several generate calls would record only the last: not used then)
                usable = captured is not None and captured.shape[0] == batch["completion_ids"].shape[0]
                if wanted and self.accelerator.num_processes > 1:
                    # every process must take the same path: the separate pass runs the wrapped forward, which
                    # under ZeRO-3/FSDP gathers weights collectively (one process alone there would hang the rest)
                    flag = torch.tensor([1.0 if usable else 0.0], device=self.accelerator.device)
                    usable = bool(self.accelerator.gather(flag).min().item() > 0)
                if usable:
                    batch["student_hidden"] = _fit_columns(captured, batch["completion_ids"].shape[1])
                rewards = self._rollout_metrics(generation_batch, batch)
                if self.reward_fn is not None and self.args.reward_beta and self.args.reward_beta > 0:
                    batch["sample_weights"] = self._reward_weights(generation_batch, batch, rewards)
                batch = shuffle_sequence_dict(split_pixel_values_by_grid(batch))
                if self._groups_by_length(batch):
                    batch = _sorted_by_length(batch)
                micro_batches = [unsplit_pixel_values_by_grid(b) for b in split_tensor_dict(batch, accumulation)]
                if self.args.padding_free:
                    micro_batches = [_trimmed(mb) for mb in micro_batches]
                self._select_tokens(micro_batches)
            self._buffered_inputs = micro_batches
        return self._buffered_inputs[self._step % accumulation]

    # ----- per-phase timing (process CPU seconds, logged as time/<phase> per optimizer step) --------------------
    @contextlib.contextmanager
    def _phase(self, name: str):
        """Time the block as `name`, exclusive of the phases nested in it (they count for themselves)."""
        self._phase_stack.append([name, time.process_time(), 0.0])
        try:
            yield
        finally:
            phase, start, nested = self._phase_stack.pop()
            spent = time.process_time() - start
            self._phase_totals[phase] += spent - nested
            if self._phase_stack:
                self._phase_stack[-1][2] += spent

    def training_step(self, model, inputs, num_items_in_batch=None):
        # the student's forward + loss + backward; the step's preparation (generation, teacher, statistics) nested
        # in it through _prepare_inputs is timed as its own phases
        with self._phase("forward_backward"):
            return super().training_step(model, inputs, num_items_in_batch)

    # ----- generation with the student's hidden states recorded --------------------------------------------------
    def _wants_generation_capture(self) -> bool:
        """Record the student's hidden states while it samples, for the statistics of this step (one backbone forward
        per micro-batch instead of two). Not with vLLM (another engine samples), tools (completions are spliced with
        tool outputs over several generate calls) or multimodal prompts; those use the separate pass."""
        args = self.args
        if args.statistics_source != "generation" or args.use_vllm or self.tools or not self.model.training:
            return False
        selector = self.token_selector
        needs = selector is not None and selector.needs_model_pass
        return needs or (args.overlap_diagnostics and not getattr(selector, "logs_overlap", False))

    def _capture_module(self):
        """The module whose output `_get_last_hidden_state` reads: the backbone (`base_model`) of the student."""
        model = self.accelerator.unwrap_model(self.model)
        if is_peft_model(model):
            model = model.base_model.model
        return model.base_model

    def _generate_single_turn(self, prompt_ids, images, multimodal_fields, has_tool_images=False):
        if not self._capture_wanted or images is not None or multimodal_fields:
            return super()._generate_single_turn(prompt_ids, images, multimodal_fields, has_tool_images)
        steps: list[torch.Tensor] = []

        def record(module, inputs, output):
            hidden = output[0] if isinstance(output, tuple) else output.last_hidden_state
            # one call per sampled token: the prefill (whole prompt) feeds the first token from its last position,
            # each decoding step (one position) the next one
            steps.append(hidden[:, -1].detach().clone())

        handle = self._capture_module().register_forward_hook(record)
        try:
            completion_ids = super()._generate_single_turn(prompt_ids, images, multimodal_fields, has_tool_images)
        finally:
            handle.remove()
        longest = max((len(c) for c in completion_ids), default=0)
        if len(steps) > longest and self.accelerator.num_processes > 1:
            # synced generation (ZeRO-3/FSDP: synced_gpus): a process whose rollouts have all ended keeps calling the
            # backbone until every process is done; its first `longest` calls are the ones that sampled its tokens
            steps = steps[:longest]
        if len(steps) != longest or any(h.shape[0] != len(prompt_ids) for h in steps):
            # not one backbone call per sampled token and rollout (beam search, assisted decoding): separate pass
            warnings.warn(f"statistics_source=generation: {len(steps)} backbone calls for {longest} sampled tokens "
                          f"of {len(prompt_ids)} rollouts; this step uses the separate statistics pass.", stacklevel=2)
            return completion_ids
        self._captured_hidden = torch.stack(steps, dim=1)  # [B, T, H]: row b, column j -> completion token j
        return completion_ids

    # ----- padding-free passes --------------------------------------------------------------------------------------
    def _groups_by_length(self, batch) -> bool:
        """Sort the step's sequences by length before the micro-batch split, where that leaves the objective as it
        is: not when the objective or the selection depends on the split (reward_weighting=upstream's
        per-micro-batch means; a micro_batch-scope selector), nor with multimodal inputs."""
        if not self.args.padding_free or self.args.gradient_accumulation_steps == 1:
            return False
        if self.args.reward_weighting == "upstream" or not set(batch) <= _ROW_KEYS:
            return False
        return self.token_selector is None or self.token_selector.scope != "micro_batch"

    def _completion_hidden(self, unwrapped, batch):
        """Final hidden states [B, C, H] at the positions that predict each completion token. padding_free: all
        sequences packed into one row with restarting position_ids when the model uses flash attention on CUDA
        (varlen kernels); else each sequence unpadded when real tokens fill less than `unpadded_fill_threshold` of
        the rectangle (zeros past a sequence's end, never read); else the (trimmed) rectangle."""
        input_ids, attention_mask, width = self._model_inputs(batch)
        if not self.args.padding_free or not set(batch) <= _ROW_KEYS:
            return self._get_last_hidden_state(unwrapped, input_ids, attention_mask, width)
        prompt_width = batch["prompt_ids"].shape[1]
        prompt_lengths = batch["prompt_mask"].sum(1).tolist()
        lengths = batch["completion_mask"].sum(1).tolist()
        if min(prompt_lengths) < 1:
            return self._get_last_hidden_state(unwrapped, input_ids, attention_mask, width)
        rows = [input_ids[b, prompt_width - p: prompt_width + c] for b, (p, c) in enumerate(zip(prompt_lengths, lengths))]
        attention = getattr(unwrapped.config, "_attn_implementation", "") or ""
        if attention.startswith("flash_attention") and input_ids.is_cuda:
            return self._packed_hidden(unwrapped, rows, prompt_lengths, lengths, width)
        fill = (sum(prompt_lengths) + sum(lengths)) / max(1, input_ids.numel())
        # a batched pass over the (trimmed) rectangle: when it is cheaper, and under ZeRO-3/FSDP, where every module
        # call gathers its sharded weights (one call per sequence would gather them once per sequence)
        if fill >= self.args.unpadded_fill_threshold or self.is_deepspeed_enabled or self.is_fsdp_enabled:
            return self._get_last_hidden_state(unwrapped, input_ids, attention_mask, width)
        out = []
        for row, p, c in zip(rows, prompt_lengths, lengths):
            if c == 0:
                out.append(None)
                continue
            hidden = self._get_last_hidden_state(unwrapped, row[None], torch.ones_like(row)[None], c)[0]
            out.append(hidden)
        template = next((h for h in out if h is not None), None)
        if template is None:
            return self._get_last_hidden_state(unwrapped, input_ids, attention_mask, width)
        return torch.stack([template.new_zeros(width, template.shape[-1]) if h is None else
                            torch.nn.functional.pad(h, (0, 0, 0, width - h.shape[0])) for h in out])

    def _packed_hidden(self, unwrapped, rows, prompt_lengths, lengths, width):
        """All sequences in one row, position_ids restarting at each: transformers' flash-attention path runs the
        varlen kernel (no attention across sequences, no padding)."""
        model = unwrapped.base_model.model if is_peft_model(unwrapped) else unwrapped
        ids = torch.cat(rows)[None]
        positions = torch.cat([torch.arange(r.numel(), device=ids.device) for r in rows])[None]
        hidden = model.base_model(input_ids=ids, position_ids=positions, use_cache=False).last_hidden_state[0]
        out, start = [], 0
        for row, p, c in zip(rows, prompt_lengths, lengths):
            h = hidden[start + p - 1: start + p - 1 + c]
            out.append(torch.nn.functional.pad(h, (0, 0, 0, width - c)))
            start += row.numel()
        return torch.stack(out)

    def _rollout_rewards(self, inputs, batch) -> torch.Tensor:
        """reward_fn(completion text, answer) of this process's rollouts."""
        completions = self.processing_class.batch_decode(batch["completion_ids"], skip_special_tokens=True)
        return torch.tensor([float(self.reward_fn(c, x["answer"])) for c, x in zip(completions, inputs)],
                            device=self.accelerator.device)

    def _rollout_metrics(self, inputs, batch) -> torch.Tensor | None:
        """Log the step's prompts and completions (all processes) and, when the prompts have answers and a reward
        function is set, the accuracy of the rollouts (reward > 0, upstream's opd/accuracy); returns the rewards."""
        import json

        distinct = len({json.dumps(x["prompt"], sort_keys=True, default=str) for x in inputs})
        counts = self.accelerator.gather(torch.tensor([[float(len(inputs)), float(distinct)]],
                                                      device=self.accelerator.device)).reshape(-1, 2).sum(0)
        self._metrics["train"]["rollout_completions"].append(counts[0].item())
        self._metrics["train"]["rollout_prompts"].append(counts[1].item())
        if self.reward_fn is None or not inputs or "answer" not in inputs[0]:
            return None
        rewards = self._rollout_rewards(inputs, batch)
        self._metrics["train"]["rollout_accuracy"].append((self.accelerator.gather(rewards) > 0).float().mean().item())
        return rewards

    def _reward_weights(self, inputs, batch, rewards: torch.Tensor | None = None) -> torch.Tensor:
        """Per-sample weights n * softmax(r / reward_beta) over the generation batch of all processes (rewards
        binarized to 0/1 first with reward_weighting=upstream)."""
        from .weighting import binarize, reward_weights

        if "answer" not in inputs[0]:
            raise ValueError("Reward weighting needs an `answer` column in the prompt file.")
        if rewards is None:
            rewards = self._rollout_rewards(inputs, batch)
        all_rewards = self.accelerator.gather(rewards)
        if self.args.reward_weighting == "upstream":
            all_rewards = binarize(all_rewards)
        self._metrics["train"]["reward"].append(all_rewards.mean().item())
        start = self.accelerator.process_index * rewards.numel()
        return reward_weights(all_rewards, self.args.reward_beta)[start:start + rewards.numel()].float()

    @staticmethod
    def _loss_mask(batch) -> torch.Tensor:
        mask = batch["completion_mask"].bool()
        return mask & batch["tool_mask"].bool() if "tool_mask" in batch else mask

    def _heads(self, unwrapped_student, unwrapped_teacher) -> tuple[LMHead, LMHead]:
        return head_of(unwrapped_student, self.distill_vocab_size), head_of(unwrapped_teacher, self.distill_vocab_size)

    def _model_inputs(self, batch):
        input_ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], dim=1)
        attention_mask = torch.cat([batch["prompt_mask"], batch["completion_mask"]], dim=1)
        return input_ids, attention_mask, batch["completion_ids"].size(1)

    @torch.no_grad()
    def _teacher_hidden(self, batch):
        unwrapped_teacher = self.accelerator.unwrap_model(self.teacher_model)
        with self._phase("teacher"):
            hidden = self._forward_redirection(self.teacher_model, unwrapped_teacher, self._completion_hidden,
                                               unwrapped_teacher, batch)
            return hidden.clone()  # a view of the whole prompt+completion output: keep only the completion rows

    def _place_teacher(self, device: torch.device) -> None:
        """Move the teacher's backbone to `device`; its lm_head stays next to the student's for the loss."""
        teacher = self.accelerator.unwrap_model(self.teacher_model)
        head = teacher.get_output_embeddings()
        for module in teacher.children():
            if module is not head:
                module.to(device)
        head.to(self.accelerator.device)

    def _teacher_phase(self, micro_batches: list[dict]) -> None:
        """Teacher hidden states of every micro-batch of the step, cached in the batches (`teacher_hidden`), so the
        teacher runs once per step and, when offloaded, is on the accelerator only during this pass."""
        pending = [mb for mb in micro_batches if "teacher_hidden" not in mb]
        if not pending:
            return
        if self.args.teacher_offload:
            self._place_teacher(self.accelerator.device)
        for mb in pending:
            mb["teacher_hidden"] = self._teacher_hidden(mb)
        if self.args.teacher_offload:
            self._place_teacher(torch.device("cpu"))
            if self.accelerator.device.type == "cuda":
                torch.cuda.empty_cache()

    def _all_reduce_sum(self, value: torch.Tensor) -> torch.Tensor:
        value = value.reshape(1).float().to(self.accelerator.device)
        return self.accelerator.gather(value).sum() if self.accelerator.num_processes > 1 else value.sum()

    def _gather_rows(self, tensor: torch.Tensor) -> tuple[torch.Tensor, int]:
        """Concatenate a per-process [n, ...] tensor over processes; also return this process's row offset."""
        if self.accelerator.num_processes == 1:
            return tensor, 0
        counts = self.accelerator.gather(torch.tensor([tensor.shape[0]], device=self.accelerator.device)).tolist()
        padded = self.accelerator.pad_across_processes(tensor, dim=0)
        gathered = self.accelerator.gather(padded).reshape(len(counts), -1, *tensor.shape[1:])
        rows = torch.cat([gathered[i, :n] for i, n in enumerate(counts)])
        return rows, sum(counts[: self.accelerator.process_index])

    @torch.no_grad()
    def _select_tokens(self, micro_batches: list[dict]) -> None:
        """Decide which completion tokens enter the loss and with what factor; the only place masks are decided.

        Writes `loss_keep` (bool [B, C]: the rows the gradient pass takes), `loss_weights` (float [B, C]: each kept
        token's factor in the step's loss) and, when a statistics pass ran, `teacher_hidden` into each micro-batch.
        """
        selector = self.token_selector
        masks = [self._loss_mask(mb) for mb in micro_batches]
        keeps, weights = masks, [None] * len(masks)
        if self.args.teacher_offload or (selector is not None and selector.needs_model_pass):
            self._teacher_phase(micro_batches)
        if selector is not None:
            with self._phase("statistics"):
                keeps, weights = self._run_selector(selector, micro_batches, masks)
        if self.args.reward_weighting == "upstream":  # per-micro-batch objective, opsd.core.weighting
            factors = upstream_loss_factors(keeps, [mb.get("sample_weights") for mb in micro_batches])
            factors = [f if w is None else f * w for f, w in zip(factors, weights)]
        else:
            weights = [w if "sample_weights" not in mb else (1.0 if w is None else w) * mb["sample_weights"][:, None]
                       for w, mb in zip(weights, micro_batches)]
            factors = loss_weights(keeps, weights, masks, self.args.loss_normalization,
                                   self.accelerator.num_processes, self._all_reduce_sum)
        for mb, keep, factor in zip(micro_batches, keeps, factors):
            mb["loss_keep"], mb["loss_weights"] = keep, factor
        kept = self._all_reduce_sum(sum(k.sum() for k in keeps))
        valid = self._all_reduce_sum(sum(m.sum() for m in masks))
        self._metrics["train"]["kept_fraction"].append((kept / valid.clamp_min(1)).item())
        self._metrics["train"]["kept_tokens"].append(kept.item())
        if self.args.overlap_diagnostics and not getattr(selector, "logs_overlap", False):
            with self._phase("statistics"):
                self._log_overlap_diagnostics(micro_batches)
        for mb in micro_batches:
            mb.pop("student_hidden", None)  # recorded during generation; the statistics are done with it

    def _student_statistics_hidden(self, student, mb):
        """The student's hidden states [B, C, H] for the statistics: recorded during generation when available
        (statistics_source=generation), else a no-grad forward through the wrapper's forward (so FSDP/ZeRO-3
        materialize the sharded backbone as in training)."""
        captured = mb.get("student_hidden")
        if captured is not None:
            return captured
        return self._forward_redirection(self.model_wrapped, student, self._completion_hidden, student, mb)

    def _run_selector(self, selector, micro_batches, masks):
        student = self.accelerator.unwrap_model(self.model)
        teacher = self.accelerator.unwrap_model(self.teacher_model)
        with whole_heads(*self._heads(student, teacher)) as (s_head, t_head):
            return self._run_selector_with_heads(selector, micro_batches, masks, student, s_head, t_head)

    def _run_selector_with_heads(self, selector, micro_batches, masks, student, s_head, t_head):
        s_head = dataclasses.replace(s_head, weight=s_head.weight.detach(),
                                     bias=None if s_head.bias is None else s_head.bias.detach())
        # sequence ids unique across the step's micro-batches and across processes (equal per-device batches)
        offset = self.accelerator.process_index * sum(mask.shape[0] for mask in masks)
        views, stats, flats = [], [], []
        for mb, mask in zip(micro_batches, masks):
            flat, rows, positions = valid_token_index(mask)
            flats.append(flat)
            view = TokenView(token_ids=mb["completion_ids"].reshape(-1)[flat], sequence_ids=rows + offset,
                             positions=positions, temperature=self.loss_temperature)
            offset += mask.shape[0]
            if selector.needs_model_pass:
                hidden = self._student_statistics_hidden(student, mb)
                view.student_hidden = hidden.reshape(-1, hidden.shape[-1])[flat].to(s_head.weight.device)
                view.teacher_hidden = mb["teacher_hidden"].reshape(-1, mb["teacher_hidden"].shape[-1])[flat].to(
                    t_head.weight.device)
                view.student_head, view.teacher_head = s_head, t_head
            views.append(view)
            stats.append(selector.statistics(view))

        choices = self._choose_in_groups(selector, views, stats)
        keeps, weights = [], []
        for mask, flat, view, st, choice in zip(masks, flats, views, stats, choices):
            keep = torch.zeros(mask.numel(), dtype=torch.bool, device=mask.device)
            keep[flat] = choice.keep.to(mask.device)
            keeps.append(keep.view_as(mask))
            if choice.weights is None:
                weights.append(None)
            else:
                w = torch.zeros(mask.numel(), dtype=torch.float32, device=mask.device)
                w[flat] = choice.weights.to(mask.device, torch.float32)
                weights.append(w.view_as(mask))
            selector.record(self.state.global_step, view, st, choice)
            view.student_hidden = view.teacher_hidden = None
        return keeps, weights

    def _choose_in_groups(self, selector, views, stats) -> list[TokenChoice]:
        """The selector's rule on each group of its scope, one TokenChoice per micro-batch (this process's tokens).

        rollout_batch: one group, every micro-batch of the step; micro_batch: each micro-batch; sequence: each
        sequence (inside each micro-batch). With `across_processes` each group is first gathered from every process
        (so a top-rho rule means the same whatever the split), and the rule runs on the gathered tokens.
        """
        generator = torch.Generator().manual_seed(self.args.seed * 1_000_003 + self.state.global_step)
        whole_step = selector.scope == "rollout_batch"
        groups = [list(range(len(views)))] if whole_step else [[i] for i in range(len(views))]
        gather = selector.across_processes and self.accelerator.num_processes > 1
        device = self.accelerator.device
        choices: list[TokenChoice | None] = [None] * len(views)
        for group in groups:
            names = sorted(stats[group[0]])
            local = {name: torch.cat([stats[i][name].float() for i in group]) for name in names}
            seq = torch.cat([views[i].sequence_ids for i in group])
            pos = torch.cat([views[i].positions for i in group])
            start = 0
            if gather:
                (seq, start), (pos, _) = self._gather_rows(seq.to(device)), self._gather_rows(pos.to(device))
                local = {name: self._gather_rows(value.to(device))[0] for name, value in local.items()}
            choice = _choose(selector, local, seq, pos, generator)
            for name, value in choice.metrics.items():
                self._metrics["train"][name].append(value)
            for i in group:  # this process's micro-batches, in order, from the group's rows
                n = views[i].sequence_ids.numel()
                part = slice(start, start + n)
                choices[i] = TokenChoice(choice.keep[part], None if choice.weights is None else choice.weights[part],
                                         score=None if choice.score is None else choice.score[part])
                start += n
        return choices

    # ----- loss ------------------------------------------------------------------------------------------------
    def _compute_loss(self, unwrapped_student, inputs, num_items_in_batch=None):
        # whole_heads: FSDP2's DTensor shards gathered (differentiably); ZeRO-3's partitioned heads gathered for this
        # forward only (the fused loss computes the gradients here; _check_zero3_loss_backend).
        unwrapped_teacher = self.accelerator.unwrap_model(self.teacher_model)
        with whole_heads(*self._heads(unwrapped_student, unwrapped_teacher)) as (s_head, t_head):
            return self._compute_loss_with_heads(unwrapped_student, inputs, s_head, t_head)

    def _compute_loss_with_heads(self, unwrapped_student, inputs, s_head, t_head):
        hidden = self._completion_hidden(unwrapped_student, inputs)
        factors = inputs["loss_weights"].reshape(-1)
        rows = inputs["loss_keep"].reshape(-1).nonzero(as_tuple=True)[0]  # the decision made in _select_tokens
        teacher_hidden = inputs.get("teacher_hidden")
        if teacher_hidden is None:
            teacher_hidden = self._teacher_hidden(inputs)
        h_s = hidden.reshape(-1, hidden.shape[-1])[rows].to(s_head.weight.device)
        h_t = teacher_hidden.reshape(-1, teacher_hidden.shape[-1])[rows].to(t_head.weight.device)
        if self.args.loss_support == "full":
            loss, divergence, entropy = weighted_divergence_loss(h_s, s_head, h_t, t_head,
                                                                 factors[rows].to(h_s.device), self.beta,
                                                                 self.loss_temperature, self._loss_backend(),
                                                                 self.args.chunk_size)
        else:  # top-k / sampled-token estimators (opsd.core.estimators)
            divergence, entropy = self._estimated_divergence(h_s, s_head, h_t, t_head,
                                                             inputs["completion_ids"].reshape(-1)[rows])
            loss = (divergence * factors[rows].to(divergence.device)).sum()
        if not torch.isfinite(loss):
            if not self.args.skip_nonfinite_loss:
                raise FloatingPointError(f"Non-finite OPD loss {loss.item()} at step {self.state.global_step}.")
            warnings.warn(f"Non-finite OPD loss at step {self.state.global_step}: the optimizer step is skipped (set "
                          f"skip_nonfinite_loss=False to stop instead).", stacklevel=2)
            self._nonfinite_in_step = True
            loss, rows = hidden[..., :0].sum(), rows[:0]
            entropy = entropy[:0]
        if rows.numel() == 0:
            # No kept row here (or a skipped loss): the head's parameters would get no gradient on this rank, and
            # DDP without find_unused_parameters (TRL's default with gradient checkpointing) waits for them forever.
            # A zero term keeps every trainable head parameter in this micro-batch's graph.
            loss = loss + sum(0.0 * t.sum() for t in (s_head.weight, s_head.bias) if t is not None and t.requires_grad)
        return loss, entropy.detach().sum(), torch.tensor(rows.numel(), device=loss.device)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """The loss through the wrapped model's forward (so DDP/FSDP see it); the kept-token entropy is summed here,
        outside the wrapped forward, and logged weighted by kept tokens (a micro-batch that keeps nothing adds
        nothing, instead of a zero)."""
        unwrapped = self.accelerator.unwrap_model(model)
        loss, entropy_sum, kept = self._forward_redirection(model, unwrapped, self._compute_loss, unwrapped, inputs,
                                                            num_items_in_batch)
        totals = torch.stack([entropy_sum.float().reshape(()), kept.float().reshape(())]).to(self.accelerator.device)
        totals = self.accelerator.gather(totals.reshape(1, 2)).reshape(-1, 2).sum(0)
        self._entropy_totals["train" if self.model.training else "eval"] += totals.cpu()
        return (loss, None) if return_outputs else loss

    # ----- optimizer: skipped steps -----------------------------------------------------------------------------
    def create_optimizer(self, model=None):
        optimizer = super().create_optimizer(model) if model is not None else super().create_optimizer()
        if not getattr(optimizer, "_opsd_guarded", False):
            step = optimizer.step

            def guarded_step(*args, **kwargs):
                with self._phase("optimizer"):
                    if self._skip_this_step():
                        return None
                    return step(*args, **kwargs)

            optimizer.step, optimizer._opsd_guarded = guarded_step, True
        return optimizer

    def _skip_this_step(self) -> bool:
        """True when any micro-batch of this optimizer step, on any process, had a non-finite loss.

        A skipped step moves nothing: no weight decay, no optimizer state update (gradients are dropped). After
        `max_consecutive_skipped_steps` skipped steps in a row the run stops with an error instead of idling.
        """
        flag = torch.tensor([1.0 if self._nonfinite_in_step else 0.0], device=self.accelerator.device)
        self._nonfinite_in_step = False
        if self.accelerator.num_processes > 1:
            flag = self.accelerator.reduce(flag, reduction="sum")
        if flag.item() == 0:
            self._skipped_in_a_row = 0
            return False
        self._skipped_in_a_row += 1
        self._metrics["train"]["skipped_steps"].append(1.0)
        self.optimizer.zero_grad(set_to_none=True)
        limit = self.args.max_consecutive_skipped_steps
        if limit and self._skipped_in_a_row >= limit:
            raise FloatingPointError(
                f"{self._skipped_in_a_row} optimizer steps in a row had a non-finite OPD loss (last at step "
                f"{self.state.global_step}); the teacher or student produces NaN/inf. Check the teacher's dtype and "
                f"weights (e.g. fp16 overflow: use bfloat16/float32), or raise --max_consecutive_skipped_steps.")
        return True

    def _estimated_divergence(self, h_s, s_head, h_t, t_head, token_ids):
        from .estimators import support_divergence

        args = self.args
        divergence, entropy, empty = support_divergence(h_s, s_head, h_t, t_head, token_ids, args.loss_support,
                                                        args.loss_support_k, self.beta, self.loss_temperature,
                                                        args.loss_support_control_variate, args.chunk_size)
        if args.loss_support == "intersection":
            self._metrics["train" if self.model.training else "eval"]["loss_support/empty_fraction"].append(empty)
        return divergence, entropy

    @torch.no_grad()
    def _log_overlap_diagnostics(self, micro_batches: list[dict]) -> None:
        """Overlap diagnostics (opsd.core.diagnostics) over the tokens in the loss, for runs whose selector does not
        compute them: one no-grad student forward per micro-batch, the cached teacher states, chunked heads."""
        from .diagnostics import overlap_from_hidden, position_buckets, summarize

        student = self.accelerator.unwrap_model(self.model)
        self._teacher_phase(micro_batches)
        with whole_heads(*self._heads(student, self.accelerator.unwrap_model(self.teacher_model))) as heads:
            s_head, t_head = heads
            stats, buckets = [], []
            for mb in micro_batches:
                flat, rows, positions = valid_token_index(self._loss_mask(mb))
                in_loss = mb["loss_keep"].reshape(-1)[flat]
                buckets.append(position_buckets(rows, positions)[in_loss])  # thirds of the whole valid response
                flat = flat[in_loss]
                hidden = self._student_statistics_hidden(student, mb)
                h_t = mb["teacher_hidden"]
                stats.append(overlap_from_hidden(hidden.reshape(-1, hidden.shape[-1])[flat].to(s_head.weight.device),
                                                 s_head, h_t.reshape(-1, h_t.shape[-1])[flat].to(t_head.weight.device),
                                                 t_head, self.args.overlap_k, self.args.chunk_size, self.loss_temperature))
        merged = {name: torch.cat([s[name] for s in stats]) for name in stats[0]} if stats else {}
        for name, value in summarize(merged, torch.cat(buckets) if buckets else torch.zeros(0)).items():
            self._metrics["train"][name].append(value)

    # ----- logging ---------------------------------------------------------------------------------------------
    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        mode = "train" if self.model.training else "eval"
        entropy_sum, tokens = self._entropy_totals[mode].tolist()
        self._entropy_totals[mode].zero_()
        if tokens > 0:
            self._metrics[mode]["entropy"] = [entropy_sum / tokens]
        self._metrics[mode]["peak_memory_gb"].append(peak_memory_gb(self.accelerator.device))
        if mode == "train" and self._timed_steps:
            # per optimizer step, averaged over the steps since the last log (process CPU seconds)
            for name in TIMED_PHASES:
                self._metrics["train"][f"time/{name}"] = [self._phase_totals.get(name, 0.0) / self._timed_steps]
            self._phase_totals.clear()
            self._timed_steps = 0
        super().log(logs, start_time)


TIMED_PHASES = ("generation", "teacher", "statistics", "forward_backward", "optimizer")
# per-row tensors of a step's batch that the padding-free paths know how to reorder and trim; any other key (images,
# token_type_ids, ...) turns them off for that batch
_COMPLETION_KEYS = frozenset({"completion_ids", "completion_mask", "tool_mask", "student_hidden", "teacher_hidden",
                              "loss_keep", "loss_weights"})
_PROMPT_KEYS = frozenset({"prompt_ids", "prompt_mask"})
_ROW_KEYS = _COMPLETION_KEYS | _PROMPT_KEYS | {"sample_weights", "num_items_in_batch"}


def _fit_columns(tensor: torch.Tensor, width: int) -> torch.Tensor:
    """[B, T, ...] cut or zero-padded to [B, width, ...]."""
    if tensor.shape[1] >= width:
        return tensor[:, :width]
    pad = tensor.new_zeros(tensor.shape[0], width - tensor.shape[1], *tensor.shape[2:])
    return torch.cat([tensor, pad], dim=1)


def _sorted_by_length(batch: dict) -> dict:
    """The batch's rows sorted by real length (prompt + completion tokens), longest first, so that the micro-batch
    split groups sequences of similar length (stable: the shuffle before it orders equal lengths)."""
    lengths = batch["prompt_mask"].sum(1) + batch["completion_mask"].sum(1)
    order = torch.sort(lengths, descending=True, stable=True).indices
    out = {}
    for key, value in batch.items():
        if isinstance(value, torch.Tensor) and value.ndim >= 1:
            out[key] = value[order.to(value.device)]
        elif isinstance(value, list):
            out[key] = [value[i] for i in order.tolist()]
        else:
            out[key] = value
    return out


def _trimmed(batch: dict) -> dict:
    """A micro-batch cut to its own rectangle: prompt columns no row uses (prompts are left-padded) and completion
    columns past its longest completion (right-padded) are dropped. Other keys: the batch unchanged."""
    if not set(batch) <= _ROW_KEYS:
        return batch
    used = batch["prompt_mask"].bool().any(0)
    first = int(used.nonzero()[0]) if used.any() else batch["prompt_mask"].shape[1]
    filled = batch["completion_mask"].bool().any(0)
    width = int(filled.nonzero()[-1]) + 1 if filled.any() else 1
    out = dict(batch)
    for key in _PROMPT_KEYS:
        out[key] = batch[key][:, first:]
    for key in _COMPLETION_KEYS & set(batch):
        out[key] = batch[key][:, :width]
    return out


def _choose(selector, stats, sequence_ids, positions, generator) -> TokenChoice:
    if selector.scope != "sequence":
        return selector.choose(stats, sequence_ids, positions, generator)
    keep = torch.zeros(sequence_ids.numel(), dtype=torch.bool, device=sequence_ids.device)
    weights, score, metrics = None, None, {}
    sequences = torch.unique(sequence_ids)
    for seq in sequences:
        idx = (sequence_ids == seq).nonzero(as_tuple=True)[0]
        part = selector.choose({k: v[idx] for k, v in stats.items()}, sequence_ids[idx], positions[idx], generator)
        keep[idx] = part.keep.to(keep.device)
        if part.weights is not None:
            weights = torch.zeros(keep.shape, dtype=torch.float32, device=keep.device) if weights is None else weights
            weights[idx] = part.weights.to(weights.device, torch.float32)
        if part.score is not None:
            score = torch.zeros(keep.shape, dtype=torch.float32, device=keep.device) if score is None else score
            score[idx] = part.score.to(score.device, torch.float32)
        for name, value in part.metrics.items():  # per-sequence metrics: averaged over the sequences
            metrics[name] = metrics.get(name, 0.0) + value / len(sequences)
    return TokenChoice(keep, weights, metrics, score)
