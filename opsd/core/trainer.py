"""OPDTrainer: memory-efficient on-policy distillation as a subclass of TRL's DistillationTrainer.

One optimizer step, top to bottom (see ../shared/DESIGN.md and patches/README.md):
1. `_prepare_inputs`: the student samples completions for the generation batch (TRL's generation, HF or vLLM),
   optional reward weights, shuffle and split into gradient-accumulation micro-batches.
2. `_select_tokens` (THE place a token's keep mask is decided): with a selector, a no-grad pass computes the
   student's and the teacher's hidden states at the valid completion positions (the teacher's are cached, so the
   teacher runs once per step), the selector turns them into per-token statistics and a keep mask per scope; then
   per-token loss factors are built for the configured normalization. Without a selector: keep every valid token.
3. `_compute_loss` (per micro-batch, inside the DDP/FSDP-wrapped forward): student backbone with grad, only kept
   rows go through the lm_heads and the divergence (`opsd.core.losses.per_token_divergence`), loss = sum f_t * l_t.
"""

from __future__ import annotations

import resource
import warnings

import torch
from trl import DistillationTrainer
from trl.trainer.utils import (
    RepeatSampler,
    shuffle_sequence_dict,
    split_pixel_values_by_grid,
    split_tensor_dict,
    unsplit_pixel_values_by_grid,
)

from .config import OPDConfig
from .heads import LMHead, head_of
from .losses import per_token_divergence
from .models import load_causal_lm, resolve_distill_vocab
from .selection import SCOPES, TokenChoice, TokenSelector, TokenView, loss_weights, valid_token_index


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


def peak_memory_gb(device: torch.device) -> float:
    """CUDA max allocated on GPU, else the process peak RSS (Linux reports KiB)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


class OPDTrainer(DistillationTrainer):
    """Full-token OPD (no selector) or OPD on the tokens a `TokenSelector` keeps.

    Args beyond TRL's: `token_selector` (see opsd.core.selection); `reward_fn(completion_text, answer) -> float` for
    upstream's reward weighting w_i = n * softmax(r_i / reward_beta) over the whole generation batch (all processes);
    `teacher_tokenizer` (checked against the student's).
    """

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
        if args.teacher_offload:
            if self.is_deepspeed_enabled or self.is_fsdp_enabled:
                raise ValueError("teacher_offload is for single-process/DDP runs; with DeepSpeed ZeRO-3 or FSDP the "
                                 "teacher is sharded instead (see run_scripts/accelerate/).")
            self._place_teacher(torch.device("cpu"))
        self.token_selector = token_selector
        if reward_fn is None and args.reward_beta and args.reward_beta > 0 and args.reward_function:
            from ..reward import get_reward_fn

            reward_fn = get_reward_fn(args.reward_function)
        self.reward_fn = reward_fn

    # ----- data -----------------------------------------------------------------------------------------------
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
            mask = self._loss_mask(batch).float()
            batch["loss_weights"] = mask / mask.sum().clamp_min(1.0)  # evaluation: full-token mean
            return batch
        accumulation = self.args.gradient_accumulation_steps
        if self._step % accumulation == 0 or self._buffered_inputs is None:
            batch = self._generate_and_score_completions(generation_batch)
            if self.reward_fn is not None:
                batch["sample_weights"] = self._reward_weights(generation_batch, batch)
            batch = shuffle_sequence_dict(split_pixel_values_by_grid(batch))
            micro_batches = [unsplit_pixel_values_by_grid(b) for b in split_tensor_dict(batch, accumulation)]
            self._select_tokens(micro_batches)
            self._buffered_inputs = micro_batches
        return self._buffered_inputs[self._step % accumulation]

    def _reward_weights(self, inputs, batch) -> torch.Tensor:
        """Per-sample weights n * softmax(r / reward_beta) over the generation batch of all processes."""
        from .weighting import reward_weights

        if "answer" not in inputs[0]:
            raise ValueError("Reward weighting needs an `answer` column in the prompt file.")
        completions = self.processing_class.batch_decode(batch["completion_ids"], skip_special_tokens=True)
        rewards = torch.tensor([float(self.reward_fn(c, x["answer"])) for c, x in zip(completions, inputs)],
                               device=self.accelerator.device)
        all_rewards = self.accelerator.gather(rewards)
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
        hidden = self._forward_redirection(self.teacher_model, unwrapped_teacher, self._get_last_hidden_state,
                                           unwrapped_teacher, *self._model_inputs(batch))
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

        Writes `loss_weights` [B, C] (and `teacher_hidden` when a statistics pass ran) into each micro-batch.
        """
        selector = self.token_selector
        masks = [self._loss_mask(mb) for mb in micro_batches]
        keeps, weights = masks, [None] * len(masks)
        if self.args.teacher_offload or (selector is not None and selector.needs_model_pass):
            self._teacher_phase(micro_batches)
        if selector is not None:
            keeps, weights = self._run_selector(selector, micro_batches, masks)
        weights = [w if "sample_weights" not in mb else (1.0 if w is None else w) * mb["sample_weights"][:, None]
                   for w, mb in zip(weights, micro_batches)]
        factors = loss_weights(keeps, weights, masks, self.args.loss_normalization, self.accelerator.num_processes,
                               self._all_reduce_sum)
        for mb, factor in zip(micro_batches, factors):
            mb["loss_weights"] = factor
        kept = self._all_reduce_sum(sum(k.sum() for k in keeps))
        valid = self._all_reduce_sum(sum(m.sum() for m in masks))
        self._metrics["train"]["kept_fraction"].append((kept / valid.clamp_min(1)).item())
        self._metrics["train"]["kept_tokens"].append(kept.item())
        if self.args.overlap_diagnostics and not getattr(selector, "logs_overlap", False):
            self._log_overlap_diagnostics(micro_batches)

    def _run_selector(self, selector, micro_batches, masks):
        student = self.accelerator.unwrap_model(self.model)
        teacher = self.accelerator.unwrap_model(self.teacher_model)
        s_head, t_head = self._heads(student, teacher)
        s_head = LMHead(s_head.weight.detach(), None if s_head.bias is None else s_head.bias.detach(),
                        s_head.scale, s_head.softcap, s_head.vocab_size)
        # sequence ids unique across the step's micro-batches and across processes (equal per-device batches)
        offset = self.accelerator.process_index * sum(mask.shape[0] for mask in masks)
        views, stats, flats = [], [], []
        for mb, mask in zip(micro_batches, masks):
            flat, rows, positions = valid_token_index(mask)
            flats.append(flat)
            view = TokenView(token_ids=mb["completion_ids"].reshape(-1)[flat], sequence_ids=rows + offset,
                             positions=positions, temperature=self.temperature)
            offset += mask.shape[0]
            if selector.needs_model_pass:
                hidden = self._get_last_hidden_state(student, *self._model_inputs(mb))
                view.student_hidden = hidden.reshape(-1, hidden.shape[-1])[flat].to(s_head.weight.device)
                view.teacher_hidden = mb["teacher_hidden"].reshape(-1, mb["teacher_hidden"].shape[-1])[flat].to(
                    t_head.weight.device)
                view.student_head, view.teacher_head = s_head, t_head
            views.append(view)
            stats.append(selector.statistics(view))

        groups = {"rollout_batch": [list(range(len(views)))], "micro_batch": [[i] for i in range(len(views))],
                  "sequence": [[i] for i in range(len(views))]}[selector.scope]
        generator = torch.Generator().manual_seed(self.args.seed * 1_000_003 + self.state.global_step)
        choices: list[TokenChoice | None] = [None] * len(views)
        for group in groups:
            choice, sizes = self._choose_group(selector, [views[i] for i in group], [stats[i] for i in group],
                                               generator)
            for i, part in zip(group, _split_choice(choice, sizes)):
                choices[i] = part
            for name, value in choice.metrics.items():
                self._metrics["train"][name].append(value)

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

    def _choose_group(self, selector, views, stats, generator):
        """Run the selector's rule on one group, gathered from every process when asked; return this process's
        part and the sizes of the group's micro-batches."""
        sizes = [v.sequence_ids.numel() for v in views]
        names = sorted(stats[0]) if stats else []
        local = {name: torch.cat([s[name].float() for s in stats]) for name in names}
        seq = torch.cat([v.sequence_ids for v in views])
        pos = torch.cat([v.positions for v in views])
        device = self.accelerator.device
        if selector.across_processes and self.accelerator.num_processes > 1:
            seq_all, start = self._gather_rows(seq.to(device))
            pos_all, _ = self._gather_rows(pos.to(device))
            all_stats = {name: self._gather_rows(local[name].to(device))[0] for name in names}
            choice = _choose(selector, all_stats, seq_all, pos_all, generator)
            n = seq.numel()
            part = slice(start, start + n)
            choice = TokenChoice(choice.keep[part], None if choice.weights is None else choice.weights[part],
                                 choice.metrics, None if choice.score is None else choice.score[part])
        else:
            choice = _choose(selector, local, seq, pos, generator)
        return choice, sizes

    # ----- loss ------------------------------------------------------------------------------------------------
    def _compute_loss(self, unwrapped_student, inputs, num_items_in_batch=None):
        input_ids, attention_mask, logits_to_keep = self._model_inputs(inputs)
        hidden = self._get_last_hidden_state(unwrapped_student, input_ids, attention_mask, logits_to_keep)
        factors = inputs["loss_weights"].reshape(-1)
        rows = (factors != 0).nonzero(as_tuple=True)[0]
        teacher_hidden = inputs.get("teacher_hidden")
        if teacher_hidden is None:
            teacher_hidden = self._teacher_hidden(inputs)
        unwrapped_teacher = self.accelerator.unwrap_model(self.teacher_model)
        s_head, t_head = self._heads(unwrapped_student, unwrapped_teacher)
        h_s = hidden.reshape(-1, hidden.shape[-1])[rows].to(s_head.weight.device)
        h_t = teacher_hidden.reshape(-1, teacher_hidden.shape[-1])[rows].to(t_head.weight.device)
        if self.args.loss_support == "full":
            divergence, entropy = per_token_divergence(h_s, s_head, h_t, t_head, self.beta, self.temperature,
                                                       self.args.divergence_backend, self.args.chunk_size)
        else:  # top-k / sampled-token estimators (opsd.core.estimators)
            divergence, entropy = self._estimated_divergence(h_s, s_head, h_t, t_head,
                                                             inputs["completion_ids"].reshape(-1)[rows])
        loss = (divergence * factors[rows].to(divergence.device)).sum()
        if not torch.isfinite(loss):
            if not self.args.skip_nonfinite_loss:
                raise FloatingPointError(f"Non-finite OPD loss {loss.item()} at step {self.state.global_step}.")
            warnings.warn(f"Non-finite OPD loss at step {self.state.global_step}: this micro-batch contributes a zero "
                          f"gradient (set skip_nonfinite_loss=False to stop instead).", stacklevel=2)
            self._metrics["train"]["nonfinite_skipped"].append(1.0)
            loss = hidden[..., :0].sum()  # zero loss, zero (finite) gradient, graph still connected
        return loss, entropy.detach().sum(), torch.tensor(rows.numel(), device=loss.device)

    def _estimated_divergence(self, h_s, s_head, h_t, t_head, token_ids):
        from .estimators import support_divergence

        args = self.args
        divergence, entropy, empty = support_divergence(h_s, s_head, h_t, t_head, token_ids, args.loss_support,
                                                        args.loss_support_k, self.beta, self.temperature,
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
        s_head, t_head = self._heads(student, self.accelerator.unwrap_model(self.teacher_model))
        self._teacher_phase(micro_batches)
        stats, buckets = [], []
        for mb in micro_batches:
            flat, rows, positions = valid_token_index(self._loss_mask(mb))
            in_loss = mb["loss_weights"].reshape(-1)[flat] != 0
            buckets.append(position_buckets(rows, positions)[in_loss])  # thirds of the whole valid response
            flat = flat[in_loss]
            hidden = self._get_last_hidden_state(student, *self._model_inputs(mb))
            h_t = mb["teacher_hidden"]
            stats.append(overlap_from_hidden(hidden.reshape(-1, hidden.shape[-1])[flat].to(s_head.weight.device),
                                             s_head, h_t.reshape(-1, h_t.shape[-1])[flat].to(t_head.weight.device),
                                             t_head, self.args.overlap_k, self.args.chunk_size, self.temperature))
        merged = {name: torch.cat([s[name] for s in stats]) for name in stats[0]} if stats else {}
        for name, value in summarize(merged, torch.cat(buckets) if buckets else torch.zeros(0)).items():
            self._metrics["train"][name].append(value)

    # ----- logging ---------------------------------------------------------------------------------------------
    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        mode = "train" if self.model.training else "eval"
        self._metrics[mode]["peak_memory_gb"].append(peak_memory_gb(self.accelerator.device))
        super().log(logs, start_time)


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


def _split_choice(choice: TokenChoice, sizes: list[int]) -> list[TokenChoice]:
    keeps = torch.split(choice.keep, sizes)
    weights = [None] * len(sizes) if choice.weights is None else torch.split(choice.weights, sizes)
    scores = [None] * len(sizes) if choice.score is None else torch.split(choice.score, sizes)
    return [TokenChoice(k, w, score=s) for k, w, s in zip(keeps, weights, scores)]

