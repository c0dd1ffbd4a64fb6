"""Settings from flags and WDSERVE_* variables; the thread rule; the serving install never imports torch."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
from pydantic import ValidationError

from wdserve.server.cli import configure_serve, settings_from_args
from wdserve.server.settings import ServeSettings


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    configure_serve(parser)
    return parser.parse_args(argv)


def test_environment_configures_everything(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WDSERVE_MODELS", "teacher=/m/t, student=/m/s")
    monkeypatch.setenv("WDSERVE_API_KEYS", "k1,k2")
    monkeypatch.setenv("WDSERVE_COMPARE_MODELS", '["a", "b"]')
    monkeypatch.setenv("WDSERVE_PORT", "9001")
    monkeypatch.setenv("WDSERVE_MAX_WAIT_MS", "2.5")
    settings = ServeSettings()
    assert settings.models == {"teacher": Path("/m/t"), "student": Path("/m/s")}
    assert settings.api_keys == ["k1", "k2"] and settings.compare_models == ["a", "b"]
    assert settings.port == 9001 and settings.max_wait_ms == 2.5


def test_flags_override_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WDSERVE_PORT", "9001")
    monkeypatch.setenv("WDSERVE_QUEUE_SIZE", "7")
    argv = ["--port", "9002", "--model", "a=/x", "--model", "b=/y", "--api-key", "k",
            "--compare-models", "a", "b", "--workdir", "/run"]
    settings = settings_from_args(parse(argv))
    assert settings.port == 9002 and settings.queue_size == 7  # flag wins; env fills the rest
    assert settings.models == {"a": Path("/x"), "b": Path("/y")} and settings.api_keys == ["k"]
    assert settings.workdir == Path("/run") and settings.compare_models == ["a", "b"]


@pytest.mark.parametrize(("argv", "message"), [
    (["--model", "no-equals-sign"], "NAME=PATH"),
    (["--model", "a=/x", "--model", "a=/y"], "given twice"),
    (["--default-beam-size", "9"], "default_beam_size"),
    (["--queue-size", "0"], "queue_size"),
])
def test_bad_settings_are_named(argv: list[str], message: str) -> None:
    with pytest.raises((ValidationError, ValueError), match=message):
        settings_from_args(parse(argv))


@pytest.mark.parametrize(("models", "cores", "inter", "intra"), [
    (1, 2, 1, 2), (6, 2, 2, 1), (2, 16, 2, 8), (3, 16, 3, 5), (1, 1, 1, 1),
])
def test_thread_plan_never_oversubscribes(models: int, cores: int, inter: int, intra: int) -> None:
    assert ServeSettings().thread_plan(models, cores) == (inter, intra)
    assert inter * intra <= cores


def test_explicit_threads_are_kept() -> None:
    assert ServeSettings(inter_threads=1, intra_threads=3).thread_plan(6, 2) == (1, 3)


def test_cascades_and_shadow_from_flags_and_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    argv = ["--cascade", "fast=student,teacher", "--cascade", "kd=student-kd, teacher", "--cascade-threshold",
            "0.3", "--shadow-rate", "0.05", "--shadow-model", "teacher-float32"]
    settings = settings_from_args(parse(argv))
    assert settings.cascades == {"fast": ["student", "teacher"], "kd": ["student-kd", "teacher"]}
    assert settings.cascade_threshold == 0.3 and settings.shadow_rate == 0.05
    assert settings.shadow_model == "teacher-float32" and settings.shadow_queue_size == 64
    monkeypatch.setenv("WDSERVE_CASCADES", "fast=student,teacher;kd=student-kd,teacher")
    assert ServeSettings().cascades == settings.cascades
    for bad, message in (("fast=student", "NAME=STUDENT,TEACHER"), ("a=s,t;a=s,t", "given twice")):
        monkeypatch.setenv("WDSERVE_CASCADES", bad)
        with pytest.raises(ValueError, match=message):
            ServeSettings()
    with pytest.raises(ValidationError, match="shadow_rate"):
        ServeSettings(shadow_rate=1.5)
