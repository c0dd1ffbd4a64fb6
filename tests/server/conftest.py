"""Server test fixtures: one registry loaded from the tiny run directory, shared by the session."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # tests import serve_helpers (pytest runs in importlib mode)

from serve_helpers import settings_for  # noqa: E402

from wdserve.server.app import load_registry  # noqa: E402
from wdserve.server.models import ModelRegistry  # noqa: E402


@pytest.fixture(scope="session")
def registry(tiny_workdir: Path) -> Iterator[ModelRegistry]:
    loaded = load_registry(settings_for(tiny_workdir))
    yield loaded
    loaded.close()
