"""Users who translate test-set sentences through ``POST /translate``, as fast as they are answered.

    locust -f loadtest/locustfile.py --host http://127.0.0.1:8000 --sentences runs/tiny/data/test.src

Options (also in the web UI, and as ``LOCUST_*`` environment variables): ``--sentences``,
``--models`` (comma-separated; users take them in turn), ``--sentences-per-request``,
``--beam-size``, ``--max-length``, ``--source`` / ``--target`` (default: from GET /models),
``--api-key``, ``--seed`` and ``--client-stats PREFIX``. Requests are named ``/translate <model>``
so that locust's statistics keep the models apart. Users are closed-loop: ``-u 1`` measures
latency, many users measure throughput.

With ``--client-stats PREFIX`` there is one ``PREFIX.<process>.json`` per locust process: the words
of the translations it received per model, and its own CPU seconds over the test, which is how
``wdserve bench`` tells a saturated load generator from a saturated server.

Distributed (``--master`` here, ``--worker --master-host HOST`` on any number of machines, or
``--processes N`` on one): only the master reads ``--sentences``; each worker asks the master for
them, and reports its counters and CPU seconds with its stats, so the master writes every
process's ``PREFIX.<process>.json`` and a worker needs neither the file nor a shared disk.
"""

from __future__ import annotations

import itertools
import json
import os
import random
import re
import socket
import time
from pathlib import Path

import gevent
import locust.stats
from locust import FastHttpUser, events, task
from locust.exception import StopUser
from locust.runners import MasterRunner, WorkerRunner

CLIENT: dict = {}  # this process's sentences and counters, written at test stop
SENTENCES_WAIT_S = 30.0  # how long a worker's user waits for the master's sentences
_user_numbers = itertools.count()


@events.init_command_line_parser.add_listener
def add_options(parser) -> None:
    parser.add_argument("--sentences", default="runs/tiny/data/test.src", help="sentences, one per line")
    parser.add_argument("--models", default="teacher,student", help="served model names, comma-separated")
    parser.add_argument("--sentences-per-request", type=int, default=1, help="sentences sent as one q list")
    parser.add_argument("--beam-size", type=int, default=0, help="beam size (0: the server's)")
    parser.add_argument("--max-length", type=int, default=0, help="max_length (0: the server's)")
    parser.add_argument("--source", default="", help="source language (default: from GET /models)")
    parser.add_argument("--target", default="", help="target language (default: from GET /models)")
    parser.add_argument("--api-key", default="", help="api_key sent with every request")
    parser.add_argument("--seed", type=int, default=1, help="seed of each user's sentence order")
    parser.add_argument("--client-stats", default="", include_in_web_ui=False,
                       help="write PREFIX.<host>-<pid>.json per locust process: words received, CPU seconds")


@events.init.add_listener
def read_sentences(environment, runner, **_kwargs) -> None:
    if isinstance(runner, WorkerRunner):  # the master has the file: ask it (answered in send_sentences)
        runner.register_message("wdserve_sentences", receive_sentences)
        runner.send_message("wdserve_sentences_please")
        return
    path = Path(environment.parsed_options.sentences)
    if not path.is_file():
        raise SystemExit(f"sentence file not found: {path}; give --sentences FILE (or LOCUST_SENTENCES), "
                         "one source sentence per line (e.g. DIR/data/test.src of `wdserve pipeline`)")
    CLIENT["sentences"] = [s.strip() for s in path.read_text(encoding="utf-8").splitlines() if s.strip()]
    CLIENT["client_stats_prefix"] = environment.parsed_options.client_stats
    if not CLIENT["sentences"]:
        raise SystemExit(f"sentence file {path} has no non-empty lines")
    if isinstance(runner, MasterRunner):
        runner.register_message("wdserve_sentences_please", send_sentences)
        environment.events.worker_report.add_listener(collect_client_stats)


def send_sentences(environment, msg, **_kwargs) -> None:
    environment.runner.send_message("wdserve_sentences", CLIENT["sentences"], client_id=msg.node_id)


def receive_sentences(environment, msg, **_kwargs) -> None:
    CLIENT["sentences"] = msg.data


@events.test_start.add_listener
def start_counting(environment, **_kwargs) -> None:
    CLIENT.update(models={}, started=time.monotonic(), cpu_started=time.process_time(), languages={})


def client_stats() -> dict:
    """This process's counters since the test started: words received and its own CPU seconds."""
    return {"process": f"{socket.gethostname()}-{os.getpid()}",
            "wall_s": time.monotonic() - CLIENT["started"],
            "cpu_s": time.process_time() - CLIENT["cpu_started"], "models": CLIENT["models"]}


def write_client_stats_file(prefix: str, stats: dict) -> None:
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", stats["process"])
    Path(f"{prefix}.{name}.json").write_text(json.dumps(stats, indent=1) + "\n", encoding="utf-8")


@events.test_stop.add_listener
def write_client_stats(environment, **_kwargs) -> None:
    prefix = environment.parsed_options.client_stats
    if prefix and "started" in CLIENT and not isinstance(environment.runner, WorkerRunner):
        write_client_stats_file(prefix, client_stats())


@events.report_to_master.add_listener
def report_client_stats(client_id, data, **_kwargs) -> None:
    # Sent with every stats report (every few seconds, and once more when the worker stops), so the
    # master's copy is at most one report old even when a worker dies.
    if "started" in CLIENT:
        data["wdserve_client"] = client_stats()


def collect_client_stats(client_id, data, **_kwargs) -> None:
    """On the master: a worker's counters, rewritten with each of its reports (the last one is final)."""
    prefix = CLIENT.get("client_stats_prefix")
    if prefix and "wdserve_client" in data:
        write_client_stats_file(prefix, data["wdserve_client"])


@events.quitting.add_listener
def give_csv_writer_a_last_turn(environment, **_kwargs) -> None:
    # Locust rewrites *_stats.csv from a greenlet every CSV_STATS_INTERVAL_SEC and not again at exit,
    # so the file can miss the run's last second (locust issues #1806, #2299). Users have stopped by
    # now: one more turn of that greenlet writes the final numbers, the ones the HTML report shows.
    if environment.parsed_options.csv_prefix:
        gevent.sleep(locust.stats.CSV_STATS_INTERVAL_SEC + 0.25)


def request_name(model: str) -> str:
    """The name locust files a model's requests under (``wdserve bench`` reads it back)."""
    return f"/translate {model}"


class TranslateUser(FastHttpUser):
    """Posts the next sentence(s) of its own shuffled copy of the test set, without pausing."""

    def on_start(self) -> None:
        options = self.environment.parsed_options
        number = next(_user_numbers)
        self.wait_for_sentences()
        models = [m.strip() for m in options.models.split(",") if m.strip()]
        self.model = models[number % len(models)]
        self.languages = self.languages_of(self.model)
        order = list(range(len(CLIENT["sentences"])))
        random.Random(options.seed * 1_000_003 + number).shuffle(order)
        self.next_index = itertools.cycle(order)
        self.extra = {key: value for key, value in (("beam_size", options.beam_size),
                      ("max_length", options.max_length), ("api_key", options.api_key)) if value}

    @staticmethod
    def wait_for_sentences() -> None:
        """On a worker the sentences come from the master, asked for at start-up."""
        deadline = time.monotonic() + SENTENCES_WAIT_S
        while "sentences" not in CLIENT:
            if time.monotonic() > deadline:
                raise StopUser(f"no sentences from the locust master within {SENTENCES_WAIT_S:.0f}s")
            gevent.sleep(0.05)

    def languages_of(self, model: str) -> tuple[str, str]:
        options = self.environment.parsed_options
        if options.source and options.target:
            return options.source, options.target
        if model not in CLIENT["languages"]:
            listing = self.client.get("/models", name="/models").json()
            CLIENT["languages"].update({alias: (m["source_lang"], m["target_lang"])
                                        for m in listing for alias in (m["name"], *m["aliases"])})
        if model not in CLIENT["languages"]:
            raise StopUser(f"model {model!r} is not served; see GET /models")
        return CLIENT["languages"][model]

    @task
    def translate(self) -> None:
        count = self.environment.parsed_options.sentences_per_request
        texts = [CLIENT["sentences"][next(self.next_index)] for _ in range(count)]
        payload = {"q": texts[0] if count == 1 else texts, "source": self.languages[0],
                   "target": self.languages[1], "model": self.model, **self.extra}
        with self.client.post("/translate", json=payload, name=request_name(self.model),
                              catch_response=True) as response:
            if response.status_code != 200:
                response.failure(f"HTTP {response.status_code}: {(response.text or '')[:200]}")
                return
            try:
                translated = response.json()["translatedText"]
            except (ValueError, KeyError, TypeError):
                response.failure(f"no translatedText in the answer: {(response.text or '')[:200]}")
                return
            outputs = [translated] if count == 1 else translated
            counts = CLIENT["models"].setdefault(self.model, {"responses": 0, "sentences": 0, "words": 0})
            counts["responses"] += 1
            counts["sentences"] += len(outputs)
            counts["words"] += sum(len(text.split()) for text in outputs)
