"""``wdserve pipeline`` end to end on a micro config: every stage, the report, and skip-on-rerun."""

import json
import shutil

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


MORE_STUDENTS = [  # one new seed, and a gated-ws student that starts from it (so must wait for it)
    {**MICRO["students"][1], "seeds": [1, 2, 3]},
    {"name": "student-gws", "method": "gated-ws", "preset": "stu1", "seeds": [3], "own_from": "student-kd",
     "phase1": {"max_tokens": 1200, "lr": 0.002, "warmup_steps": 5, "max_steps": 5, "eval_every": 5},
     "phase2": {"max_tokens": 1200, "lr": 0.003, "warmup_steps": 5, "max_steps": 10, "eval_every": 10}},
]


def _students_stage(run, tmp_path, students, jobs):
    """The students stage of ``students`` on a copy of the micro run."""
    from wdserve.config import PipelineConfig
    from wdserve.pipeline import Pipeline

    workdir = tmp_path / f"jobs{jobs}"
    shutil.copytree(run[1], workdir)
    pipeline = Pipeline(PipelineConfig.from_dict({**MICRO, "students": students}), workdir, device="cpu",
                        jobs=jobs)
    return pipeline, workdir


def test_students_in_parallel_train_what_one_at_a_time_trains(run, tmp_path, caplog):
    threads = max(1, torch.get_num_threads() // 2)  # each of two workers' share
    parallel, parallel_dir = _students_stage(run, tmp_path, MORE_STUDENTS, jobs=2)
    with caplog.at_level("INFO"):
        parallel.stage_students()
    assert f"training 4 students, 2 at a time, {threads} PyTorch thread(s) each" in caplog.text
    sequential, sequential_dir = _students_stage(run, tmp_path, MORE_STUDENTS, jobs=1)
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        sequential.stage_students()
    finally:
        torch.set_num_threads(saved)
    for name in ("student-kd-s3", "student-gws-s3"):
        ours, theirs = (read_checkpoint(root / "models" / name / "checkpoint_best.pt")["model"]
                        for root in (parallel_dir, sequential_dir))
        assert ours.keys() == theirs.keys()
        assert all(torch.equal(ours[key], theirs[key]) for key in ours), name
        expected = sequential.report["models"][name] | {
            "checkpoint": str(parallel_dir / "models" / name / "checkpoint_best.pt")}
        assert parallel.report["models"][name] == expected
    assert parallel.report["models"]["student-gws-s3"]["group"] == "student-gws"


def test_a_failed_student_lets_the_others_finish_then_fails_the_stage(run, tmp_path, caplog):
    students = [{**MORE_STUDENTS[0], "seeds": [3, 4]}, MORE_STUDENTS[1]]
    pipeline, workdir = _students_stage(run, tmp_path, students, jobs=2)
    (workdir / "models" / "student-kd-s3").write_text("in the way")  # its model directory cannot be made
    with caplog.at_level("INFO"), pytest.raises(FileExistsError):
        pipeline.stage_students()
    assert (workdir / "models" / "student-kd-s4" / "checkpoint_best.pt").is_file()
    assert "student-kd-s4" in json.loads((workdir / "report.json").read_text())["models"]
    assert "student-gws-s3: not trained: student-kd-s3 failed" in caplog.text
    assert not (workdir / "models" / "student-gws-s3").exists()


def test_jobs_below_one_are_refused(run, capsys):
    config, workdir = run
    assert main(["pipeline", str(config), "--workdir", str(workdir), "--jobs", "0"]) == 2
    assert "--jobs must be at least 1, got 0" in capsys.readouterr().err
