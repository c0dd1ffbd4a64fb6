"""``wdserve pipeline``: corpus -> vocabulary -> teacher -> students -> CTranslate2 -> report.

Each stage reads the previous stage's files from the run directory and writes its
own; a stage whose outputs exist is skipped, and training stages resume from their
last checkpoint, so a killed run is continued by running the same command again.
``DIR/report.json`` is rewritten after every stage, so what finished is never lost.

Config (YAML; ``wdserve.config.PipelineConfig``), every section but ``data`` and ``teacher`` optional::

    name: tiny
    seed: 1
    data:        # either synthetic: {train: N, valid: N, test: N, seed: S}
      dir: data/multi30k        # or --data-dir / $WDSERVE_DATA_DIR
      source_lang: de
      target_lang: en
      splits: {train: train, valid: val, test: test_2016_flickr}   # files {dir}/{split}.{lang}[.gz]
      clean: {max_words: 100, max_ratio: 3.0}
    vocab: {size: 8000}
    teacher: {model: {...ModelConfig fields}, train: {...TrainConfig fields}}
    seqkd: {beam_size: 4, with_bitext: true}
    students:
      - {name: student, method: wd, preset: stu1, model: {...}, data: seqkd, phase1: {...}, phase2: {...}}
    export: {quantizations: [int8, float32], verify_sentences: 100}
    evaluate: {beam_size: 4}
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from wdserve.artifacts import EXPORT_INFO, SPLITS, TEACHER, ExportDir, RunDir
from wdserve.config import PipelineConfig, StudentSpec
from wdserve.errors import ConfigError

if TYPE_CHECKING:  # distill imports torch: only at run time, inside the stages
    from wdserve.distill.model import ModelConfig
    from wdserve.distill.vocab import Vocab

log = logging.getLogger(__name__)



def configure_pipeline(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", type=Path, help="pipeline YAML, e.g. configs/tiny.yaml")
    parser.add_argument("--workdir", type=Path, required=True, help="run directory (created if missing)")
    parser.add_argument(
        "--data-dir", type=Path, default=None,
        help="directory of the corpus files (overrides data.dir and $WDSERVE_DATA_DIR)",
    )
    parser.add_argument(
        "--students", default=None, metavar="NAME,...",
        help="train, export and evaluate only these students of the config this time "
             "(default: all); a later run without it adds the rest",
    )
    parser.add_argument(
        "--device", default=os.environ.get("WDSERVE_DEVICE"),
        help="cpu, cuda or cuda:N (default: $WDSERVE_DEVICE, else cuda when present)",
    )
    parser.add_argument(
        "--jobs", type=int, default=1, metavar="N",
        help="train up to N students at once, each in its own process with 1/N of PyTorch's threads "
             "(default 1: one after another). On a CPU, several students with fewer threads each "
             "finish sooner than one at a time; on one GPU they share it",
    )


def run_pipeline(args: argparse.Namespace) -> None:
    if args.jobs < 1:
        raise ConfigError(f"--jobs must be at least 1, got {args.jobs}")
    config = PipelineConfig.load(args.config)
    if args.students:
        config = config.select_students(args.students.split(","))
    config.check_fields(str(args.config))
    Pipeline(config, args.workdir, data_dir=args.data_dir, device=args.device, jobs=args.jobs).run()


class Pipeline:
    def __init__(
        self,
        config: PipelineConfig,
        workdir: Path,
        data_dir: Path | None = None,
        device: str | None = None,
        jobs: int = 1,
    ) -> None:
        import torch

        self.config = config
        self.jobs = jobs
        self.workdir = Path(workdir)
        self.data_dir = data_dir
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.rundir = RunDir(self.workdir)
        self.report_path = self.rundir.report
        self.report: dict[str, Any] = (
            json.loads(self.report_path.read_text()) if self.report_path.is_file() else {}
        )
        self.report.update({"config": config.name, "device": self.device})
        self.report.setdefault("models", {})

    # ---------------------------------------------------------------- driver
    def run(self) -> dict[str, Any]:
        self.workdir.mkdir(parents=True, exist_ok=True)
        stages = [
            ("data", self.stage_data),
            ("vocab", self.stage_vocab),
            ("teacher", self.stage_teacher),
            ("seqkd", self.stage_seqkd),
            ("students", self.stage_students),
            ("export", self.stage_export),
            ("evaluate", self.stage_evaluate),
        ]
        for name, stage in stages:
            started = time.perf_counter()
            log.info("stage %s: start", name)
            stage()
            seconds = time.perf_counter() - started
            self.report.setdefault("stage_seconds", {})[name] = round(seconds, 2)
            self.write_report()
            log.info("stage %s: done in %.1fs", name, seconds)
        log.info("report written to %s", self.report_path)
        return self.report

    def write_report(self) -> None:
        from wdserve.distill.checkpoint import atomic_save_text

        atomic_save_text(json.dumps(self.report, indent=2, sort_keys=False) + "\n", self.report_path)

    # ---------------------------------------------------------------- inputs
    @property
    def languages(self) -> tuple[str, str]:
        data = self.config.data
        if data.synthetic is not None:
            from wdserve.distill.synthetic import SOURCE_LANG, TARGET_LANG

            return SOURCE_LANG, TARGET_LANG
        return data.source_lang, data.target_lang

    def pairs(self, split: str) -> list[tuple[str, str]]:
        from wdserve.distill.data import read_parallel

        return read_parallel(self.rundir.data(split, "src"), self.rundir.data(split, "tgt"))

    def model_names(self) -> list[str]:
        return [TEACHER] + [student.name for student in self.config.students]

    # ---------------------------------------------------------------- stages
    def stage_data(self) -> None:
        from wdserve.distill.data import clean_pairs, read_parallel, write_parallel

        if all(self.rundir.data(split, side).is_file() for split in SPLITS for side in ("src", "tgt")):
            log.info("data already prepared in %s", self.rundir.data_dir)
            return
        data = self.config.data
        if data.synthetic is not None:
            from wdserve.distill.synthetic import write_synthetic

            synthetic = dict(data.synthetic)
            seed = synthetic.pop("seed", self.config.seed)
            write_synthetic(self.rundir.data_dir, sizes=synthetic, seed=seed)
            summary = {split: synthetic.get(split) for split in SPLITS}
        else:
            root = data.corpus_dir(self.data_dir)
            src_lang, tgt_lang = self.languages
            summary = {}
            for split in SPLITS:
                stem = data.file_stem(split)
                pairs = read_parallel(_corpus_file(root, stem, src_lang), _corpus_file(root, stem, tgt_lang))
                if split == "train":
                    pairs, report = clean_pairs(pairs, **data.clean)
                    log.info("cleaning %s: %s", split, report.summary())
                    self.report["data_cleaning"] = report.summary()
                write_parallel(pairs, self.rundir.data(split, "src"), self.rundir.data(split, "tgt"))
                summary[split] = len(pairs)
        self.report["data"] = {"languages": list(self.languages), "pairs": summary}

    def stage_vocab(self) -> None:
        from wdserve.distill.vocab import train_sentencepiece

        if self.config.teacher.pretrained:
            log.info("the vocabulary comes with the pretrained teacher")
            return
        path = self.rundir.vocab
        if path.is_file():
            log.info("vocabulary exists: %s", path)
            return
        pairs = self.pairs("train")
        size = self.config.vocab.size
        train_sentencepiece([text for pair in pairs for text in pair], path, vocab_size=size)
        self.report["vocab"] = {"path": str(path), "requested_size": size}

    def vocab(self) -> Vocab:
        """The run's vocabulary: trained by stage_vocab, or the pretrained teacher's own."""
        from wdserve.distill.vocab import Vocab

        if self.config.teacher.pretrained:
            from wdserve.distill.checkpoint import read_checkpoint

            return Vocab(read_checkpoint(self.rundir.checkpoint(TEACHER))["vocab"])
        return Vocab(self.rundir.vocab)

    def meta(self, name: str, method: str, **extra: Any) -> dict[str, Any]:
        src, tgt = self.languages
        return {"name": name, "method": method, "source_lang": src, "target_lang": tgt, **extra}

    def teacher_config(self, vocab: Vocab) -> ModelConfig:
        from wdserve.distill.model import ModelConfig

        if self.config.teacher.pretrained:
            from wdserve.distill.checkpoint import read_checkpoint

            return ModelConfig.from_dict(read_checkpoint(self.rundir.checkpoint(TEACHER))["config"])
        return ModelConfig(vocab_size=len(vocab), **self.config.teacher.model)

    def stage_teacher(self) -> None:
        if self.config.teacher.pretrained:
            self.import_teacher(self.config.teacher.pretrained)
            return
        import torch

        from wdserve.distill.batching import encode_pairs
        from wdserve.distill.model import Transformer
        from wdserve.distill.train import TrainConfig, train

        vocab = self.vocab()
        torch.manual_seed(self.config.seed)
        model = Transformer(self.teacher_config(vocab))
        train_cfg = TrainConfig.from_dict(
            {"seed": self.config.seed, "device": self.device, **self.config.teacher.train})
        result = train(
            model.to(self.device),
            vocab,
            encode_pairs(vocab, self.pairs("train")),
            self.pairs("valid"),
            train_cfg,
            self.rundir.model_dir("teacher"),
            self.meta("teacher", "teacher"),
        )
        self.report["models"].setdefault("teacher", {}).update(
            {"method": "teacher", "checkpoint": str(result.best_path), "dev_bleu": result.best_bleu,
             "steps": result.steps}
        )

    def import_teacher(self, source: str) -> None:
        """The pretrained teacher as a wdserve checkpoint (``wdserve import``), once."""
        from wdserve.distill.checkpoint import read_checkpoint
        from wdserve.distill.marian import import_marian

        path = self.rundir.checkpoint(TEACHER)
        if path.is_file():
            log.info("pretrained teacher already imported: %s", path)
        else:
            log.info("importing the pretrained teacher %s", source)
            import_marian(source, path.parent)
        meta = read_checkpoint(path)["meta"]
        pair, wanted = (meta.get("source_lang"), meta.get("target_lang")), self.languages
        if None not in pair and pair != wanted:
            raise ConfigError(f"teacher.pretrained {source} translates {pair[0]} -> {pair[1]}, but the data "
                              f"is {wanted[0]} -> {wanted[1]}")
        self.report["models"].setdefault(TEACHER, {}).update(
            {"method": "teacher", "checkpoint": str(path), "pretrained": source})

    def students_needing_seqkd(self) -> list[StudentSpec]:
        return [s for s in self.config.students if s.data == "seqkd"]

    def stage_seqkd(self) -> None:
        if not self.students_needing_seqkd():
            log.info("no student trains on distilled data; skipping")
            return
        from wdserve.distill.seqkd import generate_seqkd_targets

        ct2_dir = self.export_teacher_for_generation()
        sources = [src for src, _ in self.pairs("train")]
        generate_seqkd_targets(
            self.rundir.checkpoint("teacher"),
            sources,
            self.rundir.seqkd_targets,
            beam_size=self.config.seqkd.beam_size,
            ct2_model_dir=ct2_dir,
            device=self.device,
        )

    def export_teacher_for_generation(self) -> Path | None:
        """The float32 CTranslate2 teacher (much faster than PyTorch beam search), if CTranslate2 is here."""
        try:
            import ctranslate2  # noqa: F401
        except ImportError as err:  # a GPU training host may have PyTorch but not CTranslate2
            log.warning("CTranslate2 unavailable (%s): sequence-level KD uses PyTorch beam search", err)
            return None
        return self.export("teacher", "float32")

    def seqkd_pairs(self, with_bitext: bool) -> list[tuple[str, str]]:
        from wdserve.distill.data import DataError

        bitext = self.pairs("train")
        targets = self.rundir.seqkd_targets.read_text(encoding="utf-8").splitlines()
        if len(targets) != len(bitext):
            raise DataError(f"{self.rundir.seqkd_targets} has {len(targets)} lines, "
                            f"expected {len(bitext)}; delete it to regenerate")
        distilled = [(src, hyp) for (src, _), hyp in zip(bitext, targets, strict=True) if hyp.strip()]
        return distilled + bitext if with_bitext else distilled

    def stage_students(self) -> None:
        from wdserve.distill.checkpoint import read_checkpoint
        from wdserve.distill.model import ModelConfig
        from wdserve.distill.students import student_config

        teacher_config = ModelConfig.from_dict(read_checkpoint(self.rundir.checkpoint("teacher"))["config"])
        valid = self.pairs("valid")
        datasets: dict[str, list[tuple[str, str]]] = {}  # read once, shared by students on the same data
        jobs = []
        for spec in self.config.students:
            if spec.data not in datasets:
                datasets[spec.data] = (self.pairs("train") if spec.data == "bitext"
                                       else self.seqkd_pairs(self.config.seqkd.with_bitext))
            jobs.append(StudentJob(
                spec=spec.with_seed(self.config.seed),
                config=student_config(teacher_config, spec.preset, spec.model),
                teacher=self.rundir.checkpoint(TEACHER),
                own=self.rundir.checkpoint(spec.own_from) if spec.own_from else None,
                out_dir=self.rundir.model_dir(spec.name),
                train_pairs=datasets[spec.data],
                valid_pairs=valid,
                device=self.device,
            ))
        if self.jobs == 1 or len(jobs) == 1:
            for job in jobs:
                self.record_student(job.spec, job.run())
        else:
            self.train_in_parallel(jobs)

    def train_in_parallel(self, jobs: list[StudentJob]) -> None:
        """Trains ``jobs`` in ``self.jobs`` spawned processes, each with its share of PyTorch's threads.
        A gated-ws student starts once the student it starts from has finished. A student that fails
        does not stop the others: they run to the end (their checkpoints kept), then the first failure
        is raised."""
        import multiprocessing
        from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
        from concurrent.futures.process import BrokenProcessPool

        import torch

        threads = max(1, torch.get_num_threads() // self.jobs)
        log.info("training %d students, %d at a time, %d PyTorch thread(s) each",
                 len(jobs), self.jobs, threads)
        waiting = list(jobs)  # config order: own_from always names an earlier student
        unfinished = {job.spec.name for job in jobs}
        running: dict[Future[Path], StudentJob] = {}
        failures: list[Exception] = []
        pool = ProcessPoolExecutor(
            max_workers=self.jobs, mp_context=multiprocessing.get_context("spawn"),
            initializer=_start_student_worker, initargs=(threads, logging.getLogger().getEffectiveLevel()),
        )
        with pool:
            while waiting or running:
                for job in [job for job in waiting if job.spec.own_from not in unfinished]:
                    waiting.remove(job)
                    running[pool.submit(_train_in_worker, job)] = job
                if not running:  # what is left waits for a student that failed
                    for job in waiting:
                        log.error("student %s: not trained: %s failed", job.spec.name, job.spec.own_from)
                    break
                done, _ = wait(running, return_when=FIRST_COMPLETED)
                for future in done:
                    job = running.pop(future)
                    try:
                        path = future.result()
                    except Exception as err:  # noqa: BLE001 - kept, raised after the others finish
                        log.error("student %s failed: %s", job.spec.name, err)
                        failures.append(err)
                        if isinstance(err, BrokenProcessPool):  # a worker died (killed, out of memory)
                            waiting.clear()
                        continue
                    unfinished.discard(job.spec.name)
                    self.record_student(job.spec, path)
                    self.write_report()
        if failures:
            raise failures[0]  # as the sequential run would; the worker's traceback is its cause

    def record_student(self, spec: StudentSpec, checkpoint: Path) -> None:
        self.report["models"].setdefault(spec.name, {}).update(
            {"method": spec.method, "data": spec.data, "checkpoint": str(checkpoint), "seed": spec.seed}
            | ({"group": spec.group} if spec.group else {})
        )

    def stage_export(self) -> None:
        from wdserve.export.verify import verify_export

        quantizations = self.config.export.quantizations
        sources = [src for src, _ in self.pairs("test")][: self.config.export.verify_sentences]
        for name in self.model_names():
            dirs = {}
            for quantization in quantizations:
                dirs[quantization] = self.export(name, quantization)
            entry = self.report["models"].setdefault(name, {})
            entry["exports"] = {q: str(p) for q, p in dirs.items()}
            entry["export_size_bytes"] = {q: _dir_size(p) for q, p in dirs.items()}
            entry["parity"] = verify_export(self.rundir.checkpoint(name), dirs, sources, device=self.device)
            self.write_report()

    def export(self, name: str, quantization: str) -> Path:
        """The CTranslate2 dir of ``name``, converted again when its checkpoint has changed since."""
        from wdserve.distill.checkpoint import file_sha256
        from wdserve.export.convert import convert_checkpoint

        out, checkpoint = self.rundir.export_dir(name, quantization), self.rundir.checkpoint(name)
        if (out / EXPORT_INFO).is_file():
            if ExportDir.read(out).info.checkpoint_sha256 == file_sha256(checkpoint):
                return out
            log.info("%s was exported from an older checkpoint; exporting again", out)
        convert_checkpoint(checkpoint, out, quantization=quantization, name=name, force=True)
        return out

    def record_bleu(self, name: str, bleu: float) -> None:
        """Each export of ``name`` carries its checkpoint's test BLEU in model.json, where the server's
        /models and side-by-side page read it (an export knows what it is; the report is the run's)."""
        for quantization in self.config.export.quantizations:
            out = self.rundir.export_dir(name, quantization)
            if (out / EXPORT_INFO).is_file():
                export = ExportDir.read(out)
                ExportDir.write_info(out, replace(export.info, bleu=round(bleu, 2)))

    def stage_evaluate(self) -> None:
        import torch

        from wdserve.distill.decode import translate
        from wdserve.distill.evaluate import evaluate_checkpoint, score
        from wdserve.distill.model import Transformer

        beam = self.config.evaluate.beam_size
        test = self.rundir.data("test", "src"), self.rundir.data("test", "tgt")
        for name in self.model_names():
            result = evaluate_checkpoint(self.rundir.checkpoint(name), *test, beam_size=beam,
                                         device=self.device)
            entry = self.report["models"].setdefault(name, {})
            entry.update({
                "parameters": result["parameters"],
                "test": {key: result[key] for key in ("bleu", "chrf", "bleu_signature", "chrf_signature")}
                | {"beam_size": beam, "pytorch_seconds": result["seconds"]},
            })
            log.info("%s: BLEU %.2f chrF %.2f (%d parameters)", name, entry["test"]["bleu"],
                     entry["test"]["chrf"], entry["parameters"])
            self.record_bleu(name, entry["test"]["bleu"])
            self.write_report()
        self.report["groups"] = seed_groups(self.report["models"])
        # The floor a trained teacher must clear: the same architecture, untrained.
        vocab = self.vocab()
        torch.manual_seed(self.config.seed)
        untrained = Transformer(self.teacher_config(vocab)).eval()
        pairs = self.pairs("test")
        hypotheses = translate(untrained, vocab, [src for src, _ in pairs], beam_size=1)
        self.report["untrained_test_bleu"] = score(hypotheses, [ref for _, ref in pairs])["bleu"]


@dataclass(frozen=True)
class StudentJob:
    """What one student's training needs, picklable, so that a worker process can run it."""

    spec: StudentSpec
    config: ModelConfig
    teacher: Path
    own: Path | None  # gated-ws: the checkpoint that starts W_own
    out_dir: Path
    train_pairs: list[tuple[str, str]]
    valid_pairs: list[tuple[str, str]]
    device: str

    def run(self) -> Path:
        from wdserve.distill.students import train_student

        log.info("student %s: method %s on %s data (%d pairs)", self.spec.name, self.spec.method,
                 self.spec.data, len(self.train_pairs))
        return train_student(self.teacher, self.spec, self.config, self.train_pairs, self.valid_pairs,
                             self.out_dir, device=self.device, own_checkpoint=self.own)


def _start_student_worker(threads: int, level: int) -> None:
    """A spawned worker's setup: its share of the threads, and log lines that say whose they are."""
    import torch

    torch.set_num_threads(threads)
    logging.basicConfig(
        level=level, datefmt="%H:%M:%S",
        format="%(asctime)s %(levelname)s [%(processName)s] %(name)s: %(message)s",
    )


def _train_in_worker(job: StudentJob) -> Path:
    import multiprocessing

    multiprocessing.current_process().name = job.spec.name
    return job.run()


def seed_groups(models: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Test BLEU and chrF over the seeds of every student given ``seeds``: mean and sample standard
    deviation (n - 1; 0 for one run), from the ``models`` entries of report.json that have been evaluated."""
    import statistics

    runs: dict[str, dict[str, dict[str, Any]]] = {}
    for name, entry in models.items():
        if entry.get("group") and "test" in entry:
            runs.setdefault(entry["group"], {})[name] = entry
    groups = {}
    for group, members in runs.items():
        summary: dict[str, Any] = {"method": next(iter(members.values()))["method"],
                                   "seeds": [members[name].get("seed") for name in members],
                                   "models": list(members)}
        for metric in ("bleu", "chrf"):
            values = [members[name]["test"][metric] for name in members]
            summary[metric] = {"mean": round(statistics.fmean(values), 2),
                               "std": round(statistics.stdev(values), 2) if len(values) > 1 else 0.0,
                               "values": values}
        groups[group] = summary
    return groups


def _corpus_file(root: Path, split: str, lang: str) -> Path:
    from wdserve.distill.data import DataError

    for candidate in (root / f"{split}.{lang}.gz", root / f"{split}.{lang}"):
        if candidate.is_file():
            return candidate
    raise DataError(f"corpus file not found: {root / f'{split}.{lang}'}[.gz]")


def _dir_size(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())
