"""How ``wdserve`` reports failures: a ``WdserveError`` is one line and an exit code, a bug a traceback."""

import importlib
import sys
import types

import pytest
import yaml

import wdserve.cli
from wdserve.errors import ConfigError, WdserveError


@pytest.fixture
def command(monkeypatch):
    """``wdserve.cli.main`` with one subcommand, ``fail``, whose run raises the exception it is given."""
    module = types.ModuleType("fake_command")
    module.configure_fail = lambda parser: None
    monkeypatch.setitem(sys.modules, module.__name__, module)
    monkeypatch.setattr(wdserve.cli, "COMMANDS", {"fail": (module.__name__, "fails")})

    def run(error: BaseException) -> int:
        def run_fail(args):
            raise error

        module.run_fail = run_fail
        return wdserve.cli.main(["fail"])

    return run


@pytest.mark.parametrize("error, code", [(WdserveError("model 'x': no model.bin in /m"), 1),
                                         (ConfigError("--verify-n must be at least 1"), 2)])
def test_main_prints_a_wdserve_error_as_one_line_and_its_exit_code(command, capsys, error, code):
    assert command(error) == code
    printed = capsys.readouterr()
    assert printed.err == f"wdserve fail: error: {error}\n"
    assert printed.out == ""


def test_main_leaves_a_bug_its_traceback(command):
    with pytest.raises(KeyError, match="oops"):
        command(KeyError("oops"))


def test_a_missing_corpus_file_reaches_the_user_as_a_message(tmp_path, capsys):
    config = tmp_path / "pipeline.yaml"
    config.write_text(yaml.safe_dump({"data": {"source_lang": "de", "target_lang": "en"}, "teacher": {}}))
    (tmp_path / "corpus").mkdir()
    code = wdserve.cli.main(["pipeline", str(config), "--workdir", str(tmp_path / "run"),
                             "--data-dir", str(tmp_path / "corpus"), "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 1
    assert err == f"wdserve pipeline: error: corpus file not found: {tmp_path / 'corpus' / 'train.de'}[.gz]\n"


def test_a_missing_pipeline_config_is_a_usage_error(tmp_path, capsys):
    assert wdserve.cli.main(["pipeline", str(tmp_path / "nope.yaml"), "--workdir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err == f"wdserve pipeline: error: pipeline config not found: {tmp_path / 'nope.yaml'}\n"


def test_train_names_an_unknown_config_section(tmp_path, capsys):
    config = tmp_path / "teacher.yaml"
    config.write_text("modle: {enc_layers: 2}\n")
    files = [str(tmp_path / name) for name in ("t.src", "t.tgt", "v.src", "v.tgt", "spm.model", "out")]
    code = wdserve.cli.main(["train", "--train-src", files[0], "--train-tgt", files[1], "--valid-src",
                             files[2], "--valid-tgt", files[3], "--vocab", files[4], "--out", files[5],
                             "--config", str(config)])
    assert code == 2
    assert capsys.readouterr().err == (f"wdserve train: error: {config}: unknown keys ['modle']; "
                                       "known: ['model', 'train']\n")


@pytest.mark.parametrize("argv, owner, name", [
    (["distill", "--method", "wd2"], "wdserve.config", "METHODS"),
    (["distill", "--preset", "stu3"], "wdserve.config", "PRESETS"),
    (["export", "ckpt.pt", "out", "-q", "int4"], "wdserve.artifacts", "QUANTIZATIONS"),
])
def test_an_unknown_choice_is_refused_with_its_owners_list(capsys, argv, owner, name):
    """--method, --preset and --quantization accept exactly the lists their owners define."""
    with pytest.raises(SystemExit) as exit_info:
        wdserve.cli.main(argv)
    assert exit_info.value.code == 2
    choices = getattr(importlib.import_module(owner), name)
    listed = ", ".join(map(repr, choices))
    assert f"invalid choice: {argv[-1]!r} (choose from {listed})" in capsys.readouterr().err
