"""What can be checked of the Docker setup without a Docker engine.

compose files parse and agree with each other (volumes, ports, health checks, start order);
every service command is a real ``wdserve`` invocation, parsed here by the same argparse parser
the container runs; health checks name routes the server app really has; the Dockerfile installs
the pyproject extras the README documents, runs the server as a non-root user and copies no data
or models; .dockerignore keeps run directories, data and checkpoints out of the build context.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "docker" / "Dockerfile"
COMPOSE = REPO / "compose.yaml"
COMPOSE_GPU = REPO / "compose.gpu.yaml"
COMPOSE_MULTI30K = REPO / "docker" / "compose.multi30k.yaml"
NGINX_CONF = REPO / "docker" / "nginx.conf"
WDSERVE_SERVICES = ("pipeline", "server", "bench")  # services whose image has ENTRYPOINT ["wdserve"]
MULTI30K_ENV = {
    "WDSERVE_CONFIG": "configs/multi30k-de-en.yaml",
    "WDSERVE_RUN": "m30k",
    "MULTI30K_DIR": "/srv/multi30k",
}
# (compose files, variables) of each documented way to start the stack
VARIANTS = pytest.mark.parametrize(
    "files, env",
    [
        ((COMPOSE,), {}),
        ((COMPOSE, COMPOSE_GPU), {}),
        ((COMPOSE, COMPOSE_MULTI30K, COMPOSE_GPU), MULTI30K_ENV),
    ],
    ids=["default", "gpu", "multi30k-gpu"],
)


# ---------------------------------------------------------------- helpers
def interpolate(value: Any, env: dict[str, str]) -> Any:
    """Compose's variable interpolation (${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?error}, $$)."""
    if isinstance(value, dict):
        return {key: interpolate(item, env) for key, item in value.items()}
    if isinstance(value, list):
        return [interpolate(item, env) for item in value]
    if not isinstance(value, str):
        return value

    def substitute(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name, op, arg = match.group("name"), match.group("op"), match.group("arg") or ""
        current = env.get(name)
        if op in (":-", "-"):
            return current if current or (op == "-" and current is not None) else arg
        if op in (":?", "?"):
            if not current:
                raise KeyError(f"{name}: {arg}")
            return current
        return current or ""

    pattern = r"\$\$|\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}"
    return re.sub(pattern, substitute, value)


def merge(base: Any, override: Any, key: str = "") -> Any:
    """Compose's merge of an override file: mappings merge, volumes merge by mount target, ports and
    expose add up, other sequences (`command`, health check `test`, ...) are replaced."""
    if isinstance(base, dict) and isinstance(override, dict):
        merged = dict(base)
        for name, value in override.items():
            merged[name] = merge(base[name], value, name) if name in base else value
        return merged
    if key == "volumes" and isinstance(base, list):
        volumes = base + override
        mounts = volume_mounts({"volumes": volumes})
        return list({mount["target"]: volume for volume, mount in zip(volumes, mounts, strict=True)}.values())
    if key in ("ports", "expose") and isinstance(base, list):
        return base + override
    return override


def load_compose(*files: Path, env: dict[str, str] | None = None) -> dict[str, Any]:
    config: dict[str, Any] = {}
    for path in files:
        config = merge(config, yaml.safe_load(path.read_text(encoding="utf-8")))
    return interpolate(config, env or {})


def dockerfile_stages(path: Path = DOCKERFILE) -> dict[str, list[tuple[str, str]]]:
    """Stage name -> [(INSTRUCTION, arguments)], continuation lines joined, comments dropped."""
    stages: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] | None = None
    logical = ""
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        logical += " " + line[:-1] if line.endswith("\\") else " " + line
        if line.endswith("\\"):
            continue
        instruction, _, args = logical.strip().partition(" ")
        logical = ""
        instruction = instruction.upper()
        if instruction == "FROM":
            words = args.split()
            name = words[2] if len(words) >= 3 and words[1].upper() == "AS" else f"stage{len(stages)}"
            current = stages.setdefault(name, [])
        if current is not None:
            current.append((instruction, args.strip()))
    return stages


def build_arg_defaults() -> dict[str, str]:
    """Default values of the Dockerfile's ARGs (those before the first FROM belong to no stage)."""
    defaults: dict[str, str] = {}
    for line in DOCKERFILE.read_text(encoding="utf-8").splitlines():
        match = re.match(r"ARG\s+(\w+)=(\S+)", line.strip())
        if match:
            defaults.setdefault(match.group(1), match.group(2))
    return defaults


def stage_chain(stages: dict[str, list[tuple[str, str]]], target: str) -> list[str]:
    """The stage and the stages it is built FROM, nearest first."""
    chain = [target]
    while True:
        base = stages[chain[-1]][0][1].split()[0]
        if base not in stages:
            return chain
        chain.append(base)


def effective(stages: dict[str, list[tuple[str, str]]], target: str, instruction: str) -> list[str]:
    """Arguments of `instruction` that apply to `target`, inherited from parent stages first."""
    found: list[str] = []
    for stage in reversed(stage_chain(stages, target)):
        found += [args for name, args in stages[stage] if name == instruction]
    return found


def build_runs(stages: dict[str, list[tuple[str, str]]], target: str) -> list[str]:
    """Every RUN whose result reaches `target`: its FROM chain and the stages it COPY --from's."""
    runs: list[str] = []
    for stage in reversed(stage_chain(stages, target)):
        for name, args in stages[stage]:
            if name == "COPY" and args.startswith("--from="):
                runs += build_runs(stages, args.split()[0].removeprefix("--from="))
            elif name == "RUN":
                runs.append(args)
    return runs


def dockerignore_excludes(relative: str) -> bool:
    """Whether .dockerignore keeps `relative` (a POSIX path) out of the build context.

    Docker's rules: a path is excluded when it or a parent directory matches a pattern;
    `*` stays within one path component, `**` spans any number; the last matching line wins
    and a leading `!` re-includes.
    """
    rules = []
    for line in (REPO / ".dockerignore").read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = line.lstrip("!").strip("/")
        regex = ""
        i = 0
        while i < len(pattern):
            if pattern.startswith("**/", i):
                regex, i = regex + "(?:.*/)?", i + 3
            elif pattern.startswith("**", i):
                regex, i = regex + ".*", i + 2
            elif pattern[i] == "*":
                regex, i = regex + "[^/]*", i + 1
            elif pattern[i] == "?":
                regex, i = regex + "[^/]", i + 1
            else:
                regex, i = regex + re.escape(pattern[i]), i + 1
        rules.append((re.compile(regex + r"\Z"), negate))
    parts = relative.split("/")
    candidates = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    excluded = False
    for rule, negate in rules:
        if any(rule.match(candidate) for candidate in candidates):
            excluded = not negate
    return excluded


def wdserve_parser():
    from wdserve.cli import build_parser

    return build_parser()


def service_argv(service: dict[str, Any]) -> list[str]:
    command = service["command"]
    return shlex.split(command) if isinstance(command, str) else [str(word) for word in command]


def env_of(service: dict[str, Any]) -> dict[str, str]:
    environment = service.get("environment", {})
    if isinstance(environment, list):
        environment = dict(item.split("=", 1) for item in environment)
    return {key: str(value) for key, value in environment.items()}


def volume_mounts(service: dict[str, Any]) -> list[dict[str, Any]]:
    """Short and long volume syntax as {source, target, read_only}."""
    mounts = []
    for volume in service.get("volumes", []):
        if isinstance(volume, str):
            source, target, *mode = volume.split(":")
            mounts.append({"source": source, "target": target, "read_only": mode == ["ro"]})
        else:
            mounts.append({**volume, "read_only": bool(volume.get("read_only"))})
    return mounts


def mount_covers(service: dict[str, Any], path: str) -> dict[str, Any] | None:
    """The mount `path` lies in, if any."""
    for mount in volume_mounts(service):
        if path == mount["target"] or path.startswith(mount["target"].rstrip("/") + "/"):
            return mount
    return None


def writable_mount_covers(service: dict[str, Any], path: str) -> bool:
    mount = mount_covers(service, path)
    return mount is not None and not mount["read_only"]


def option(argv: list[str], flag: str) -> str:
    return argv[argv.index(flag) + 1]


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return load_compose(COMPOSE)


@pytest.fixture(scope="module")
def stages() -> dict[str, list[tuple[str, str]]]:
    return dockerfile_stages()


# ---------------------------------------------------------------- compose: structure and start order
def test_compose_files_parse(compose: dict[str, Any]) -> None:
    assert {"pipeline", "server", "balancer", "bench"} <= set(compose["services"])
    for path in (COMPOSE_GPU, COMPOSE_MULTI30K):
        assert isinstance(yaml.safe_load(path.read_text(encoding="utf-8"))["services"], dict)


def test_server_starts_after_pipeline_and_balancer_after_healthy_server(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert services["server"]["depends_on"]["pipeline"]["condition"] == "service_completed_successfully"
    assert services["balancer"]["depends_on"]["server"]["condition"] == "service_healthy"
    assert services["bench"]["depends_on"]["server"]["condition"] == "service_healthy"
    assert services["pipeline"].get("restart", "no") == "no"  # one-shot


def test_bench_only_in_bench_profile(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert services["bench"]["profiles"] == ["bench"]
    assert [name for name, service in services.items() if service.get("profiles")] == ["bench"]


def test_service_images_are_dockerfile_targets(compose: dict[str, Any], stages: dict[str, Any]) -> None:
    for name in WDSERVE_SERVICES:
        build = compose["services"][name]["build"]
        assert (REPO / build["context"] / build["dockerfile"]).resolve() == DOCKERFILE
        assert build["target"] in stages, f"{name}: target {build['target']} not in the Dockerfile"
        assert effective(stages, build["target"], "ENTRYPOINT") == ['["wdserve"]'], name


def test_compose_config_with_docker_cli() -> None:
    """`docker compose config` validates against compose's own schema; it needs no engine."""
    if shutil.which("docker") is None:
        pytest.skip("docker CLI not installed")
    if subprocess.run(["docker", "compose", "version"], capture_output=True).returncode != 0:
        pytest.skip("docker compose plugin not installed")
    for files in ([COMPOSE], [COMPOSE, COMPOSE_GPU], [COMPOSE, COMPOSE_MULTI30K, COMPOSE_GPU]):
        args = [arg for path in files for arg in ("-f", str(path))]
        result = subprocess.run(
            ["docker", "compose", *args, "--profile", "bench", "config", "-q"],
            cwd=REPO, capture_output=True, text=True, env={**os.environ, **MULTI30K_ENV},
        )
        assert result.returncode == 0, result.stderr


# ---------------------------------------------------------------- commands are real CLI invocations
@VARIANTS
def test_commands_parse_with_wdserve_cli(files: tuple[Path, ...], env: dict[str, str]) -> None:
    config = load_compose(*files, env=env)
    parser = wdserve_parser()
    for name in WDSERVE_SERVICES:
        argv = service_argv(config["services"][name])
        args = parser.parse_args(argv)  # argparse exits (SystemExit) on an unknown flag
        assert args.command == argv[0]


@pytest.mark.parametrize("target", ["serve", "train", "loadtest"])
def test_image_default_commands_parse(stages: dict[str, Any], target: str) -> None:
    """`docker run wdserve-<target>` with no arguments runs the image's CMD through ENTRYPOINT wdserve."""
    assert effective(stages, target, "ENTRYPOINT") == ['["wdserve"]']
    argv = json.loads(effective(stages, target, "CMD")[-1])
    args = wdserve_parser().parse_args(argv)
    assert args.command == {"serve": "serve", "train": "pipeline", "loadtest": "bench"}[target]


# distributions each image leaves out (pyproject extras it does not install), as import names
NOT_INSTALLED = {
    "serve": ["torch", "sacrebleu", "tqdm", "locust", "matplotlib"],
    "loadtest": ["torch", "tqdm"],
}


@pytest.mark.parametrize("service, target, module", [("server", "serve", "wdserve.server.app"),
                                                      ("bench", "loadtest", "wdserve.loadtest.bench")])
def test_commands_run_without_the_extras_the_image_lacks(
    compose: dict[str, Any], service: str, target: str, module: str
) -> None:
    """`wdserve` builds its parser from every subcommand module, so none may import PyTorch at top level,
    or the torch-free serving and load-test images could not even parse `wdserve serve`."""
    assert compose["services"][service]["build"]["target"] == target
    argv = service_argv(compose["services"][service])
    script = (
        "import sys\n"
        f"for name in {NOT_INSTALLED[target]!r}: sys.modules[name] = None  # import raises ImportError\n"
        "from wdserve.cli import build_parser\n"
        f"args = build_parser().parse_args({argv!r})\n"
        f"import {module}\n"
        "print(args.command)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split()[-1] == argv[0]


@pytest.mark.parametrize(
    "files, env, run",
    [((COMPOSE,), {}, "/runs/tiny"), ((COMPOSE, COMPOSE_MULTI30K), MULTI30K_ENV, "/runs/m30k")],
    ids=["tiny", "multi30k"],
)
def test_pipeline_server_and_bench_share_one_run_directory(
    files: tuple[Path, ...], env: dict[str, str], run: str
) -> None:
    services = load_compose(*files, env=env)["services"]
    pipeline, server, bench = (service_argv(services[name]) for name in ("pipeline", "server", "bench"))

    config = pipeline[1]
    assert (REPO / config).is_file(), f"pipeline config {config} is not in the repository"
    assert config == env.get("WDSERVE_CONFIG", "configs/tiny.yaml")
    assert option(pipeline, "--workdir") == run
    assert env_of(services["server"])["WDSERVE_WORKDIR"] == run
    assert option(bench, "--workdir") == run

    # the same named volume holds the run: written by the pipeline, read-only for the server
    pipeline_mount = mount_covers(services["pipeline"], run)
    server_mount = mount_covers(services["server"], run)
    assert pipeline_mount and server_mount and pipeline_mount["source"] == server_mount["source"]
    assert writable_mount_covers(services["pipeline"], run)
    assert server_mount["read_only"], "servers only read the run directory"
    assert writable_mount_covers(services["bench"], option(bench, "--out"))
    assert mount_covers(services["bench"], run)["source"] == pipeline_mount["source"]


def test_bench_runs_without_pytorch_on_the_pipeline_test_set(compose: dict[str, Any]) -> None:
    """The loadtest image installs .[loadtest] only, so the bench must not ask for the PyTorch baseline."""
    bench = compose["services"]["bench"]
    args = wdserve_parser().parse_args(service_argv(bench))
    assert args.pytorch is False
    assert args.url.startswith("http://balancer:")
    # plain `locust -f loadtest/locustfile.py` in the same container reads the pipeline's test set
    assert env_of(bench)["LOCUST_SENTENCES"] == f"{args.workdir}/data/test.src"


def test_multi30k_data_is_mounted_read_only_where_the_pipeline_looks() -> None:
    pipeline = load_compose(COMPOSE, COMPOSE_MULTI30K, env=MULTI30K_ENV)["services"]["pipeline"]
    data_dir = env_of(pipeline)["WDSERVE_DATA_DIR"]
    mount = mount_covers(pipeline, data_dir)
    assert mount is not None and mount["read_only"] and mount["source"] == MULTI30K_ENV["MULTI30K_DIR"]
    with pytest.raises(KeyError, match="MULTI30K_DIR"):  # forgetting the variable is an error, not /
        load_compose(COMPOSE, COMPOSE_MULTI30K, env={})


def test_named_volumes_are_declared(compose: dict[str, Any]) -> None:
    declared = set(compose.get("volumes", {}))
    for name, service in compose["services"].items():
        for mount in volume_mounts(service):
            source = str(mount["source"])
            if not source.startswith((".", "/", "~")):
                assert source in declared, f"{name} mounts undeclared volume {source}"
            else:
                assert (REPO / source).exists(), f"{name} bind-mounts missing {source}"


def test_bench_targets_the_balancer_port(compose: dict[str, Any]) -> None:
    services = compose["services"]
    url = option(service_argv(services["bench"]), "--url")
    match = re.fullmatch(r"http://([\w-]+):(\d+)", url)
    assert match, url
    host, port = match.group(1), match.group(2)
    assert host in services
    published = [str(p).split(":")[-1] for p in services[host].get("ports", [])] + [
        str(p) for p in services[host].get("expose", [])
    ]
    assert port in published, f"{host} does not listen on {port}"


def test_locustfile_loads_in_locust() -> None:
    """The loadtest image also carries `locust -f loadtest/locustfile.py`; locust must accept the file."""
    locust = shutil.which("locust")
    if locust is None:
        pytest.skip("locust not installed")
    result = subprocess.run(
        [locust, "-f", "loadtest/locustfile.py", "--help"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "--headless" in result.stdout


# ---------------------------------------------------------------- ports, balancer, settings
def test_server_publishes_no_host_port_and_balancer_publishes_8000(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert "ports" not in services["server"], "a fixed host port breaks --scale server=N"
    assert services["balancer"]["ports"] == ["8000:8000"]
    custom = load_compose(COMPOSE, env={"WDSERVE_PUBLISH_PORT": "9000"})
    assert custom["services"]["balancer"]["ports"] == ["9000:8000"]


def test_nginx_resolves_server_replicas_through_docker_dns(compose: dict[str, Any]) -> None:
    conf = NGINX_CONF.read_text(encoding="utf-8")
    assert re.search(r"^\s*resolver\s+127\.0\.0\.11\s+valid=\d+s", conf, re.M)
    listen = re.search(r"^\s*listen\s+(\d+);", conf, re.M).group(1)
    balancer_port = compose["services"]["balancer"]["ports"][0].split(":")[-1]
    assert listen == balancer_port
    # proxy_pass through a variable: re-resolved per request, so new replicas are picked up
    variable = re.search(r"proxy_pass\s+\$(\w+);", conf)
    assert variable, "proxy_pass must use a variable, or nginx resolves `server` only once at start-up"
    upstream = re.search(rf"set\s+\${variable.group(1)}\s+http://([\w-]+):(\d+);", conf)
    assert upstream and upstream.group(1) == "server"
    server = compose["services"]["server"]
    assert upstream.group(2) == env_of(server)["WDSERVE_PORT"] == str(server["expose"][0])
    mount = volume_mounts(compose["services"]["balancer"])[0]
    assert (REPO / mount["source"]).resolve() == NGINX_CONF and mount["read_only"]


def test_server_image_exposes_the_served_port(compose: dict[str, Any], stages: dict[str, Any]) -> None:
    port = env_of(compose["services"]["server"])["WDSERVE_PORT"]
    assert effective(stages, "serve", "EXPOSE") == [port]
    env_lines = " ".join(effective(stages, "serve", "ENV"))
    assert f"WDSERVE_PORT={port}" in env_lines and "WDSERVE_HOST=0.0.0.0" in env_lines


@VARIANTS
def test_server_environment_is_valid_serve_settings(files: tuple[Path, ...], env: dict[str, str]) -> None:
    from wdserve.server.settings import ServeSettings

    services = load_compose(*files, env=env)["services"]
    server = services["server"]
    environment = env_of(server)
    fields = set(ServeSettings.model_fields)
    for key in environment:
        assert key.startswith("WDSERVE_") and key.removeprefix("WDSERVE_").lower() in fields, key
    settings = ServeSettings(**{
        key.removeprefix("WDSERVE_").lower(): value for key, value in environment.items()
    })
    assert settings.host == "0.0.0.0"
    assert settings.port == 8000
    # the default and compared models are models the pipeline config in the same run trains
    config_path = REPO / service_argv(services["pipeline"])[1]
    pipeline_config = yaml.safe_load(config_path.read_text(encoding="utf-8"))
    trained = {"teacher"} | {student["name"] for student in pipeline_config.get("students", [])}
    assert {settings.default_model, *settings.compare_models} <= trained
    # compose waits for in-flight requests before it kills a replica
    grace = re.fullmatch(r"(\d+)s", server["stop_grace_period"])
    assert grace and int(grace.group(1)) > settings.graceful_timeout_s


# ---------------------------------------------------------------- health checks point at real routes
def server_routes() -> set[str]:
    from wdserve.server.app import create_app
    from wdserve.server.settings import ServeSettings

    app = create_app(ServeSettings())
    return {route.path for route in app.routes}


def healthcheck_paths(compose: dict[str, Any], stages: dict[str, Any]) -> list[str]:
    image_check = effective(stages, "serve", "HEALTHCHECK")
    assert len(image_check) == 1, "the serving image needs exactly one HEALTHCHECK"
    image_cmd = json.loads(image_check[0].split(" CMD ", 1)[1])
    compose_cmd = compose["services"]["server"]["healthcheck"]["test"]
    assert compose_cmd[0] == "CMD" and compose_cmd[1:] == image_cmd
    return [image_cmd[-1]]


def test_healthcheck_runs_the_shipped_script(compose: dict[str, Any], stages: dict[str, Any]) -> None:
    healthcheck_paths(compose, stages)
    script = compose["services"]["server"]["healthcheck"]["test"][2]
    copies = [args.split() for args in effective(stages, "serve", "COPY")]
    assert ["docker/healthcheck.py", script] in copies


def test_healthchecks_point_at_real_routes(compose: dict[str, Any], stages: dict[str, Any]) -> None:
    routes = server_routes()
    for path in healthcheck_paths(compose, stages):
        assert path == "/ready" and path in routes, f"health check {path} is not a route of the app"
    assert {"/ready", "/health"} <= routes, "Kubernetes probes (README) map to /ready and /health"


# ---------------------------------------------------------------- GPU override
def test_gpu_override_reserves_nvidia_device_for_pipeline_and_server(stages: dict[str, Any]) -> None:
    services = load_compose(COMPOSE, COMPOSE_GPU)["services"]
    for name in ("pipeline", "server"):
        devices = services[name]["deploy"]["resources"]["reservations"]["devices"]
        assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}], name
        assert env_of(services[name])["WDSERVE_DEVICE"] == "cuda"
    assert option(service_argv(services["pipeline"]), "--device") == "cuda"
    # the override adds to the base services without losing their build, volumes or health check
    assert services["server"]["build"]["target"] == "serve"
    assert services["server"]["healthcheck"] and services["server"]["volumes"]
    assert "nvidia-cudnn-cu12" in services["server"]["build"]["args"]["GPU_LIBS"]
    # ... which the serving image puts on the loader path of its own Python version
    python = re.match(r"python:(\d+\.\d+)", build_arg_defaults()["PYTHON_IMAGE"]).group(1)
    library_path = re.search(r"LD_LIBRARY_PATH=(\S+)", " ".join(effective(stages, "serve", "ENV"))).group(1)
    for library in ("cublas", "cudnn"):
        assert f"/opt/venv/lib/python{python}/site-packages/nvidia/{library}/lib" in library_path.split(":")
    assert "deploy" not in load_compose(COMPOSE)["services"]["server"]


# ---------------------------------------------------------------- Dockerfile lint
def test_images_are_multi_stage_with_pinned_bases(stages: dict[str, Any]) -> None:
    assert {"serve", "train", "loadtest"} <= set(stages)
    defaults = build_arg_defaults()
    for name, instructions in stages.items():
        base = instructions[0][1].split()[0]
        if base in stages:
            continue
        base = re.sub(r"\$\{(\w+)\}", lambda m: defaults[m.group(1)], base)
        image, _, tag = base.partition(":")
        assert re.match(r"\d+\.\d+\.\d+", tag), f"stage {name}: base {base} is not pinned to a version"
    # runtime images copy a built environment out of a build stage
    for target in ("serve", "train", "loadtest"):
        copies = [args for args in effective(stages, target, "COPY") if args.startswith("--from=")]
        assert copies, f"{target} copies nothing from a build stage"
    assert re.match(r"python:3\.11\.\d+-slim", defaults["PYTHON_IMAGE"])
    compose = load_compose(COMPOSE)
    assert re.fullmatch(r"nginx:\d+\.\d+\.\d+-alpine", compose["services"]["balancer"]["image"])


@pytest.mark.parametrize("target", ["serve", "train", "loadtest"])
def test_images_run_as_non_root(stages: dict[str, Any], target: str) -> None:
    users = effective(stages, target, "USER")
    assert users and users[-1] not in ("root", "0", "0:0"), f"{target} runs as root"


def test_all_images_share_the_uid_that_owns_runs(stages: dict[str, Any]) -> None:
    runtime_run = " ".join(effective(stages, "runtime", "RUN"))
    assert "--uid 10001" in runtime_run and "chown wdserve:wdserve /runs" in runtime_run
    for target in ("serve", "train", "loadtest"):
        assert "runtime" in stage_chain(stages, target)
        assert effective(stages, target, "USER")[-1] == "wdserve"


def test_server_image_has_healthcheck_and_model_volume(stages: dict[str, Any]) -> None:
    assert len(effective(stages, "serve", "HEALTHCHECK")) == 1
    assert '["/runs"]' in effective(stages, "serve", "VOLUME")
    env_lines = " ".join(effective(stages, "serve", "ENV"))
    assert "WDSERVE_WORKDIR=/runs/" in env_lines


def pip_install_targets(stages: dict[str, Any], target: str) -> list[str]:
    """The local-project arguments of every `pip install` on the way to `target` (".", ".[train]")."""
    found = []
    for run in build_runs(stages, target):
        for command in run.split("&&"):
            words = shlex.split(command)
            if words[:2] == ["pip", "install"]:
                found += [word for word in words[2:] if word == "." or word.startswith(".[")]
    return found


def test_install_steps_use_pyproject_extras(stages: dict[str, Any]) -> None:
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    extras = pyproject["optional-dependencies"]
    assert pip_install_targets(stages, "serve") == ["."], "the serving image installs the base only"
    assert not any(dep.startswith("torch") for dep in pyproject["dependencies"]), "base install pulls torch"
    assert pip_install_targets(stages, "train") == [".[train]"]
    assert pip_install_targets(stages, "loadtest") == [".[loadtest]"]
    for target in ("train", "loadtest"):
        for spec in pip_install_targets(stages, target):
            assert spec[2:-1] in extras, f"{target}: extra {spec} not in pyproject"


def test_train_image_pins_the_torch_the_ci_uses(stages: dict[str, Any]) -> None:
    ci_pin = re.search(r"torch==[\d.]+", (REPO / ".ci" / "run").read_text(encoding="utf-8")).group(0)
    runs = " ".join(build_runs(stages, "train"))
    assert ci_pin in runs and '--index-url "$TORCH_INDEX_URL"' in runs
    assert build_arg_defaults()["TORCH_INDEX_URL"] == "https://pypi.org/simple"  # CUDA wheels by default
    assert "torch" not in " ".join(build_runs(stages, "serve"))


def test_readme_documents_the_installed_extras(stages: dict[str, Any]) -> None:
    readme = REPO / "README.md"
    if not readme.is_file():
        pytest.skip("README.md not written yet")
    text = readme.read_text(encoding="utf-8")
    for target in ("train", "loadtest"):
        for spec in pip_install_targets(stages, target):
            assert spec in text, f"README does not document `pip install {spec}` used by the {target} image"
    assert "compose.gpu.yaml" in text and "--profile bench" in text


def test_copies_bring_code_only(stages: dict[str, Any]) -> None:
    forbidden = re.compile(r"(^|/)(runs|data)(/|$)|\.pt$|\.bin$|\.model$|^\.$|checkpoint")
    for stage, instructions in stages.items():
        for instruction, args in instructions:
            if instruction not in ("COPY", "ADD"):
                continue
            assert instruction == "COPY", f"{stage}: use COPY, not ADD"
            words = [word for word in args.split() if not word.startswith("--")]
            if args.startswith("--from="):
                continue
            for source in words[:-1]:
                assert not forbidden.search(source.rstrip("/")), f"{stage} copies {source}"
                assert (REPO / source).exists(), f"{stage} copies {source}, which is not in the repository"
                assert not dockerignore_excludes(source.rstrip("/")), f"{stage}: {source} is in .dockerignore"


# ---------------------------------------------------------------- .dockerignore
@pytest.mark.parametrize(
    "path",
    [
        ".git/HEAD",
        "runs/tiny/report.json",
        "runs/tiny/export/teacher-int8/model.bin",
        "data/multi30k/train.de.gz",
        "configs/runs/x.yaml",
        "teacher.pt",
        "models/teacher/checkpoint_best.pt",
        "somewhere/export/student-float32/config.json",
        "somewhere/vocab/spm.model",
        "wdserve/__pycache__/cli.cpython-311.pyc",
    ],
)
def test_dockerignore_excludes_runs_data_and_models(path: str) -> None:
    assert dockerignore_excludes(path)


@pytest.mark.parametrize(
    "path",
    ["pyproject.toml", "README.md", "wdserve/cli.py", "distill/data.py", "export/convert.py",
     "server/settings.py", "loadtest/locustfile.py", "configs/tiny.yaml", "docker/healthcheck.py"],
)
def test_dockerignore_keeps_code(path: str) -> None:
    assert not dockerignore_excludes(path)
