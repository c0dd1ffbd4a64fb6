"""The pipeline config (``configs/*.yaml``), typed: one dataclass a section.

``PipelineConfig.load(path)`` reads the YAML and refuses unknown keys at every level, including
the ``ModelConfig`` and ``TrainConfig`` fields a section passes on, so a typo in ``phase2`` stops
the run before the teacher trains for hours rather than after. ``wdserve pipeline`` and
``wdserve distill`` both describe a student as a ``StudentSpec``.

Standard library and PyYAML only; the field checks import ``distill`` (PyTorch) when they run.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, TypeVar

from wdserve.artifacts import QUANTIZATIONS, SPLITS
from wdserve.errors import ConfigError

METHODS = ("kd", "seqkd", "wd", "ws", "gated-ws", "ckd")  # see distill/students.py
PHASED = ("wd", "ws", "gated-ws")  # a generator phase, then (optionally) fine-tuning
PRESETS = ("stu1", "stu2")  # student shapes relative to the teacher (distill/students.py)
STUDENT_DATA = ("seqkd", "bitext")
WD_OPTIONS = {"projections": ("shared", "per-tensor"), "init": ("tanh", "teacher")}  # distill/wd.py
CKD_MAPPINGS = ("regular_comb", "overlap", "cross_comb", "skip_comb", "skip_middle")  # distill/ckd.py
CKD_RENAMED = {"regular": "regular_comb", "skip": "cross_comb", "cross": "skip_comb"}  # before issue #15
CKD_SIDES = ("encoder", "decoder")
CKD_REDUCTIONS = ("sum", "mean")
DEFAULT_SEED = 1

T = TypeVar("T")


def from_dict(cls: type[T], values: Any, what: str) -> T:
    """``cls(**values)`` for a config dataclass, naming unknown or missing keys instead of a TypeError."""
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise ConfigError(f"{what}: expected a mapping, got {type(values).__name__} {values!r}")
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"{what}: unknown keys {unknown} (known: {sorted(known)})")
    try:
        return cls(**values)
    except TypeError as err:  # a required key is missing
        raise ConfigError(f"{what}: {err}") from err
    except ValueError as err:
        raise ConfigError(f"{what}: {err}") from err


@dataclass(frozen=True)
class DataConfig:
    """Either ``synthetic: {train, valid, test, seed}`` or a corpus directory of
    ``{dir}/{split}.{lang}[.gz]`` files (``dir`` may come from ``--data-dir`` or ``$WDSERVE_DATA_DIR``)."""

    dir: str | None = None
    source_lang: str | None = None
    target_lang: str | None = None
    splits: dict[str, str] = field(default_factory=dict)  # our split name -> the corpus's file stem
    clean: dict[str, Any] = field(default_factory=dict)  # distill.data.clean_pairs options
    synthetic: dict[str, int] | None = None

    def __post_init__(self) -> None:
        if self.synthetic is None and not (self.source_lang and self.target_lang):
            raise ValueError("give source_lang and target_lang, or synthetic: {train, valid, test}")
        unknown = sorted(set(self.splits) - set(SPLITS))
        if unknown:
            raise ValueError(f"splits: unknown {unknown}; the splits are {list(SPLITS)}")

    def file_stem(self, split: str) -> str:
        return self.splits.get(split, split)

    def corpus_dir(self, override: Path | None = None) -> Path:
        root = override or os.environ.get("WDSERVE_DATA_DIR") or self.dir
        if not root:
            raise ConfigError("no corpus directory: set data.dir, --data-dir or $WDSERVE_DATA_DIR")
        return Path(root)


@dataclass(frozen=True)
class VocabConfig:
    size: int = 8000


@dataclass(frozen=True)
class TeacherConfig:
    """A teacher to train (``model``, ``train``), or a pretrained one to import (``pretrained``: a
    Hugging Face Marian model id such as ``Helsinki-NLP/opus-mt-de-en``, or a local directory)."""

    model: dict[str, Any] = field(default_factory=dict)  # ModelConfig fields but vocab_size
    train: dict[str, Any] = field(default_factory=dict)  # TrainConfig fields
    pretrained: str | None = None

    def __post_init__(self) -> None:
        if self.pretrained and (self.model or self.train):
            raise ValueError("a pretrained teacher brings its own architecture and weights: "
                             "give pretrained alone, without model or train")


@dataclass(frozen=True)
class SeqKDConfig:
    beam_size: int = 4
    with_bitext: bool = True  # the weight-distillation paper trains on bitext + distilled data


def check_ckd_mapping(mapping: str, what: str = "mapping") -> None:
    """Refuses a mapping name that is not one of ``CKD_MAPPINGS``, naming the new name of an old one."""
    if mapping in CKD_RENAMED:
        raise ValueError(f"CKD {what} {mapping!r} was renamed to the authors' {CKD_RENAMED[mapping]!r}")
    if mapping not in CKD_MAPPINGS:
        raise ValueError(f"unknown CKD {what} {mapping!r}; expected one of {list(CKD_MAPPINGS)}")


@dataclass(frozen=True)
class CKDOptions:
    """A CKD student's ``ckd:`` (``distill/ckd.py``): which stacks have their layers supervised
    (``sides``), by which teacher layers (``mapping`` for the encoder, as the authors'
    ``--enc_distillation_mode``; ``decoder_mapping`` for the decoder, their ``--dec_distillation_mode``,
    default the encoder's), and the loss's weights. The defaults are measured (README, issue #15)."""

    sides: tuple[str, ...] = ("encoder",)
    mapping: str = "regular_comb"
    decoder_mapping: str | None = None  # None: the same as ``mapping``
    alpha: float = 0.5
    beta: float = 0.1
    temperature: float = 1.0
    reduction: str = "mean"

    def __post_init__(self) -> None:
        if isinstance(self.sides, str) or not isinstance(self.sides, (list, tuple)):
            raise ValueError(f"sides: give a list such as [encoder, decoder], got {self.sides!r}")
        object.__setattr__(self, "sides", tuple(self.sides))
        unknown = [side for side in self.sides if side not in CKD_SIDES]
        if unknown or not self.sides or len(set(self.sides)) != len(self.sides):
            raise ValueError(f"sides: give one or both of {list(CKD_SIDES)}, each once, "
                             f"got {list(self.sides)}")
        check_ckd_mapping(self.mapping, "mapping")
        if self.decoder_mapping is not None:
            check_ckd_mapping(self.decoder_mapping, "decoder_mapping")
        if self.reduction not in CKD_REDUCTIONS:
            raise ValueError(f"reduction must be one of {list(CKD_REDUCTIONS)}, got {self.reduction!r}")

    def mapping_of(self, side: str) -> str:
        """The mapping that groups ``side``'s teacher layers."""
        return self.mapping if side == "encoder" or self.decoder_mapping is None else self.decoder_mapping


@dataclass(frozen=True)
class StudentSpec:
    """One student: its shape (``preset`` and/or ``model`` fields over the teacher's), its method, the
    data it learns from and the method's options (``distill/students.py`` says which apply)."""

    name: str
    method: str
    preset: str | None = None
    model: dict[str, Any] = field(default_factory=dict)
    data: str = "seqkd"
    seed: int | None = None  # default: the pipeline's seed
    seeds: tuple[int, ...] | None = None  # several runs, models <name>-s<seed> (PipelineConfig expands it)
    group: str | None = None  # the name in the config of a student expanded from ``seeds``
    train: dict[str, Any] | None = None  # TrainConfig fields (phase 2 falls back to these)
    phase1: dict[str, Any] | None = None
    phase2: dict[str, Any] | None = None
    word_kd: dict[str, Any] | None = None  # {alpha, temperature}
    phase1_word_kd: dict[str, Any] | None = None  # {alpha, temperature}: a KD term in the generator phase
    wd: dict[str, Any] | None = None  # {projections: shared|per-tensor, init: tanh|teacher}
    own_from: str | None = None  # gated-ws: the student whose weights start W_own (trained earlier)
    encoder_from_teacher: bool = False  # seqkd/kd/ckd: start from the teacher's encoder, copied
    ckd: CKDOptions | None = None  # a mapping in the YAML, typed here

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; expected one of {list(METHODS)}")
        if self.seeds is not None:
            object.__setattr__(self, "seeds", tuple(self.seeds))
            if not self.seeds or len(set(self.seeds)) != len(self.seeds) or self.seed is not None:
                raise ValueError(f"seeds: give distinct seeds, and not seed as well, got {list(self.seeds)}")
        if self.wd is not None:
            unknown = sorted(set(self.wd) - set(WD_OPTIONS))
            if unknown:
                raise ValueError(f"wd: unknown options {unknown} (known: {sorted(WD_OPTIONS)})")
            for key, value in self.wd.items():
                if value not in WD_OPTIONS[key]:
                    raise ValueError(f"wd.{key} must be one of {list(WD_OPTIONS[key])}, got {value!r}")
        if isinstance(self.ckd, dict):
            known = sorted(f.name for f in fields(CKDOptions))
            unknown = sorted(set(self.ckd) - set(known))
            if unknown:
                raise ValueError(f"ckd: unknown options {unknown} (known: {known})")
            try:
                object.__setattr__(self, "ckd", CKDOptions(**self.ckd))
            except ValueError as err:
                raise ValueError(f"ckd: {err}") from err
        if self.preset is not None and self.preset not in PRESETS:
            raise ValueError(f"unknown preset {self.preset!r}; expected one of {list(PRESETS)}")
        if self.data not in STUDENT_DATA:
            raise ValueError(f"data must be one of {list(STUDENT_DATA)}, got {self.data!r}")

    @property
    def phased(self) -> bool:
        return self.method in PHASED

    def ignored_options(self) -> list[str]:
        """Options given that this method does not read."""
        unused = {"phase1", "phase2", "phase1_word_kd", "wd"} if not self.phased else set()
        if self.method != "ckd":
            unused.add("ckd")
        if self.method != "gated-ws":
            unused.add("own_from")
        if self.method in ("ws", "gated-ws"):
            unused.add("wd")
        given = [name for name in unused if getattr(self, name) is not None]
        if self.encoder_from_teacher and self.phased:
            given.append("encoder_from_teacher")
        return sorted(given)

    def with_seed(self, seed: int) -> StudentSpec:
        return self if self.seed is not None else dataclasses.replace(self, seed=seed)

    def expand_seeds(self) -> list[StudentSpec]:
        """One spec per seed of ``seeds``, named ``<name>-s<seed>`` (itself when there are no seeds)."""
        if self.seeds is None:
            return [self]
        return [dataclasses.replace(self, name=f"{self.name}-s{seed}", seed=seed, seeds=None, group=self.name)
                for seed in self.seeds]


@dataclass(frozen=True)
class ExportConfig:
    quantizations: tuple[str, ...] = ("int8", "float32")
    verify_sentences: int = 100

    def __post_init__(self) -> None:
        object.__setattr__(self, "quantizations", tuple(self.quantizations))
        if not self.quantizations:
            raise ValueError("quantizations: give at least one")
        unknown = sorted(set(self.quantizations) - set(QUANTIZATIONS))
        if unknown:
            raise ValueError(f"quantizations: unknown {unknown} (known: {list(QUANTIZATIONS)})")


@dataclass(frozen=True)
class EvaluateConfig:
    beam_size: int = 4


@dataclass(frozen=True)
class PipelineConfig:
    """A whole ``wdserve pipeline`` run; every section but ``teacher`` is optional."""

    teacher: TeacherConfig
    data: DataConfig
    name: str = "pipeline"
    seed: int = DEFAULT_SEED
    vocab: VocabConfig = field(default_factory=VocabConfig)
    seqkd: SeqKDConfig = field(default_factory=SeqKDConfig)
    students: tuple[StudentSpec, ...] = ()
    export: ExportConfig = field(default_factory=ExportConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)

    @classmethod
    def load(cls, path: Path) -> PipelineConfig:
        import yaml

        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"pipeline config not found: {path}")
        try:
            values = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML: {err}") from err
        if not isinstance(values, dict) or "teacher" not in values:
            raise ConfigError(f"{path}: a pipeline config needs at least a 'teacher' section")
        return cls.from_dict({"name": path.stem, **values}, str(path))

    @classmethod
    def from_dict(cls, values: dict[str, Any], what: str = "config") -> PipelineConfig:
        sections = {"teacher": TeacherConfig, "data": DataConfig, "vocab": VocabConfig,
                    "seqkd": SeqKDConfig, "export": ExportConfig, "evaluate": EvaluateConfig}
        known = sorted(f.name for f in fields(cls))
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise ConfigError(f"{what}: unknown sections {unknown} (known: {known})")
        typed = {key: from_dict(kind, values[key], f"{what}: {key}")
                 for key, kind in sections.items() if key in values}
        students = values.get("students") or []
        if not isinstance(students, list):
            raise ConfigError(f"{what}: students must be a list")
        specs = [from_dict(StudentSpec, item, f"{what}: students[{i}]") for i, item in enumerate(students)]
        if any(spec.group is not None for spec in specs):
            raise ConfigError(f"{what}: students: group is set by seeds, not by hand")
        typed["students"] = tuple(run for spec in specs for run in spec.expand_seeds())
        names = [student.name for student in typed["students"]]
        duplicated = sorted({name for name in names if names.count(name) > 1} | ({"teacher"} & set(names)))
        if duplicated:
            raise ConfigError(f"{what}: student names must be unique and not 'teacher': {duplicated}")
        groups = {spec.group for spec in typed["students"]} - {None}
        typed["students"] = tuple(  # own_from a student with seeds: its run with the same seed
            dataclasses.replace(spec, own_from=f"{spec.own_from}-s{spec.seed}")
            if spec.own_from in groups and spec.seed is not None else spec for spec in typed["students"])
        for index, spec in enumerate(typed["students"]):
            if spec.own_from is not None and spec.own_from not in names[:index]:
                raise ConfigError(f"{what}: students.{spec.name}.own_from: {spec.own_from!r} must name a "
                                  f"student listed before it (one of {names[:index]})")
        if "data" not in typed:
            raise ConfigError(f"{what}: a pipeline config needs a 'data' section")
        if typed["teacher"].pretrained and "vocab" in values:
            raise ConfigError(f"{what}: vocab: a pretrained teacher brings its own vocabulary; remove the "
                              "vocab section")
        scalars = {key: values[key] for key in ("name", "seed") if key in values}
        return cls(**typed, **scalars)

    def select_students(self, names: list[str]) -> PipelineConfig:
        """This config with only the named students (in that order); a name given ``seeds`` in the
        config selects all its runs."""
        runs: dict[str, list[StudentSpec]] = {}
        for student in self.students:
            runs.setdefault(student.name, []).append(student)
            if student.group is not None:
                runs.setdefault(student.group, []).append(student)
        unknown = [name for name in names if name not in runs]
        if unknown:
            raise ConfigError(f"--students: {unknown} not in the config (it has {sorted(runs)})")
        chosen: list[StudentSpec] = []
        for student in (student for name in names for student in runs[name]):
            if not any(student is other for other in chosen):
                chosen.append(student)
        return dataclasses.replace(self, students=tuple(chosen))

    def check_fields(self, what: str = "config") -> None:
        """The model and training fields each section passes on, checked against ``ModelConfig`` and
        ``TrainConfig`` (imports PyTorch)."""
        from wdserve.distill.model import ModelConfig
        from wdserve.distill.train import TrainConfig

        def check(kind: type, values: dict[str, Any] | None, where: str, allowed_missing: set[str]) -> None:
            known = {f.name for f in fields(kind)} - allowed_missing
            unknown = sorted(set(values or {}) - known)
            if unknown:
                raise ConfigError(f"{what}: {where}: unknown {kind.__name__} fields {unknown} "
                                  f"(known: {sorted(known)})")

        check(ModelConfig, self.teacher.model, "teacher.model", {"vocab_size"})
        check(TrainConfig, self.teacher.train, "teacher.train", set())
        for student in self.students:
            check(ModelConfig, student.model, f"students.{student.name}.model", set())
            for key in ("train", "phase1", "phase2"):
                check(TrainConfig, getattr(student, key), f"students.{student.name}.{key}", set())
