"""``wdserve data`` and ``wdserve evaluate`` through the command-line entry point."""

import gzip
import subprocess
import sys

import pytest

import wdserve.cli
from wdserve.distill.data import MULTI30K_LANGUAGES, MULTI30K_SPLITS, read_parallel
from wdserve.distill.synthetic import write_synthetic


@pytest.fixture
def wdserve_main(monkeypatch):
    """``wdserve.cli.main`` with only this area's subcommands, so other areas' modules cannot break it."""
    commands = {name: wdserve.cli.COMMANDS[name] for name in ("data", "evaluate")}
    monkeypatch.setattr(wdserve.cli, "COMMANDS", commands)
    return lambda *argv: wdserve.cli.main([str(arg) for arg in argv])


def test_data_synthetic_writes_the_requested_splits(wdserve_main, tmp_path, capsys):
    out = tmp_path / "corpus"
    assert wdserve_main("data", "synthetic", out, "--train", 40, "--valid", 5, "--test", 7, "--seed", 3) == 0
    assert "40 train, 5 valid, 7 test" in capsys.readouterr().out
    sizes = {split: len(read_parallel(out / f"{split}.src", out / f"{split}.tgt"))
             for split in ("train", "valid", "test")}
    assert sizes == {"train": 40, "valid": 5, "test": 7}
    write_synthetic(tmp_path / "direct", sizes={"train": 40, "valid": 5, "test": 7}, seed=3)
    assert (out / "test.tgt").read_bytes() == (tmp_path / "direct" / "test.tgt").read_bytes()


def test_data_synthetic_rejects_an_empty_split(wdserve_main, tmp_path, capsys):
    assert wdserve_main("data", "synthetic", tmp_path, "--test", 0) == 2  # a bad flag, as argparse exits
    assert "at least one pair" in capsys.readouterr().err


def test_multi30k_download_offline_fails_with_a_way_out(wdserve_main, tmp_path, capsys):
    # Port 9 on localhost refuses at once: no network is touched.
    code = wdserve_main("data", "multi30k", tmp_path / "m30k", "--base-url", "http://127.0.0.1:9/raw",
                        "--timeout", 5)
    err = capsys.readouterr().err
    assert code == 1
    assert "cannot download http://127.0.0.1:9/raw/train.de.gz" in err
    assert "existing copy of Multi30k" in err and "data.dir" in err
    assert not list((tmp_path / "m30k").iterdir())  # nothing half-written


def test_multi30k_download_fetches_every_file_and_keeps_existing_ones(wdserve_main, tmp_path):
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    for split in MULTI30K_SPLITS:
        for lang in MULTI30K_LANGUAGES:
            (mirror / f"{split}.{lang}.gz").write_bytes(gzip.compress(f"{split} {lang}\n".encode()))
    out = tmp_path / "m30k"
    out.mkdir()
    (out / "val.fr.gz").write_bytes(gzip.compress(b"already here\n"))
    assert wdserve_main("data", "multi30k", out, "--base-url", mirror.as_uri()) == 0
    assert len(list(out.glob("*.gz"))) == 9 and not list(out.glob(".*"))
    assert read_parallel(out / "train.de.gz", out / "train.en.gz") == [("train de", "train en")]
    assert gzip.decompress((out / "val.fr.gz").read_bytes()) == b"already here\n"


def test_multi30k_download_rejects_a_non_gzip_answer(wdserve_main, tmp_path, capsys):
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    (mirror / "train.de.gz").write_text("<html>rate limited</html>")
    assert wdserve_main("data", "multi30k", tmp_path / "out", "--base-url", mirror.as_uri()) == 1
    assert "did not return a gzip file" in capsys.readouterr().err
    assert not (tmp_path / "out" / "train.de.gz").exists()


@pytest.mark.parametrize("model", ["models/teacher/checkpoint_best.pt", "export/student-int8"])
def test_evaluate_prints_scores_and_signatures(wdserve_main, tiny_workdir, tmp_path, capsys, model):
    output = tmp_path / "hyp.txt"
    code = wdserve_main("evaluate", tiny_workdir / model, "--src", tiny_workdir / "data" / "test.src",
                        "--ref", tiny_workdir / "data" / "test.tgt", "--beam-size", 2, "--output", output)
    printed = capsys.readouterr().out
    assert code == 0
    assert "30 sentences, beam 2" in printed
    assert "BLEU" in printed and "nrefs:1|case:mixed|eff:no|tok:13a" in printed
    assert "chrF" in printed and "nc:6|nw:0" in printed
    assert len(output.read_text(encoding="utf-8").splitlines()) == 30


def test_evaluate_names_a_missing_reference_file(wdserve_main, tiny_workdir, tmp_path, capsys):
    code = wdserve_main("evaluate", tiny_workdir / "models" / "teacher" / "checkpoint_best.pt",
                        "--src", tiny_workdir / "data" / "test.src", "--ref", tmp_path / "nothere.tgt")
    assert code == 1
    assert "nothere.tgt" in capsys.readouterr().err


def test_building_the_full_parser_imports_neither_torch_nor_ctranslate2():
    code = ("import sys, wdserve.cli; wdserve.cli.build_parser(); "
            "heavy = {'torch', 'ctranslate2'} & set(sys.modules); assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
