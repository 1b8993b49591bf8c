"""Loading student and teacher models and tokenizers from local paths, and checking they can be distilled.

Everything loads from a local directory (nothing is downloaded): a missing path fails at once with the fix.
"""

from __future__ import annotations

import importlib.util
import os

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from .heads import weight_rows

DTYPES = {"auto": "auto", "float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def check_local_path(path: str, what: str) -> str:
    if path is None or not os.path.isdir(path):
        raise FileNotFoundError(
            f"{what} not found at {path!r}: pass a local directory written by save_pretrained (config.json + "
            f"weights). This project never downloads weights; set MODEL_PATH / TEACHER_MODEL_PATH to local copies."
        )
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"{what} at {path!r} has no config.json: is it a save_pretrained directory?")
    return path


def default_attn_implementation(device_type: str | None = None) -> str:
    """flash_attention_2 where the package is installed and a CUDA device is used, else sdpa."""
    device_type = device_type or ("cuda" if torch.cuda.is_available() else "cpu")
    if device_type == "cuda" and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


def resolve_dtype(dtype):
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"Unknown dtype {dtype!r}; choose one of {sorted(DTYPES)}.")
    return DTYPES[dtype]


def load_causal_lm(path: str, dtype="float32", attn_implementation: str | None = None, what: str = "Model",
                   **kwargs):
    """A causal LM from a local save_pretrained directory (`kwargs` go to from_pretrained, e.g.
    quantization_config or device_map)."""
    check_local_path(path, what)
    attn = attn_implementation or default_attn_implementation()
    try:
        return AutoModelForCausalLM.from_pretrained(path, dtype=resolve_dtype(dtype), attn_implementation=attn,
                                                    **kwargs)
    except (ImportError, ValueError) as err:
        if attn == "flash_attention_2" and attn_implementation is None:  # installed but unusable: fall back
            return AutoModelForCausalLM.from_pretrained(path, dtype=resolve_dtype(dtype), attn_implementation="sdpa",
                                                        **kwargs)
        raise err


def load_tokenizer(path: str, what: str = "Tokenizer"):
    """The tokenizer saved with a model: left padding and truncation (generation), pad token set."""
    if path is None or not os.path.isdir(path):
        raise FileNotFoundError(f"{what} not found at {path!r}: pass the local model directory holding its tokenizer.")
    tokenizer = AutoTokenizer.from_pretrained(path, padding_side="left", truncation_side="left")
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(f"The tokenizer at {path!r} has neither a pad nor an eos token; set one before training.")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _vocab_rows(model) -> int:
    return weight_rows(model.get_output_embeddings().weight)


def resolve_distill_vocab(student, teacher, tokenizer, teacher_tokenizer=None, requested: int | None = None) -> int:
    """Number of vocabulary rows both models are compared over, or a clear error when they cannot be compared.

    Same-family models often pad their embedding matrices to different sizes (e.g. 151936 vs 152064 rows) around
    one tokenizer: they are compared over the tokenizer's real vocabulary. Different tokenizers cannot be compared
    token by token.
    """
    s_rows, t_rows = _vocab_rows(student), _vocab_rows(teacher)
    n_tok = len(tokenizer)
    if teacher_tokenizer is not None and teacher_tokenizer.get_vocab() != tokenizer.get_vocab():
        raise ValueError(
            "Student and teacher tokenizers differ: on-policy distillation compares next-token distributions token "
            "by token and needs one shared tokenizer. Use a teacher from the student's model family (or a "
            "cross-tokenizer method such as TRL's GOLD)."
        )
    if requested is not None:
        if not n_tok <= requested <= min(s_rows, t_rows):
            raise ValueError(
                f"distill_vocab_size={requested} must cover the tokenizer ({n_tok} tokens) and fit both heads "
                f"(student {s_rows}, teacher {t_rows} rows)."
            )
        return requested
    if s_rows == t_rows:
        return s_rows
    if n_tok > min(s_rows, t_rows):
        raise ValueError(
            f"Vocabulary mismatch: student lm_head has {s_rows} rows, teacher {t_rows}, and the tokenizer has "
            f"{n_tok} tokens, more than the smaller head. These models do not share a vocabulary; pick a teacher "
            f"from the student's family."
        )
    return n_tok
