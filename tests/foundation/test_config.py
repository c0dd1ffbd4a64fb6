"""wdserve.config: every shipped config loads, and every mistake is named before anything runs."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from wdserve.config import PipelineConfig, StudentSpec
from wdserve.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]
MINIMAL = {"data": {"synthetic": {"train": 10, "valid": 2, "test": 2}}, "teacher": {}}


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads_and_its_fields_exist(path: Path):
    config = PipelineConfig.load(path)
    config.check_fields(str(path))
    assert config.name == yaml.safe_load(path.read_text()).get("name", path.stem)
    assert all(isinstance(student, StudentSpec) for student in config.students)


def test_defaults_fill_what_a_config_leaves_out():
    config = PipelineConfig.from_dict(MINIMAL)
    assert (config.seed, config.vocab.size) == (1, 8000)
    assert (config.seqkd.beam_size, config.evaluate.beam_size) == (4, 4)
    assert config.export.quantizations == ("int8", "float32") and config.students == ()


def test_a_student_takes_the_pipeline_seed_unless_it_has_its_own():
    config = PipelineConfig.from_dict({**MINIMAL, "seed": 7, "students": [
        {"name": "a", "method": "wd"}, {"name": "b", "method": "seqkd", "seed": 3}]})
    assert [s.with_seed(config.seed).seed for s in config.students] == [7, 3]


@pytest.mark.parametrize("change, message", [
    ({"vocabulary": {}}, r"unknown sections \['vocabulary'\]"),
    ({"vocab": {"sise": 10}}, r"vocab: unknown keys \['sise'\]"),
    ({"students": [{"name": "s", "method": "wd", "phase3": {}}]}, r"\[0\]: unknown keys \['phase3'\]"),
    ({"students": [{"name": "s", "method": "wd2"}]}, r"unknown method 'wd2'"),
    ({"students": [{"name": "s", "method": "wd", "preset": "stu3"}]}, r"unknown preset 'stu3'"),
    ({"students": [{"name": "s", "method": "wd", "data": "gold"}]}, r"data must be one of"),
    ({"students": [{"method": "wd"}]}, r"students\[0\]: .*name"),
    ({"students": [{"name": "s", "method": "wd"}, {"name": "s", "method": "kd"}]}, r"unique.*\['s'\]"),
    ({"students": [{"name": "teacher", "method": "kd"}]}, r"not 'teacher'"),
    ({"data": {"dir": "x"}}, r"data: give source_lang and target_lang"),
    ({"data": {"source_lang": "de", "target_lang": "en", "splits": {"dev": "val"}}}, r"unknown \['dev'\]"),
    ({"teacher": [1]}, r"teacher: expected a mapping"),
    ({"export": {"quantizations": ["int4"]}}, r"export: quantizations: unknown \['int4'\]"),
    ({"teacher": {"pretrained": "x/y", "model": {"enc_layers": 2}}}, r"give pretrained alone"),
    ({"teacher": {"pretrained": "x/y"}, "vocab": {"size": 10}}, r"brings its own vocabulary"),
])
def test_mistakes_are_named(change: dict, message: str):
    with pytest.raises(ConfigError, match=message):
        PipelineConfig.from_dict({**MINIMAL, **change})


@pytest.mark.parametrize("change, message", [
    ({"teacher": {"model": {"enc_layer": 2}}}, r"teacher.model: unknown ModelConfig fields \['enc_layer'\]"),
    ({"teacher": {"model": {"vocab_size": 9}}}, r"unknown ModelConfig fields \['vocab_size'\]"),
    ({"teacher": {"train": {"max_step": 2}}}, r"teacher.train: unknown TrainConfig fields \['max_step'\]"),
    ({"students": [{"name": "s", "method": "wd", "phase2": {"lr_": 1}}]}, r"students.s.phase2: unknown"),
])
def test_field_mistakes_are_named_before_the_run(change: dict, message: str):
    config = PipelineConfig.from_dict({**MINIMAL, **change})
    with pytest.raises(ConfigError, match=message):
        config.check_fields()


def test_selecting_students_keeps_the_order_asked_and_refuses_strangers():
    config = PipelineConfig.from_dict({**MINIMAL, "students": [
        {"name": "a", "method": "wd"}, {"name": "b", "method": "seqkd"}]})
    assert [s.name for s in config.select_students(["b", "a"]).students] == ["b", "a"]
    with pytest.raises(ConfigError, match=r"--students: \['c'\] not in the config"):
        config.select_students(["c"])


def test_options_a_method_does_not_read_are_listed():
    assert StudentSpec("s", "seqkd", phase1={}, ckd={}).ignored_options() == ["ckd", "phase1"]
    assert StudentSpec("s", "wd", phase1={}, train={}, wd={}, phase1_word_kd={}).ignored_options() == []
    assert StudentSpec("s", "ws", wd={}, own_from="k", encoder_from_teacher=True).ignored_options() == [
        "encoder_from_teacher", "own_from", "wd"]
    assert StudentSpec("s", "gated-ws", own_from="k").ignored_options() == []


def test_seeds_expand_into_one_student_a_seed():
    config = PipelineConfig.from_dict({**MINIMAL, "seed": 7, "students": [
        {"name": "kd", "method": "seqkd", "seeds": [1, 2, 3]},
        {"name": "g", "method": "gated-ws", "seeds": [1, 2, 3], "own_from": "kd"},
        {"name": "wd", "method": "wd"}]})
    names = [s.name for s in config.students]
    assert names == ["kd-s1", "kd-s2", "kd-s3", "g-s1", "g-s2", "g-s3", "wd"]
    assert [s.with_seed(config.seed).seed for s in config.students] == [1, 2, 3, 1, 2, 3, 7]
    assert {s.group for s in config.students} == {"kd", "g", None}
    assert [s.own_from for s in config.students if s.group == "g"] == ["kd-s1", "kd-s2", "kd-s3"]
    # --students takes a seeded student's name for all its runs, or one run by its own name.
    def selected(names: list[str]) -> list[str]:
        return [s.name for s in config.select_students(names).students]

    assert selected(["wd", "kd"]) == ["wd", "kd-s1", "kd-s2", "kd-s3"]
    assert selected(["kd-s2", "kd"]) == ["kd-s2", "kd-s1", "kd-s3"]


@pytest.mark.parametrize("student, message", [
    ({"name": "s", "method": "wd", "seeds": [1, 1]}, r"distinct seeds"),
    ({"name": "s", "method": "wd", "seeds": [1], "seed": 2}, r"not seed as well"),
    ({"name": "s", "method": "wd", "wd": {"projections": "private"}}, r"wd.projections must be one of"),
    ({"name": "s", "method": "wd", "wd": {"proj": "shared"}}, r"wd: unknown options \['proj'\]"),
    ({"name": "s", "method": "gated-ws", "own_from": "later"}, r"own_from: 'later' must name a student"),
    ({"name": "s", "method": "wd", "group": "x"}, r"group is set by seeds"),
])
def test_student_option_mistakes_are_named(student: dict, message: str):
    with pytest.raises(ConfigError, match=message):
        PipelineConfig.from_dict({**MINIMAL, "students": [student, {"name": "later", "method": "seqkd"}]})
