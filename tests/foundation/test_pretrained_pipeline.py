"""``wdserve pipeline`` with ``teacher: {pretrained: DIR}``: a tiny Marian teacher, imported instead of
trained, distilled into a weight-distilled stu1 and a seq-KD student, exported, served and benched."""

from __future__ import annotations

import json

import pytest
import yaml

pytest.importorskip("transformers")
pytest.importorskip("locust")

from wdserve.artifacts import RunDir  # noqa: E402
from wdserve.cli import main  # noqa: E402
from wdserve.loadtest.bench import BenchOptions, run_bench  # noqa: E402
from wdserve.server.models import ModelRegistry  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:Recommended. pip install sacremoses")

FAST = {"max_tokens": 1200, "lr": 0.003, "warmup_steps": 5, "eval_every": 30, "log_every": 10}


@pytest.fixture(scope="module")
def run(tiny_opus_marian, tmp_path_factory):
    root = tmp_path_factory.mktemp("pretrained_pipeline")
    config = {
        "name": "pretrained-micro",
        "data": {"synthetic": {"train": 400, "valid": 30, "test": 40, "seed": 5}},
        "teacher": {"pretrained": str(tiny_opus_marian.root)},
        "seqkd": {"beam_size": 2},
        "students": [
            {"name": "stu1", "method": "wd", "preset": "stu1", "phase1": {**FAST, "max_steps": 10},
             "phase2": {**FAST, "max_steps": 20}},
            {"name": "stu1-kd", "method": "seqkd", "preset": "stu1", "train": {**FAST, "max_steps": 30}},
        ],
        "export": {"quantizations": ["int8", "float32"], "verify_sentences": 20},
        "evaluate": {"beam_size": 2},
    }
    path = root / "pretrained.yaml"
    path.write_text(yaml.safe_dump(config))
    workdir = root / "run"
    assert main(["pipeline", str(path), "--workdir", str(workdir), "--device", "cpu"]) == 0
    return workdir


def test_the_teacher_is_imported_with_its_own_vocabulary(run):
    report = json.loads(RunDir(run).report.read_text())
    assert report["models"]["teacher"]["pretrained"].endswith("opus_marian0")
    assert not RunDir(run).vocab.exists()  # no vocab stage: the students share the teacher's pieces
    assert (RunDir(run).model_dir("teacher") / "pretrained.json").is_file()
    for name in ("teacher", "stu1", "stu1-kd"):
        entry = report["models"][name]
        assert entry["parity"]["float32_parity"] is True, name
        assert entry["test"]["bleu"] >= 0.0
    exported = RunDir(run).exports()
    assert {e.info.name for e in exported} == {"teacher", "stu1", "stu1-kd"}
    assert all(e.info.source_vocab == "source.spm" and e.info.target_vocab == "target.spm" for e in exported)


def test_the_server_serves_every_export_and_the_bench_measures_them(run, tmp_path):
    from wdserve.server.models import discover_workdir

    registry = ModelRegistry.load(discover_workdir(run))
    try:
        served = registry.resolve("stu1")
        pieces = [served.encode(text) for text in ("ka lo mi", "su ta")]
        outputs = served.translate_texts(pieces, beam_size=2, max_length=32)
        assert len(outputs) == 2 and all(isinstance(output.text, str) for output in outputs)
    finally:
        registry.close()
    options = BenchOptions(workdir=run, out=tmp_path, models=["teacher", "stu1"], duration=1, rounds=1,
                           users=(1,), sentences_per_request=(1,), min_gain=0.0, max_sentences=8,
                           beam_size=1, max_length=16, direct_seconds=0.2, server_timeout=120, slo_ms=10_000,
                           pytorch=False)
    report = run_bench(options)
    assert {phase["model"] for phase in report["phases"]} == {"teacher", "stu1"}
    assert all(phase["requests"] > 0 for phase in report["phases"])
