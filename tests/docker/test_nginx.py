"""docker/nginx.conf: the balancer's client limits are the server's defaults, and nginx accepts the file.

A client should meet the same deadlines and limits through the balancer as against a replica
directly, so each nginx limit is read from the file and compared with its ServeSettings default.
``nginx -t`` runs when an nginx binary is installed and is skipped otherwise.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from wdserve.server.service import max_body_bytes
from wdserve.server.settings import ServeSettings

REPO = Path(__file__).resolve().parents[2]
NGINX_CONF = REPO / "docker" / "nginx.conf"


def directive(name: str) -> list[str]:
    """The arguments of the one ``name ...;`` line in the file."""
    found = re.findall(rf"^\s*{name}\s+([^;]+);", NGINX_CONF.read_text(encoding="utf-8"), re.M)
    assert len(found) == 1, f"expected one `{name}` in {NGINX_CONF}, found {found}"
    return found[0].split()


def seconds(value: str) -> float:
    match = re.fullmatch(r"(\d+)(s|m)?", value)
    assert match, value
    return int(match.group(1)) * (60 if match.group(2) == "m" else 1)


def size(value: str) -> int:
    match = re.fullmatch(r"(\d+)([km]?)", value.lower())
    assert match, value
    return int(match.group(1)) * {"": 1, "k": 1024, "m": 1024 * 1024}[match.group(2)]


def test_client_limits_match_the_server_defaults() -> None:
    settings = ServeSettings()
    assert seconds(directive("client_header_timeout")[0]) == settings.header_timeout_s
    assert seconds(directive("client_body_timeout")[0]) == settings.body_timeout_s
    assert seconds(directive("keepalive_timeout")[0]) == settings.keep_alive_timeout_s
    buffers, buffer_size = directive("large_client_header_buffers")
    assert int(buffers) * size(buffer_size) == settings.max_header_bytes
    assert size(directive("client_max_body_size")[0]) == max_body_bytes(settings)
    zone, limit = directive("limit_conn")
    assert int(limit) == settings.limit_concurrency and directive("limit_conn_status") == ["503"]
    assert directive("limit_conn_zone")[1] == f"zone={zone}:1m"
    # a proxied request holds a client and a replica connection; one worker can hold them all
    assert int(directive("worker_connections")[0]) >= 2 * settings.limit_concurrency
    assert int(directive("worker_rlimit_nofile")[0]) >= int(directive("worker_connections")[0])
    # the replica's 504 reaches the client before nginx gives up on the replica
    assert seconds(directive("proxy_read_timeout")[0]) > settings.request_timeout_s
    # slow bodies wait at the balancer; a client that leaves closes its replica connection
    assert directive("proxy_request_buffering") == ["on"]
    assert directive("proxy_ignore_client_abort") == ["off"]


def test_compose_mounts_the_file_as_nginx_whole_configuration() -> None:
    compose = yaml.safe_load((REPO / "compose.yaml").read_text(encoding="utf-8"))
    volumes = compose["services"]["balancer"]["volumes"]
    assert "./docker/nginx.conf:/etc/nginx/nginx.conf:ro" in volumes


@pytest.mark.skipif(shutil.which("nginx") is None, reason="no nginx binary")
def test_nginx_accepts_the_configuration(tmp_path: Path) -> None:
    # the image's user and log paths do not exist here; everything else is checked as written
    text = NGINX_CONF.read_text(encoding="utf-8").replace("/var/log/nginx/", f"{tmp_path}/")
    text = re.sub(r"^user\s+\S+;", "", text, flags=re.M)
    conf = tmp_path / "nginx.conf"
    conf.write_text(text, encoding="utf-8")
    command = ["nginx", "-t", "-c", str(conf), "-p", str(tmp_path), "-g", f"pid {tmp_path}/pid;"]
    checked = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert checked.returncode == 0, checked.stderr
