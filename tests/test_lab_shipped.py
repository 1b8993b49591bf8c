"""The default lab models ship with the repository: a fresh clone's demo must find them (a change to a default
configuration that is not matched by retrained shipped copies would silently cost minutes of training)."""

import os

from lab.models import SHIPPED_DIR, default_lab_config, prepare_lab_models
from lab.tasks import TASKS


def test_every_default_configuration_has_shipped_models(tmp_path):
    for name in TASKS:
        lab = prepare_lab_models(str(tmp_path), default_lab_config(name), progress=False)
        assert lab["cached"], name  # installed from lab/pretrained, nothing trained
        assert os.path.isdir(os.path.join(SHIPPED_DIR, os.path.basename(lab["paths"]["dir"])))
        for part in ("teacher", "student", "tokenizer"):
            assert os.listdir(lab["paths"][part]), (name, part)
        assert 0.0 < lab["metrics"]["student"]["exact_match"] < lab["metrics"]["teacher"]["exact_match"]
