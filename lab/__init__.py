"""CPU distillation lab: a synthetic addition task with a correction token, and tiny Qwen2 teacher/student.

`lab.task` defines the task (prompts, canonical solutions, corrupted teacher data, answer checking, the known
Q3 positions); `lab.models` trains, caches and evaluates the teacher and the warm-started student.
"""

from .task import (
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
from .models import (
    LabConfig,
    ModelSize,
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
    "CORRECTION", "TaskConfig", "answer", "apply_corrections", "build_tokenizer", "error_positions", "is_correct",
    "make_prompts", "read_prompt_file", "solution", "teacher_training_text", "write_prompt_file",
    "LabConfig", "ModelSize", "error_position_stats", "evaluate_exact_match", "heldout_kl", "load_lab_models",
    "prepare_lab_models", "recovery_rate", "train_teacher", "warm_start_student",
]
