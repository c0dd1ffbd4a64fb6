"""Settings from flags and WDSERVE_* variables; the thread rule; the serving install never imports torch."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
from pydantic import ValidationError

from wdserve.server import settings as settings_module
from wdserve.server.cli import configure_serve, settings_from_args
from wdserve.server.settings import ServeSettings, available_cores


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


def test_readme_settings_table_lists_every_setting_with_its_variable_and_default() -> None:
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")
    table = readme.split("### Settings (flag > environment > default)", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in table.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) == 4 and cells[1].startswith("`WDSERVE_"):
            rows[cells[1].strip("`").removeprefix("WDSERVE_").lower()] = cells
    assert set(rows) == set(ServeSettings.model_fields), "README settings table and ServeSettings differ"
    parser = argparse.ArgumentParser()
    configure_serve(parser)
    flags = {action.dest: action.option_strings[0] for action in parser._actions if action.option_strings}
    for name, field in ServeSettings.model_fields.items():
        flag, _, default, meaning = rows[name]
        assert flag.startswith(f"`{flags[name]}"), (name, flag)
        value = field.get_default(call_default_factory=True)
        if value in (None, {}, []):
            assert default == "(none)", (name, default)
        elif isinstance(value, list):
            assert default == f"`{','.join(value)}`", (name, default)
        else:
            assert default == f"`{value}`", (name, default)
        assert meaning, name


@pytest.mark.parametrize(("v2", "v1_quota", "expected"), [
    ("max 100000\n", None, None),         # cgroup v2, no limit
    ("150000 100000\n", None, 2),         # --cpus 1.5: two threads, not one
    ("100000 100000\n", None, 1),
    (None, "50000", 1),                   # cgroup v1, half a core
    (None, "-1", None),                   # cgroup v1, no limit
    (None, None, None),                   # neither file
])
def test_available_cores_follows_the_container_cpu_quota(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, v2: str | None, v1_quota: str | None,
        expected: int | None) -> None:
    for name, text in (("cpu.max", v2), ("cpu.cfs_quota_us", v1_quota), ("cpu.cfs_period_us", "100000")):
        if text is not None:
            (tmp_path / name).write_text(text)
    monkeypatch.setattr(settings_module, "CGROUP_CPU_MAX", tmp_path / "cpu.max")
    monkeypatch.setattr(settings_module, "CGROUP_V1_QUOTA", tmp_path / "cpu.cfs_quota_us")
    monkeypatch.setattr(settings_module, "CGROUP_V1_PERIOD", tmp_path / "cpu.cfs_period_us")
    monkeypatch.setattr(settings_module.os, "sched_getaffinity", lambda pid: set(range(8)))
    assert available_cores() == (8 if expected is None else expected)

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
