"""The Docker setup, checked without an engine: what the compose smoke test cannot see.

tests/docker/test_compose_smoke.py runs the default stack on a real engine (build, up, scaling, a
replica stopped under load, the bench, down) and so replaces the literal checks this file used to
make of it. What stays here is what that run does not exercise, or what CI (no engine) should still
catch: the command of every documented variant (GPU, Multi30k, pretrained teacher) is a real
`wdserve` invocation parsed by the CLI the container runs; the server's environment in each
variant is valid settings naming models the pipeline trains; health checks name real routes; the
images install the pyproject extras the README documents and the torch the CI pins; the GPU image
puts cuBLAS and cuDNN where its Python looks; `docker compose config` (or v1 `docker-compose config`)
accepts every variant where a compose CLI is installed.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "docker" / "Dockerfile"
COMPOSE = REPO / "compose.yaml"
COMPOSE_GPU = REPO / "compose.gpu.yaml"
COMPOSE_MULTI30K = REPO / "docker" / "compose.multi30k.yaml"
COMPOSE_PRETRAINED = REPO / "docker" / "compose.pretrained.yaml"
VARIABLES = {  # every variable a documented variant requires
    "WDSERVE_CONFIG": "configs/multi30k-de-en.yaml",
    "WDSERVE_RUN": "m30k",
    "MULTI30K_DIR": "/srv/multi30k",
    "PIPELINE_CONFIG": str(REPO / "configs" / "multi30k-de-en-opus-mt.yaml"),
    "TEACHER_DIR": "/srv/opus-mt-de-en",
}
VARIANTS = {  # each documented way to start the stack: its files and its variables
    "default": ([COMPOSE], {}),
    "gpu": ([COMPOSE, COMPOSE_GPU], {}),
    "multi30k-gpu": ([COMPOSE, COMPOSE_MULTI30K, COMPOSE_GPU], VARIABLES),
    "pretrained-gpu": ([COMPOSE, COMPOSE_MULTI30K, COMPOSE_PRETRAINED, COMPOSE_GPU], VARIABLES),
}


def interpolate(value: Any, env: dict[str, str]) -> Any:
    """The two forms of compose interpolation these files use: ${VAR:-default} and ${VAR:?message}."""
    if isinstance(value, dict):
        return {key: interpolate(item, env) for key, item in value.items()}
    if isinstance(value, list):
        return [interpolate(item, env) for item in value]
    if not isinstance(value, str):
        return value

    def substitute(match: re.Match[str]) -> str:
        name, op, arg = match.groups()
        if env.get(name):
            return env[name]
        if op == ":?":
            raise KeyError(f"{name}: {arg}")
        return arg or ""

    return re.sub(r"\$\{(\w+)(?:(:-|:\?)([^}]*))?\}", substitute, value)


def service(files: list[Path], name: str, env: dict[str, str] | None = None) -> dict[str, Any]:
    """One service as the last file that sets each key leaves it (compose merges deeper; the checks
    below read only keys that the overrides replace whole: command, image, environment entries)."""
    merged: dict[str, Any] = {"environment": {}}
    for path in files:
        override = dict(yaml.safe_load(path.read_text(encoding="utf-8"))["services"].get(name) or {})
        merged["environment"].update(override.pop("environment", {}))
        merged.update(override)
    return interpolate(merged, env or {})


def argv(svc: dict[str, Any]) -> list[str]:
    command = svc["command"]
    return shlex.split(command) if isinstance(command, str) else [str(word) for word in command]


def wdserve_parser():
    from wdserve.cli import build_parser

    return build_parser()


def container_path(path: str, svc: dict[str, Any]) -> Path:
    """A path inside the container as a path of this checkout: /app is the image's copy of the
    repository's configs, a bind mount is its source."""
    for volume in svc.get("volumes", []):
        if isinstance(volume, dict) and volume["target"] == path:
            return Path(volume["source"])
    return REPO / path


# ---------------------------------------------------------------- every variant's commands
@pytest.mark.parametrize("variant", VARIANTS)
def test_pipeline_and_server_of_every_variant_are_valid(variant: str) -> None:
    from wdserve.config import PipelineConfig
    from wdserve.server.settings import ServeSettings

    files, env = VARIANTS[variant]
    pipeline = service(files, "pipeline", env)
    words = argv(pipeline)
    args = wdserve_parser().parse_args(words)
    assert words[0] == "pipeline" and str(args.workdir).startswith("/runs/")
    config = PipelineConfig.load(container_path(str(args.config), pipeline))
    trained = {"teacher"} | {student.name for student in config.students}

    server = service(files, "server", env)
    environment = {key: str(value) for key, value in server["environment"].items()}
    assert environment["WDSERVE_WORKDIR"] == str(args.workdir), "the server serves what the pipeline wrote"
    fields = set(ServeSettings.model_fields)
    assert all(k.startswith("WDSERVE_") and k.removeprefix("WDSERVE_").lower() in fields for k in environment)
    settings = ServeSettings(**{k.removeprefix("WDSERVE_").lower(): v for k, v in environment.items()})
    assert settings.host == "0.0.0.0"
    assert {settings.default_model, *settings.compare_models} <= trained
    grace = re.fullmatch(r"(\d+)s", server["stop_grace_period"])
    assert grace and int(grace.group(1)) > settings.graceful_timeout_s  # in-flight requests finish first
    if COMPOSE_GPU in files:
        assert environment["WDSERVE_DEVICE"] == pipeline["environment"]["WDSERVE_DEVICE"] == "cuda"


def test_variables_a_variant_needs_are_errors_when_missing() -> None:
    for path, variable in ((COMPOSE_MULTI30K, "MULTI30K_DIR"), (COMPOSE_PRETRAINED, "TEACHER_DIR"),
                           (COMPOSE_PRETRAINED, "PIPELINE_CONFIG")):
        with pytest.raises(KeyError, match=variable):  # not an empty path, which would mount /
            service([COMPOSE, path], "pipeline", env={**VARIABLES, variable: ""})


def test_bench_and_its_workers_run_the_real_commands() -> None:
    bench = service([COMPOSE], "bench")
    args = wdserve_parser().parse_args(argv(bench))
    assert args.pytorch is False and args.url == "http://balancer:8000" and args.locust_workers == 0
    assert service([COMPOSE], "bench", env={"BENCH_WORKERS": "3"})["command"][-1] == "3"
    worker = service([COMPOSE], "bench-worker")
    script = worker["command"][0]
    assert f"--master-port {args.master_port}" in script and "--master-host bench" in script
    assert "loadtest/locustfile.py --worker" in script and worker["image"] == bench["image"]


def test_compose_config_accepts_every_variant(tmp_path: Path) -> None:
    """compose's own schema and merge, without an engine: the plugin (v2), else docker-compose v1 on a
    copy without the top-level `name:` it rejects."""
    if shutil.which("docker") and subprocess.run(["docker", "compose", "version"],
                                                 capture_output=True).returncode == 0:
        base, strip_name = ["docker", "compose"], False
    elif shutil.which("docker-compose"):
        base, strip_name = ["docker-compose"], True
    else:
        pytest.skip("neither `docker compose` nor `docker-compose` installed")
    main = COMPOSE
    if strip_name:
        main = tmp_path / "compose.yaml"
        main.write_text("".join(line for line in COMPOSE.read_text(encoding="utf-8").splitlines(True)
                                if not line.startswith("name:")), encoding="utf-8")
    for files, env in VARIANTS.values():
        paths = [main, *files[1:]]
        result = subprocess.run(
            [*base, "--project-directory", str(REPO), *[a for p in paths for a in ("-f", str(p))],
             "--profile", "bench", "config", "-q"],
            cwd=REPO, capture_output=True, text=True, env={**os.environ, **env}, timeout=120)
        assert result.returncode == 0, (files, result.stderr)


# ---------------------------------------------------------------- images
def dockerfile() -> str:
    return DOCKERFILE.read_text(encoding="utf-8")


def test_healthchecks_name_a_real_route_of_the_server() -> None:
    from wdserve.server.app import create_app
    from wdserve.server.settings import ServeSettings

    routes = {route.path for route in create_app(ServeSettings()).routes}
    image_check = json.loads(re.search(r"HEALTHCHECK .*\n\s+CMD (\[.*\])", dockerfile()).group(1))
    compose_check = service([COMPOSE], "server")["healthcheck"]["test"]
    assert compose_check == ["CMD", *image_check]
    assert image_check[-1] == "/ready" and "/ready" in routes
    assert f"COPY docker/healthcheck.py {image_check[1]}" in dockerfile()


def test_images_install_the_extras_the_readme_documents() -> None:
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    extras = project["optional-dependencies"]
    installs = re.findall(r'pip install (\S+)', dockerfile())
    assert installs.count(".") == 1, "the serving image installs the base only"
    assert not any(dep.startswith("torch") for dep in project["dependencies"]), "base install pulls torch"
    assert '".[loadtest]"' in installs and '".[$TRAIN_EXTRAS]"' in installs
    train_extras = re.search(r"ARG TRAIN_EXTRAS=(\S+)", dockerfile()).group(1)
    pretrained = yaml.safe_load(COMPOSE_PRETRAINED.read_text(encoding="utf-8"))["services"]["pipeline"]
    assert train_extras == "train" and pretrained["build"]["args"]["TRAIN_EXTRAS"] == "train,hf"
    assert any(dep.startswith("transformers") for dep in extras["hf"])
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    for extra in ("train", "loadtest"):
        assert extra in extras and f"`.[{extra}]`" in readme


def test_train_image_pins_the_torch_the_ci_uses() -> None:
    ci_pin = re.search(r"torch==[\d.]+", (REPO / ".ci" / "run").read_text(encoding="utf-8")).group(0)
    assert re.search(rf'pip install --index-url "\$TORCH_INDEX_URL" {re.escape(ci_pin)}\n', dockerfile())
    # the serving image comes before any stage with torch: the classic builder builds every stage
    # above the target
    assert dockerfile().index("AS serve\n") < dockerfile().index("torch==")


def test_gpu_serving_image_finds_cublas_and_cudnn_for_its_python() -> None:
    python = re.search(r"ARG PYTHON_IMAGE=python:(\d+\.\d+)\.\d+-slim", dockerfile()).group(1)
    library_path = re.search(r"LD_LIBRARY_PATH=(\S+)", dockerfile()).group(1).split(":")
    for library in ("cublas", "cudnn"):
        assert f"/opt/venv/lib/python{python}/site-packages/nvidia/{library}/lib" in library_path
    gpu_libs = yaml.safe_load(COMPOSE_GPU.read_text())["services"]["server"]["build"]["args"]["GPU_LIBS"]
    assert "nvidia-cublas-cu12" in gpu_libs and "nvidia-cudnn-cu12" in gpu_libs
