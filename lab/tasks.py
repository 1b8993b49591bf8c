"""The lab's task interface and its built-in tasks.

A `Task` is everything the lab's model preparation, study, selector probe, held-out KL and diagnostic need to know
about a synthetic task; none of them reads a task module directly:

| member                         | what it is                                                                       |
|--------------------------------|----------------------------------------------------------------------------------|
| name, regime                   | registry name and one line on what the task represents                           |
| characters, correction         | the vocabulary's characters (one token each, after the specials); the repair     |
|                                | token the teacher was trained to emit, or None (a teacher with no new ability)   |
| build_tokenizer, encode        | the character tokenizer (pad / eos / unk ids via `pad_id`, `eos_id`)             |
| make_prompts(n, seed, split)   | deterministic prompts of the train or eval split                                 |
| solution(prompt)               | the canonical completion (text, no EOS)                                          |
| is_correct(prompt, text)       | the scorer (corrections applied when the task has a correction token)            |
| teacher_example / student_example(prompt, rng) | (tokens, loss mask) of one training completion, EOS included     |
| wrong_token(rng, right)        | a plausible mistake for a position whose right token is `right`, or None         |
| positions_of_interest(prompt, ids, tokenizer) | the known positions a good selector should find, or None         |
| max_new_tokens, max_positions  | generation budget and the models' position table size                            |
| to_dict / from_dict            | the settings that shape the cached models                                        |

Known positions: `first_mistake_positions` marks, for a task with a correction token, the token right after the
student's first unrepaired mistake (where the teacher says the correction: the Q3 construction); for a task without
one, the mistaken token itself (where the teacher puts little mass on what the student wrote).

Adding a task: subclass `Task`, give it a config dataclass and call `register_task(MyTask, lab_settings={...})`
(model sizes, steps and the warm start's target live in the registration; `lab.models.default_lab_config` reads
them). A module kept outside the repository that does so is loaded with `--task_module my_tasks` by `lab.study`,
`lab.diagnose` and `lab.scenarios`. A teacher with a different scratchpad order ("incompatible thinking
pattern") is a task whose `teacher_example` writes another order than `student_example`; `positions_of_interest`
may then return None (nothing is known by construction) and every part of the lab still runs. `addition_swapped`
is one; it is registered with `study=False` (lab.scenarios uses it), so the study does not run it by default.
`REGISTRY` is the one registry; `TASKS` (the study's tasks) and `KNOWN_TASKS` (all) are live views of it.
"""

from __future__ import annotations

import random
import zlib
from dataclasses import asdict, dataclass, fields
from typing import Callable, Mapping, Sequence

from . import addition

PAD_TOKEN, EOS_TOKEN, UNK_TOKEN = addition.PAD_TOKEN, addition.EOS_TOKEN, addition.UNK_TOKEN
SPECIAL_TOKENS = (PAD_TOKEN, EOS_TOKEN, UNK_TOKEN)


def char_tokenizer(characters: str, save_dir=None, max_length: int = 256):
    """Character tokenizer over SPECIAL_TOKENS + `characters` (ids in that order), left padding."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + tuple(characters))}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK_TOKEN))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    core.decoder = decoders.Fuse()
    core.add_special_tokens(list(SPECIAL_TOKENS))
    tok = PreTrainedTokenizerFast(tokenizer_object=core, pad_token=PAD_TOKEN, eos_token=EOS_TOKEN,
                                  unk_token=UNK_TOKEN, padding_side="left", clean_up_tokenization_spaces=False,
                                  model_max_length=max_length)
    if save_dir is not None:
        tok.save_pretrained(str(save_dir))
    return tok


def _split_of(prompt: str, eval_fraction: float) -> str:
    return "eval" if zlib.crc32(prompt.encode()) < eval_fraction * 2**32 else "train"


def first_mistake_positions(target: Sequence[str], tokens: Sequence[str | None], correction: str | None) -> list[bool]:
    """Known positions of a completion given as tokens (EOS as EOS_TOKEN, pad as None) against `target` (the
    canonical completion's tokens, EOS included). See the module docstring for what is marked."""
    marks = [False] * len(tokens)
    prefix: list[str] = []
    consistent, ended = True, False
    for t, tok in enumerate(tokens):
        if ended or tok is None:
            continue
        if correction is not None:  # mark the position after the mistake (where the repair belongs)
            now = len(prefix) <= len(target) and prefix == list(target[: len(prefix)])
            if t > 0 and consistent and not now:
                marks[t] = True
            consistent = now
            if tok == correction:
                if prefix:
                    prefix.pop()
            else:
                prefix.append(tok)
        else:  # mark the first wrong token itself
            if consistent and (len(prefix) >= len(target) or tok != target[len(prefix)]):
                marks[t] = True
                consistent = False
            prefix.append(tok)
        if tok == EOS_TOKEN:
            ended = True
    return marks


class Task:
    """Interface (see the module docstring). Subclasses set `name`, `regime`, `characters`, `correction`,
    `config_class` and implement the prompt / solution / example methods."""

    name = ""
    regime = ""
    characters = ""
    correction: str | None = None
    config_class = None

    def __init__(self, config=None):
        self.config = config if config is not None else self.config_class()
        self.vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + tuple(self.characters))}
        self.pad_id, self.eos_id, self.unk_id = (self.vocab[t] for t in SPECIAL_TOKENS)
        self.correction_id = self.vocab[self.correction] if self.correction else None

    # vocabulary
    def build_tokenizer(self, save_dir=None):
        return char_tokenizer(self.characters, save_dir)

    def encode(self, text: str) -> list[int]:
        return [self.vocab.get(ch, self.unk_id) for ch in text]

    def token_strings(self, ids: Sequence[int], tokenizer=None) -> list[str | None]:
        """Completion ids as tokens: EOS_TOKEN for EOS, None for pad, else the character."""
        inverse = {i: t for t, i in self.vocab.items()}
        pad, eos = (tokenizer.pad_token_id, tokenizer.eos_token_id) if tokenizer is not None else (self.pad_id,
                                                                                                   self.eos_id)
        return [EOS_TOKEN if int(i) == eos else None if int(i) == pad else inverse.get(int(i), UNK_TOKEN)
                for i in ids]

    # settings
    def to_dict(self) -> dict:
        return {"name": self.name, **asdict(self.config)}

    @classmethod
    def from_dict(cls, d: dict) -> "Task":
        known = {f.name for f in fields(cls.config_class)}
        return cls(cls.config_class(**{k: v for k, v in d.items() if k in known}))

    # to implement
    def sample_prompt(self, rng: random.Random, split: str | None = "train") -> str:
        raise NotImplementedError

    def make_prompts(self, n: int, seed: int | None = None, split: str | None = "train") -> list[str]:
        """`n` distinct prompts of `split` (deterministic given the task settings and `seed`)."""
        if split not in ("train", "eval", None):
            raise ValueError(f"split must be 'train', 'eval' or None, got {split!r}")
        rng = random.Random(f"prompts/{self.name}/{getattr(self.config, 'seed', 0) if seed is None else seed}/{split}")
        out, seen = [], set()
        for _ in range(100 * n + 1000):
            if len(out) == n:
                break
            p = self.sample_prompt(rng, split)
            if p not in seen:
                seen.add(p)
                out.append(p)
        if len(out) < n:
            raise ValueError(f"task {self.name!r} has fewer than {n} distinct {split} prompts")
        return out

    def solution(self, prompt: str) -> str:
        raise NotImplementedError

    def is_correct(self, prompt: str, text: str, strict: bool = False) -> bool:
        """Whether the decoded completion `text` (special tokens skipped) solves `prompt`; `strict` also checks
        the scratchpad where the task distinguishes the two."""
        raise NotImplementedError

    def teacher_example(self, prompt: str, rng: random.Random) -> tuple[list[str], list[bool]]:
        raise NotImplementedError

    def student_example(self, prompt: str, rng: random.Random) -> tuple[list[str], list[bool]]:
        tokens = list(self.solution(prompt)) + [EOS_TOKEN]
        return tokens, [True] * len(tokens)

    def wrong_token(self, rng: random.Random, right: str) -> str | None:
        return None

    @property
    def max_new_tokens(self) -> int:
        raise NotImplementedError

    @property
    def max_positions(self) -> int:
        return 64

    def positions_of_interest(self, prompt: str, completion_ids: Sequence[int], tokenizer=None) -> list[bool] | None:
        target = list(self.solution(prompt)) + [EOS_TOKEN]
        return first_mistake_positions(target, self.token_strings(completion_ids, tokenizer), self.correction)

    def token_ids(self, tokens: Sequence[str]) -> list[int]:
        return [self.vocab[t] for t in tokens]


class AdditionTask(Task):
    """`lab.addition`: column addition with a scratchpad; the teacher learned a correction token "<"."""

    name = "addition"
    regime = ("every token depends on the previous carry (mistakes compound); the teacher has a new capability, "
              "the repair token '<', which the student never saw")
    characters = addition.CHARACTERS
    correction = addition.CORRECTION
    config_class = addition.TaskConfig

    def sample_prompt(self, rng, split="train"):
        return addition.sample_prompt(rng, self.config, split)

    def make_prompts(self, n, seed=None, split="train"):
        return addition.make_prompts(n, self.config, seed, split)

    def solution(self, prompt):
        return addition.solution(prompt)

    def is_correct(self, prompt, text, strict=False):
        return addition.is_correct(prompt, text, strict)

    def teacher_example(self, prompt, rng):
        tokens, train = addition.teacher_training_example(prompt, rng, self.config)
        return tokens, train

    def student_example(self, prompt, rng):
        return addition.corrupted_completion(prompt, rng, self.config.student_error_rate)

    def wrong_token(self, rng, right):
        return addition._wrong_token(rng, right) if right in addition.DIGITS else None

    def positions_of_interest(self, prompt, completion_ids, tokenizer=None):
        return addition.error_positions(prompt, list(completion_ids), tokenizer)

    @property
    def max_new_tokens(self):
        return addition.max_completion_chars(self.config)


@dataclass
class ReverseSumConfig:
    """Settings of the reverse-and-running-sum task.

    digits: length of the digit string of every prompt.
    eval_fraction: share of the prompt space reserved for evaluation (a stable hash of the prompt text).
    seed: default seed for prompt drawing.
    """

    digits: int = 6
    eval_fraction: float = 0.1
    seed: int = 0

    def __post_init__(self):
        if not 2 <= self.digits <= 10:
            raise ValueError(f"digits must be in 2..10, got {self.digits}")
        if not 0.0 < self.eval_fraction < 1.0:
            raise ValueError(f"eval_fraction must be in (0, 1), got {self.eval_fraction}")


class ReverseSumTask(Task):
    """Reverse a digit string, then write the running sum (mod 10) of the reversed digits.

    ``"382719="`` -> ``"917283|907970"`` + EOS: the first half is a copy (easy: a warm-started student is almost
    always right and confident there, so the student's top-K holds the teacher's choice, support mass ~1), the second
    half is a chain s_k = (s_{k-1} + r_k) mod 10 where mistakes happen and compound. The teacher is the same kind of
    model, only better trained: no correction token, no new capability.
    """

    name = "reverse_sum"
    regime = ("half the tokens are easy copies the student already gets right (support mass ~1 almost everywhere), "
              "mistakes fall in a running-sum chain; the teacher has no new capability, only accuracy")
    characters = addition.DIGITS + "=|"
    correction = None
    config_class = ReverseSumConfig

    def sample_prompt(self, rng, split="train"):
        for _ in range(100_000):
            p = "".join(rng.choice(addition.DIGITS) for _ in range(self.config.digits)) + "="
            if split is None or _split_of(p, self.config.eval_fraction) == split:
                return p
        raise RuntimeError(f"could not draw a {split!r} prompt; check eval_fraction")

    def solution(self, prompt):
        digits = prompt.strip().rstrip("=")
        if len(digits) != self.config.digits or not digits.isdigit():
            raise ValueError(f"not a {self.config.digits}-digit reverse_sum prompt: {prompt!r}")
        rev = digits[::-1]
        sums, s = [], 0
        for ch in rev:
            s = (s + int(ch)) % 10
            sums.append(str(s))
        return rev + "|" + "".join(sums)

    def is_correct(self, prompt, text, strict=False):
        cut = text.split(EOS_TOKEN)[0].replace(PAD_TOKEN, "").strip()
        return cut == self.solution(prompt)

    def teacher_example(self, prompt, rng):
        return self.student_example(prompt, rng)

    def wrong_token(self, rng, right):
        return rng.choice([d for d in addition.DIGITS if d != right]) if right in addition.DIGITS else None

    @property
    def max_new_tokens(self):
        return 2 * self.config.digits + 2 + 2  # completion, EOS and 2 tokens of slack


class SwappedScratchpadTask(AdditionTask):
    """Addition whose teacher thinks in another order: every scratchpad column is written carry first, then the
    sum digit (``"473+859="`` -> teacher ``"12,13,13:1332"``, student ``"21,31,31:1332"``).

    The student's warm start (`student_example`) is the usual addition one; only the teacher's training data
    (`teacher_example`, with the usual injected errors and ``"<"`` repairs) uses the swapped order. Both orders give
    the same final answer, so `is_correct` (answer only) scores either; ``strict`` accepts either scratchpad. At the
    student's own states the teacher expects a carry where the student writes a digit and vice versa: the
    Rethinking-OPD paper's "incompatible thinking pattern" (lab.scenarios). Known positions: none by construction.
    """

    name = "addition_swapped"
    regime = ("the teacher writes every scratchpad column carry-then-digit, the student digit-then-carry: "
              "incompatible thinking patterns with the same answers")

    def teacher_solution(self, prompt: str) -> str:
        cols = addition.solution(prompt).split(addition.ANSWER_SEP)[0].split(addition.COLUMN_SEP)
        return (addition.COLUMN_SEP.join(c[::-1] for c in cols) + addition.ANSWER_SEP + addition.answer(prompt))

    def teacher_example(self, prompt, rng):
        rate = self.config.error_rate if self.config.corrections else 0.0
        tokens, train = [], []
        for right in list(self.teacher_solution(prompt)) + [EOS_TOKEN]:
            if rate > 0 and rng.random() < rate:  # the usual injected mistake and its repair (no loss on it)
                tokens += [addition._wrong_token(rng, right), self.correction]
                train += [False, True]
            tokens.append(right)
            train.append(True)
        return tokens, train

    def is_correct(self, prompt, text, strict=False):
        if not strict:
            return addition.is_correct(prompt, text)
        done = addition.apply_corrections(addition._strip_eos(text).replace(PAD_TOKEN, "")).strip()
        return done in (addition.solution(prompt), self.teacher_solution(prompt))

    def positions_of_interest(self, prompt, completion_ids, tokenizer=None):
        return None


# ------------------------------------------------------------------------------------------------- registry
@dataclass
class TaskEntry:
    """One registered task: its class, the settings of its teacher and student (`lab_settings`: LabConfig fields
    other than `task` and `task_name`, e.g. model sizes, steps, the warm start's target), whether the study runs it
    by default (`study`), and optionally its own model preparation (`prepare(cache_dir, lab_config, force,
    progress) -> dict` shaped like `lab.models.prepare_lab_models`' result, for a task whose models are not trained
    by the lab, e.g. real checkpoints)."""

    cls: type
    lab_settings: dict
    study: bool = True
    prepare: Callable | None = None


# The one registry: `register_task` writes it, everything else reads it (lab.models, lab.study, lab.scenarios,
# lab.diagnose); nothing copies it.
REGISTRY: dict[str, TaskEntry] = {}


def register_task(cls: type, *, lab_settings: dict | None = None, study: bool = True,
                  prepare: Callable | None = None, replace: bool = False) -> type:
    """Register a `Task` subclass under `cls.name` (usable as a class decorator via functools.partial or directly).

    lab_settings: the task's teacher / student settings (any `lab.models.LabConfig` field except `task` and
        `task_name`; unspecified fields keep LabConfig's defaults). These are what `default_lab_config(name)` returns.
    study: run it in `python -m lab.study` by default (False: a scenario-only task, still usable by name).
    prepare: optional replacement for the lab's own teacher training and student warm start (see `TaskEntry`).
    replace: allow re-registering an existing name (otherwise an error).
    """
    if not (isinstance(cls, type) and issubclass(cls, Task)):
        raise TypeError(f"register_task needs a Task subclass, got {cls!r}")
    if not cls.name or not isinstance(cls.name, str):
        raise ValueError(f"{cls.__name__} has no name: set the class attribute `name`")
    if cls.config_class is None:
        raise ValueError(f"task {cls.name!r} has no config_class (a dataclass of its settings)")
    if cls.name in REGISTRY and not replace and REGISTRY[cls.name].cls is not cls:
        raise ValueError(f"task {cls.name!r} is already registered (by {REGISTRY[cls.name].cls.__module__}."
                         f"{REGISTRY[cls.name].cls.__qualname__}); pass replace=True to override it")
    bad = sorted(set(lab_settings or {}) & {"task", "task_name"})
    if bad:
        raise ValueError(f"lab_settings of task {cls.name!r} may not set {bad}: they come from the registration")
    REGISTRY[cls.name] = TaskEntry(cls, dict(lab_settings or {}), study, prepare)
    return cls


def task_entry(name: str) -> TaskEntry:
    if name not in REGISTRY:
        raise ValueError(f"unknown task {name!r}; registered tasks: {sorted(REGISTRY)} (register one with "
                         "lab.tasks.register_task, e.g. from a module given as --task_module)")
    return REGISTRY[name]


def study_task_names() -> list[str]:
    """The tasks `python -m lab.study` runs by default, in registration order."""
    return [n for n, e in REGISTRY.items() if e.study]


class _RegistryView(Mapping):
    """Read-only name -> Task class view of the registry (live: a task registered later appears)."""

    def __init__(self, study_only: bool):
        self._study_only = study_only

    def _names(self):
        return [n for n, e in REGISTRY.items() if e.study or not self._study_only]

    def __getitem__(self, name):
        if name not in self._names():
            raise KeyError(name)
        return REGISTRY[name].cls

    def __iter__(self):
        return iter(self._names())

    def __len__(self):
        return len(self._names())

    def __repr__(self):
        return f"{{{', '.join(self._names())}}}"


# Views, not copies: `TASKS` = the study's tasks, `KNOWN_TASKS` = every registered task.
TASKS: Mapping[str, type[Task]] = _RegistryView(study_only=True)
KNOWN_TASKS: Mapping[str, type[Task]] = _RegistryView(study_only=False)

# The built-in tasks and their calibrated teacher / student settings (LabConfig's defaults are the addition ones).
register_task(AdditionTask, lab_settings={})
# reverse_sum: 300 teacher steps were not enough (exact match 0.28, loss 0.26; 600 steps: 1.0). The student's dev
# exact match jumped from 0.0 at step 100 to 0.49 at step 200 (checks every 10 steps from 200 on stopped it at 0.54
# held-out, and all-token OPD then reached 1.0 in 40 steps: no room to compare rules), so it is checked every 2 steps
# from 120 on against a lower target.
register_task(ReverseSumTask, lab_settings=dict(teacher_steps=600, student_steps=800, student_target_em=0.15,
                                                student_check_every=2, student_min_steps=120))
# addition_swapped: the addition lab's sizes and steps; only the teacher's order differs. Scenario-only (lab.scenarios).
register_task(SwappedScratchpadTask, lab_settings={}, study=False)


def import_task_modules(modules) -> None:
    """Import user modules that call `register_task` (`--task_module`); a missing module is a ValueError."""
    import importlib

    for name in modules or ():
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as err:
            if err.name and name.startswith(err.name):
                raise ValueError(f"--task_module {name!r}: no such module (is its directory on PYTHONPATH or the "
                                 "current directory?)") from None
            raise


def get_task(name: str | Task, config: dict | None = None) -> Task:
    """A task instance by registry name (a Task passes through); `config` overrides its settings."""
    if isinstance(name, Task):
        return name
    if not isinstance(name, str):
        raise ValueError(f"get_task needs a task name or a Task, got {name!r}")
    cls = task_entry(name).cls
    return cls.from_dict(config) if config else cls()
