"""The Multi30k configs on the real files (skipped where the Multi30k files are absent)."""

from pathlib import Path

import pytest

from wdserve.config import PipelineConfig
from wdserve.distill.data import read_parallel
from wdserve.pipeline import Pipeline

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.multi30k


@pytest.mark.parametrize("config", ["multi30k-de-en.yaml", "multi30k-de-en-cpu.yaml"])
def test_data_stage_reads_and_cleans_the_real_corpus(config, multi30k_dir, tmp_path):
    loaded = PipelineConfig.load(REPO / "configs" / config)
    loaded.check_fields()
    pipeline = Pipeline(loaded, tmp_path, data_dir=multi30k_dir, device="cpu")
    pipeline.stage_data()
    pairs = pipeline.report["data"]["pairs"]
    assert pairs["valid"] == 1014 and pairs["test"] == 1000
    assert 28_000 < pairs["train"] <= 29_000  # cleaning drops a few, never most
    assert pipeline.report["data_cleaning"].startswith(f"kept {pairs['train']} of 29000")
    assert pipeline.languages == ("de", "en")
    src, ref = read_parallel(tmp_path / "data" / "test.src", tmp_path / "data" / "test.tgt")[0]
    assert src.startswith("Ein Mann mit einem orangefarbenen Hut")
    assert ref.startswith("A man in an orange hat")
