"""wdserve.artifacts: the run and export directories, and one output limit for every decoding path."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from wdserve.artifacts import (
    EXPORT_INFO,
    ArtifactError,
    ExportDir,
    ExportInfo,
    OutputLimit,
    RunDir,
)
from wdserve.distill.checkpoint import load_model, save_checkpoint
from wdserve.distill.decode import translate
from wdserve.distill.evaluate import evaluate_ctranslate2
from wdserve.distill.model import ModelConfig, Transformer
from wdserve.distill.vocab import Vocab
from wdserve.export.convert import convert_checkpoint
from wdserve.pieces import Tokenizer
from wdserve.server.models import load_model as load_served
from wdserve.server.settings import ServeSettings


def test_run_dir_finds_every_export_teacher_first(tiny_workdir: Path):
    run = RunDir(tiny_workdir)
    exports = run.exports()
    assert exports[0].info.name == "teacher"
    described = (tiny_workdir / "export").glob("*/model.json")
    assert {e.dir_name for e in exports} == {path.parent.name for path in described}
    for export in exports:
        assert export.path == run.export_dir(export.info.name, export.info.quantization)
        assert export.info.checkpoint == str(run.checkpoint(export.info.name))
    assert run.data("test", "src").is_file() and run.vocab.is_file()


def test_a_run_without_exports_says_what_to_run(tmp_path: Path):
    with pytest.raises(ArtifactError, match="run `wdserve pipeline`"):
        RunDir(tmp_path).exports()
    (tmp_path / "export").mkdir()
    with pytest.raises(ArtifactError, match="nothing exported yet"):
        RunDir(tmp_path).exports()


def test_export_description_round_trips_and_tolerates_newer_keys(tiny_workdir: Path, tmp_path: Path):
    source = ExportDir.read(tiny_workdir / "export" / "student-int8")
    copy = tmp_path / "student-int8"
    shutil.copytree(source.path, copy)
    values = json.loads((copy / EXPORT_INFO).read_text()) | {"written_by_a_newer_wdserve": True}
    (copy / EXPORT_INFO).write_text(json.dumps(values))
    assert ExportDir.read(copy).info == source.info
    ExportDir.write_info(copy, source.info)
    assert ExportDir.read(copy).info == source.info
    assert source.info.max_positions == source.info.architecture["max_positions"]

    (copy / EXPORT_INFO).write_text("[1, 2]")
    with pytest.raises(ArtifactError, match="not a wdserve export description"):
        ExportDir.read(copy)
    (copy / EXPORT_INFO).unlink()
    assert ExportDir.read(copy, require_info=False).info is None
    with pytest.raises(ArtifactError, match="model.json is missing"):
        ExportDir.read(copy)
    (copy / "sentencepiece.model").unlink()
    with pytest.raises(ArtifactError, match="not an exported model: sentencepiece.model is missing"):
        ExportDir.read(copy, require_info=False)


def test_an_export_described_before_split_vocabularies_has_one_joint_model(tiny_workdir: Path,
                                                                           tmp_path: Path):
    copy = tmp_path / "teacher-int8"
    shutil.copytree(tiny_workdir / "export" / "teacher-int8", copy)
    values = json.loads((copy / EXPORT_INFO).read_text())
    assert values.pop("source_vocab") == values.pop("target_vocab") == "sentencepiece.model"
    (copy / EXPORT_INFO).write_text(json.dumps(values))
    export = ExportDir.read(copy)
    assert export.source_vocab == export.target_vocab == copy / "sentencepiece.model"
    tokenizer = Tokenizer.for_export(export)
    assert tokenizer.is_joint and tokenizer.source_end == ()


def test_output_limit_counts_the_sources_end_of_sentence():
    limit = OutputLimit(ratio=1.5, margin=10)
    assert limit.tokens(3, max_length=256) == int(1.5 * 4 + 10)
    assert limit.tokens(300, max_length=64) == 64
    assert OutputLimit(ratio=0, margin=0).tokens(5, max_length=8) == 1
    assert ExportInfo("m", "int8").max_positions is None


@pytest.fixture(scope="module")
def rambling_export(tiny_workdir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """An untrained model, which rarely writes </s>: nearly every output runs into its limit, so any
    two paths that limit outputs differently translate differently."""
    vocab = Vocab(RunDir(tiny_workdir).vocab)
    torch.manual_seed(3)
    config = ModelConfig(vocab_size=len(vocab), enc_layers=1, enc_dim=32, enc_heads=2, enc_ffn=64,
                         dec_layers=1, dec_dim=32, dec_heads=2, dec_ffn=64, dropout=0.0, max_positions=128)
    root = tmp_path_factory.mktemp("rambling")
    checkpoint = root / "checkpoint_best.pt"
    save_checkpoint(checkpoint, Transformer(config).eval(), vocab,
                    {"name": "rambler", "method": "teacher", "source_lang": "xx", "target_lang": "yy"})
    return checkpoint, convert_checkpoint(checkpoint, root / "rambler-float32", quantization="float32")


def test_evaluation_decodes_exactly_as_the_server_does(tiny_workdir: Path,
                                                       rambling_export: tuple[Path, Path]):
    checkpoint, export = rambling_export
    src, ref = RunDir(tiny_workdir).data("test", "src"), RunDir(tiny_workdir).data("test", "tgt")
    sources = src.read_text(encoding="utf-8").splitlines()[:12]
    settings = ServeSettings()
    limit = OutputLimit(settings.output_length_ratio, settings.output_length_margin)
    served = load_served("rambler", export, output_limit=limit)
    pieces = [served.encode(text) for text in sources]
    served_outputs = [output.text for output in served.translate_texts(pieces, beam_size=2,
                                                                          max_length=settings.default_max_length)]
    evaluated = evaluate_ctranslate2(export, src, ref, beam_size=2)["hypotheses"][:12]
    assert evaluated == served_outputs
    # the test has teeth: the outputs are their limits' length, well short of the call's cap
    cap = settings.default_max_length
    lengths = [len(p) for p in served.translate_pieces(pieces, 2, cap)]
    at_limit = [n == limit.tokens(len(p), cap) for n, p in zip(lengths, pieces, strict=True)]
    assert sum(at_limit) >= len(pieces) // 2 and max(lengths) < cap
    # and PyTorch's search, which the pipeline's BLEU comes from, stops where the server does
    model, vocab, _ = load_model(checkpoint)
    greedy = [output.text for output in served.translate_texts(pieces, 1, settings.default_max_length)]
    assert translate(model, vocab, sources, beam_size=1) == greedy


SERVER = ["wdserve.server.app", "wdserve.server.cli", "wdserve.server.service", "wdserve.server.models",
          "wdserve.server.batching"]
LOADTEST = ["wdserve.loadtest.accounting", "wdserve.loadtest.baselines", "wdserve.loadtest.bench",
            "wdserve.loadtest.cli", "wdserve.loadtest.report", "wdserve.loadtest.sweep",
            "wdserve.loadtest.plots"]


@pytest.mark.parametrize("modules, banned", [
    (SERVER, ("torch", "wdserve.distill", "wdserve.export")),
    (LOADTEST, ("torch", "wdserve.export")),  # distill.evaluate's sacreBLEU scoring is torch-free
], ids=["server", "loadtest"])
def test_serving_and_load_testing_never_import_pytorch(modules: list[str], banned: tuple[str, ...]):
    """The serve and loadtest images have no PyTorch: their modules, their subcommand's parser and the
    app must not import it (nor, for the server, any training or export code)."""
    code = (
        "import argparse, importlib, sys\n"
        f"for name in {modules!r}: importlib.import_module(name)\n"
        "from wdserve.loadtest.cli import configure_bench\n"
        "from wdserve.server.cli import configure_serve\n"
        "configure_serve(argparse.ArgumentParser()); configure_bench(argparse.ArgumentParser())\n"
        "from wdserve.server.app import create_app\n"
        "from wdserve.server.settings import ServeSettings\n"
        "create_app(ServeSettings())\n"
        f"banned = {banned!r}\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in banned or m.startswith(banned)))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
