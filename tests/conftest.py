"""Shared fixtures, and a report header that says on which CPU and torch build the suite ran."""

from __future__ import annotations

import os
import platform

import pytest
import torch

from support import save_pair


# run_scripts/lib.sh exports the directory a script was started from (OPSD_CALLER_DIR), so that nested scripts resolve
# the user's relative paths against it; the suite starts scripts from directories of its own, and must not inherit
# the one run_scripts/test.sh was started from.
os.environ.pop("OPSD_CALLER_DIR", None)
# Nothing in the suite may reach a model hub: transformers' kernels hub lookups (bitsandbytes tries one at import on
# AVX512-BF16 CPUs) fail fast offline instead of attempting the network, here and in the scripts the tests start.
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_line() -> str:
    try:
        capability = torch.backends.cpu.get_cpu_capability()
    except AttributeError:  # older torch
        capability = "unknown"
    flags = ""
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read()
        flags = " ".join(flag for flag in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f" {flag}" in text)
    except OSError:
        pass
    return (f"cpu: {_cpu_model()} ({flags or 'no avx flags read'}); torch {torch.__version__} cpu capability "
            f"{capability}; {torch.get_num_threads()} threads")


def pytest_sessionstart(session):
    """Say where the suite runs, also under -q (which hides pytest's report header)."""
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_line(machine_line())


@pytest.fixture(scope="session")
def pair(tmp_path_factory):
    """A saved tiny student (hidden 64) / teacher (hidden 128) pair sharing one 64-token tokenizer."""
    return save_pair(str(tmp_path_factory.mktemp("pair")))


@pytest.fixture(scope="session")
def real_model_dir():
    """SmolLM2-135M-Instruct as a local checkpoint (lab/real_assets.py), built once into the repository cache
    (.cache/real, or OPSD_REAL_CACHE) and reused by later sessions; the real-asset packages come with the test setup."""
    from lab.real_assets import materialize_smollm2

    return materialize_smollm2(quiet=True)
