"""CPU distillation lab: synthetic tasks with tiny Qwen2 teachers and students, the study and the diagnostic.

`lab.tasks` is the task interface every part of the lab uses (`Task`, `register_task`, the built-in tasks:
`addition`, the scratchpad addition of `lab.addition` with a correction token, and `reverse_sum`); `lab.models`
trains, caches and evaluates each task's teacher and warm-started student; `lab.study` runs the comparisons; `lab.diagnose` the
fixed-context diagnostic.
"""

from .addition import (
    CORRECTION,
    TaskConfig,
    answer,
    apply_corrections,
    build_tokenizer,
    error_positions,
    is_correct,
    make_prompts,
    read_prompt_file,
    solution,
    teacher_training_text,
    write_prompt_file,
)
from .tasks import TASKS, AdditionTask, ReverseSumTask, Task, get_task, register_task
from .models import (
    CalibrationError,
    LabConfig,
    ModelSize,
    default_lab_config,
    error_position_stats,
    evaluate_exact_match,
    heldout_kl,
    load_lab_models,
    prepare_lab_models,
    recovery_rate,
    train_teacher,
    warm_start_student,
)

__all__ = [
    "TASKS", "AdditionTask", "ReverseSumTask", "Task", "get_task", "register_task",
    "CORRECTION", "TaskConfig", "answer", "apply_corrections", "build_tokenizer", "error_positions", "is_correct",
    "make_prompts", "read_prompt_file", "solution", "teacher_training_text", "write_prompt_file",
    "CalibrationError", "LabConfig", "ModelSize", "default_lab_config", "error_position_stats", "evaluate_exact_match", "heldout_kl", "load_lab_models",
    "prepare_lab_models", "recovery_rate", "train_teacher", "warm_start_student",
]
