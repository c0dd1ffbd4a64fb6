"""``wdserve soak`` for a few seconds: every kind of client reaches the server, and the report says so.

The soak's figures (RSS growth, latency) are not asserted: a seconds-long soak on a shared
machine says nothing about them. What is asserted would fail if a client kind, a burst, the
server sampling or the descriptor check broke.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from wdserve.loadtest.soak import Burst


def test_a_short_soak_reports_every_kind_of_client_and_the_servers_descriptors(tiny_workdir: Path,
                                                                                tmp_path: Path) -> None:
    out = tmp_path / "soak"
    command = [sys.executable, "-m", "wdserve.cli", "soak", "--workdir", str(tiny_workdir), "--out", str(out),
               "--rate", "40", "--warmup", "1", "--duration", "4", "--sample", "1", "--cooldown", "30",
               "--abandon", "0.1", "--slow", "0.1", "--malformed", "0.2", "--slow-interval", "0.2",
               "--abandon-model", "teacher-float32", "--burst", "abandon:10@1", "--burst", "slow:10@1",
               "--server-arg=--body-timeout-s=1", "--server-arg=--header-timeout-s=1",
               "--server-arg=--keep-alive-timeout-s=1", "--server-arg=--max-length-limit=64",
               "--server-arg=--default-max-length=24"]
    finished = subprocess.run(command, capture_output=True, text=True, timeout=240)
    assert finished.returncode == 0, finished.stderr[-3000:]
    report = json.loads((out / "soak.json").read_text(encoding="utf-8"))
    assert (out / "soak.md").read_text(encoding="utf-8").startswith("# wdserve soak")

    clients, statuses = report["summary"]["clients"], report["summary"]["statuses"]
    assert clients["normal"].get("200", 0) > 0 and set(clients["normal"]) == {"200"}
    assert clients["slow"] and set(clients["slow"]) <= {"408", "closed"}
    assert any(outcome.endswith("-431") for outcome in clients["malformed"])
    assert {"200", "408", "400"} <= set(statuses)
    assert [burst["kind"] for burst in report["bursts"]] == ["abandon", "slow"]
    assert report["bursts"][0]["abandon"]["sentences_sent"] == 100
    assert report["bursts"][1]["slow_closed_s"]["max"] is not None

    samples = [sample for sample in report["samples"] if "fds" in sample]
    assert {"baseline", "load", "cool-down"} <= {sample["phase"] for sample in samples}
    assert all(sample["rss_mb"] > 0 for sample in samples)
    targets = {target["target"]: target["met"] for target in report["targets"]}
    assert targets["open descriptors back to the pre-load count after the load"]
    assert targets["zero 5xx (503 load shedding included)"]
    assert targets["no ERROR lines or tracebacks in the server log"]


@pytest.mark.parametrize(("text", "burst"), [("slow:3000@30", Burst("slow", 3000, 30.0)),
                                             ("abandon:200", Burst("abandon", 200, 0.0))])
def test_burst_option_parses(text: str, burst: Burst) -> None:
    assert Burst.parse(text) == burst


@pytest.mark.parametrize("text", ["slow", "fast:10@1", "slow:0", "slow:10@soon"])
def test_bad_burst_option_is_named(text: str) -> None:
    with pytest.raises(ValueError, match="KIND:COUNT"):
        Burst.parse(text)
