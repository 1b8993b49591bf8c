"""Every environment variable upstream's launch scripts read (names only, tests/fixtures/upstream_variables.txt,
taken from HJSang/OPSD_OnPolicyDistillation's train_opd.sh, eval_math.sh and train_opd_agent.sh) is documented as
honoured, noted or refused: one row of README's "Run-script variables" table with that status, and a line of our
script's --help (train_opd.sh for the training and agent scripts, eval_math.sh for the eval script)."""

from __future__ import annotations

import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STATUSES = ("honoured", "noted", "refused")


def upstream_variables() -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    script = None
    with open(os.path.join(ROOT, "tests", "fixtures", "upstream_variables.txt")) as f:
        for line in f:
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            if line.startswith("["):
                script = line.strip("[]")
                out[script] = []
            else:
                out[script].append(line)
    return out


def readme_rows() -> dict[str, str]:
    text = open(os.path.join(ROOT, "README.md")).read()
    section = text[text.index("### Run-script variables"):]
    section = section[:section.index("\n### ", 5)]
    rows: dict[str, str] = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")] if line.startswith("|") else []
        if len(cells) < 3 or cells[0] in ("variable", "---"):
            continue
        for name in re.findall(r"`([A-Z][A-Z0-9_]*)`", cells[0]):
            assert name not in rows, f"{name} has two rows"
            rows[name] = cells[1]
    return rows


def script_header(name: str) -> str:
    text = open(os.path.join(ROOT, "run_scripts", name)).read()
    return text[:text.index("set -euo pipefail")]


def test_fixture_holds_the_three_upstream_scripts():
    found = upstream_variables()
    assert set(found) == {"scripts/opd/train_opd.sh", "scripts/eval/eval_math.sh", "scripts/opd/train_opd_agent.sh"}
    assert "TEMPERATURE" in found["scripts/opd/train_opd.sh"] and "VAL_N" in found["scripts/eval/eval_math.sh"]
    assert "ENABLE_TOOLS" in found["scripts/opd/train_opd_agent.sh"]


def test_every_upstream_variable_is_documented_as_honoured_noted_or_refused():
    rows = readme_rows()
    ours = {"scripts/opd/train_opd.sh": "train_opd.sh", "scripts/opd/train_opd_agent.sh": "train_opd.sh",
            "scripts/eval/eval_math.sh": "eval_math.sh"}
    missing, bad_status, not_in_help = [], [], []
    for script, names in upstream_variables().items():
        header = script_header(ours[script])
        for name in names:
            if name not in rows:
                missing.append(name)
            elif not rows[name].startswith(STATUSES):
                bad_status.append((name, rows[name]))
            if not re.search(rf"(?<![A-Z0-9_]){name}(?![A-Z0-9_])", header):
                not_in_help.append((ours[script], name))
    assert not missing, f"upstream variables without a README row: {missing}"
    assert not bad_status, f"rows whose status is not {STATUSES}: {bad_status}"
    assert not not_in_help, f"upstream variables our script's --help does not mention: {not_in_help}"


def test_refused_variables_are_refused_by_the_script():
    """The README's refused rows and lib.sh's refusal list agree."""
    rows = readme_rows()
    refused = {name for name, status in rows.items() if status.startswith("refused")}
    lib = open(os.path.join(ROOT, "run_scripts", "lib.sh")).read()
    listed = set(re.search(r'OPSD_AGENT_VARS="([^"]+)"', lib).group(1).replace("\\\n", " ").split())
    assert refused == listed
