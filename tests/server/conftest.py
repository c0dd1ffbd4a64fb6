"""Server test fixtures: one registry loaded from the tiny run directory, shared by the session."""

from __future__ import annotations

import json
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # tests import serve_helpers (pytest runs in importlib mode)

from serve_helpers import DE_EN_BLEU, settings_for  # noqa: E402

from wdserve.server.app import load_registry  # noqa: E402
from wdserve.server.models import ModelRegistry  # noqa: E402


@pytest.fixture(scope="session")
def registry(tiny_workdir: Path) -> Iterator[ModelRegistry]:
    loaded = load_registry(settings_for(tiny_workdir))
    yield loaded
    loaded.close()



@pytest.fixture(scope="session")
def de_en_workdir(tiny_workdir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run directory whose teacher-int8 and student-int8 exports say they translate German into English.

    The models are the tiny fixture's (their output is garbage), but language detection and
    LibreTranslate's clients see a real language pair. Their model.json carry DE_EN_BLEU.
    """
    root = tmp_path_factory.mktemp("de_en_run")
    for name in DE_EN_BLEU:
        source = tiny_workdir / "export" / f"{name}-int8"
        target = root / "export" / source.name
        shutil.copytree(source, target)
        info = json.loads((target / "model.json").read_text(encoding="utf-8"))
        info.update(source_lang="de", target_lang="en", bleu=DE_EN_BLEU[name])
        (target / "model.json").write_text(json.dumps(info), encoding="utf-8")
    return root
