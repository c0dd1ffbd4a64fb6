"""``wdserve pipeline`` end to end on a micro config: every stage, the report, and skip-on-rerun."""

import json

import pytest
import torch
import yaml

from wdserve.cli import main
from wdserve.distill.checkpoint import read_checkpoint

MICRO = {
    "name": "micro",
    "seed": 3,
    "data": {"synthetic": {"train": 1500, "valid": 40, "test": 60, "seed": 3}},
    "vocab": {"size": 120},
    "teacher": {
        "model": {"enc_layers": 2, "enc_dim": 48, "enc_heads": 4, "enc_ffn": 96,
                  "dec_layers": 2, "dec_dim": 48, "dec_heads": 4, "dec_ffn": 96,
                  "dropout": 0.0, "max_positions": 96},
        "train": {"max_tokens": 1200, "lr": 0.005, "warmup_steps": 30, "max_steps": 450,
                  "eval_every": 450, "log_every": 50},
    },
    "seqkd": {"beam_size": 2},
    "students": [
        {"name": "student", "method": "wd", "preset": "stu1",
         "phase1": {"max_tokens": 1200, "lr": 0.002, "warmup_steps": 5, "max_steps": 10, "eval_every": 10},
         "phase2": {"max_tokens": 1200, "lr": 0.003, "warmup_steps": 5, "max_steps": 20, "eval_every": 20}},
        {"name": "student-kd", "method": "seqkd", "preset": "stu1", "seeds": [1, 2],
         "train": {"max_tokens": 1200, "lr": 0.003, "warmup_steps": 5, "max_steps": 30, "eval_every": 30}},
    ],
    "export": {"quantizations": ["int8", "float32"], "verify_sentences": 20},
    "evaluate": {"beam_size": 2},
}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline")
    config = root / "micro.yaml"
    config.write_text(yaml.safe_dump(MICRO))
    workdir = root / "run"
    assert main(["pipeline", str(config), "--workdir", str(workdir), "--device", "cpu"]) == 0
    return config, workdir


def test_every_stage_leaves_its_files(run):
    _, workdir = run
    for split in ("train", "valid", "test"):
        assert (workdir / "data" / f"{split}.src").is_file()
    assert (workdir / "vocab" / "spm.model").is_file()
    assert len((workdir / "seqkd" / "train.tgt").read_text().splitlines()) == 1500
    for name in ("teacher", "student", "student-kd-s1", "student-kd-s2"):
        assert (workdir / "models" / name / "checkpoint_best.pt").is_file()
        for quantization in ("int8", "float32"):
            metadata = json.loads((workdir / "export" / f"{name}-{quantization}" / "model.json").read_text())
            assert metadata["name"] == name and metadata["quantization"] == quantization


def test_report_scores_every_model_and_the_teacher_beats_an_untrained_one(run):
    _, workdir = run
    report = json.loads((workdir / "report.json").read_text())
    models = report["models"]
    assert set(models) == {"teacher", "student", "student-kd-s1", "student-kd-s2"}
    assert models["student"]["method"] == "wd" and models["student-kd-s1"]["method"] == "seqkd"
    assert [models[f"student-kd-s{seed}"]["seed"] for seed in (1, 2)] == [1, 2]
    assert models["student"]["seed"] == 3  # the pipeline's
    for name, entry in models.items():
        assert entry["test"]["bleu_signature"].startswith("nrefs:1")
        for quantization in ("int8", "float32"):  # what the server's /models and page show
            metadata = json.loads((workdir / "export" / f"{name}-{quantization}" / "model.json").read_text())
            assert metadata["bleu"] == round(entry["test"]["bleu"], 2)
        assert entry["parameters"] > 0
        assert entry["parity"]["float32_parity"] is True
    assert models["student"]["parameters"] < models["teacher"]["parameters"]
    assert models["teacher"]["test"]["bleu"] > report["untrained_test_bleu"] + 10
    # Seeds differ, so the runs differ; the group holds their mean and standard deviation.
    runs = [models[f"student-kd-s{seed}"]["test"]["bleu"] for seed in (1, 2)]
    group = report["groups"]["student-kd"]
    assert group["seeds"] == [1, 2] and group["bleu"]["values"] == runs
    assert group["bleu"]["mean"] == pytest.approx(sum(runs) / 2, abs=0.01)
    assert group["bleu"]["std"] == pytest.approx(abs(runs[0] - runs[1]) / 2**0.5, abs=0.01)
    assert list(report["groups"]) == ["student-kd"]
    first, second = (read_checkpoint(workdir / "models" / name / "checkpoint_best.pt")["model"]
                     for name in ("student-kd-s1", "student-kd-s2"))
    name = "decoder.layers.0.ffn.fc1.weight"
    assert not torch.equal(first[name], second[name])


def test_a_second_run_skips_every_finished_stage(run, caplog):
    config, workdir = run
    before = {p: p.stat().st_mtime_ns for p in (workdir / "models").rglob("checkpoint_best.pt")}
    with caplog.at_level("INFO"):
        assert main(["pipeline", str(config), "--workdir", str(workdir), "--device", "cpu"]) == 0
    assert "not training again" in caplog.text
    assert before == {p: p.stat().st_mtime_ns for p in (workdir / "models").rglob("checkpoint_best.pt")}


def test_unknown_student_names_are_refused(run, capsys):
    config, workdir = run
    assert main(["pipeline", str(config), "--workdir", str(workdir), "--students", "stu9"]) == 2
    assert "not in the config" in capsys.readouterr().err
