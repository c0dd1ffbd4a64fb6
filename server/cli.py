"""``wdserve serve``: load models, then run uvicorn with graceful shutdown.

Every setting of :class:`server.settings.ServeSettings` is a flag (``--max-batch-size``)
and an environment variable (``WDSERVE_MAX_BATCH_SIZE``); a flag wins. Nothing heavy is
imported at module level so ``wdserve --help`` stays fast.
"""

from __future__ import annotations

import argparse
import logging
from typing import TYPE_CHECKING

from wdserve.errors import ConfigError

if TYPE_CHECKING:
    from wdserve.server.settings import ServeSettings

log = logging.getLogger("wdserve.serve")

# flags that take a different shape from their setting
_SPECIAL = {"models", "api_keys", "compare_models", "cascades"}
# descriptors besides connections: listening socket, model files, logs, thread pool, Python itself
FD_RESERVE = 256


def configure_serve(parser: argparse.ArgumentParser) -> None:
    from wdserve.server.settings import ServeSettings

    parser.add_argument("--model", dest="models", action="append", metavar="NAME=PATH",
                        help="serve a CTranslate2 directory under NAME (repeatable; env WDSERVE_MODELS)")
    parser.add_argument("--api-key", dest="api_keys", action="append", metavar="KEY",
                        help="accept this API key; repeatable (env WDSERVE_API_KEYS, comma-separated)")
    parser.add_argument("--cascade", dest="cascades", action="append", metavar="NAME=STUDENT,TEACHER",
                        help="serve a cascade under NAME: the student translates, the teacher re-translates "
                             "its unsure sentences (repeatable; env WDSERVE_CASCADES, ';'-separated)")
    parser.add_argument("--compare-models", nargs=2, metavar=("A", "B"),
                        help="models /translate/compare uses by default (env WDSERVE_COMPARE_MODELS)")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"],
                        help="uvicorn log level")
    for name, field in ServeSettings.model_fields.items():
        if name in _SPECIAL:
            continue
        default = field.get_default(call_default_factory=True)
        parser.add_argument(
            f"--{name.replace('_', '-')}", dest=name, default=argparse.SUPPRESS,
            type=_flag_type(default), metavar=name.upper(),
            help=f"{field.description} (env WDSERVE_{name.upper()}, default {default})")


def _flag_type(default: object) -> type:
    if isinstance(default, bool):
        raise TypeError("boolean settings need an explicit flag")  # none today
    return type(default) if isinstance(default, (int, float)) else str


def settings_from_args(args: argparse.Namespace) -> ServeSettings:
    """Flags given on the command line override the environment; the rest comes from WDSERVE_* or defaults."""
    from wdserve.server.settings import ServeSettings, parse_cascade_specs, parse_model_specs

    overrides = {name: getattr(args, name) for name in ServeSettings.model_fields if getattr(args, name, None)
                 is not None}
    if "models" in overrides:
        overrides["models"] = parse_model_specs(overrides["models"])
    if "cascades" in overrides:
        overrides["cascades"] = parse_cascade_specs(overrides["cascades"])
    return ServeSettings(**overrides)


def ensure_file_descriptors(connections: int) -> int:
    """Raises this process's soft open-file limit so ``connections`` fit (up to the hard limit); returns it.

    Many systems start processes with a soft limit of 1024, well under the default
    ``limit_concurrency``; past it, accept() fails and asyncio stops accepting for a second.
    """
    try:
        import resource
    except ImportError:  # Windows: no such limit to raise
        return connections + FD_RESERVE
    needed = connections + FD_RESERVE
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= needed:
        return needed if soft == resource.RLIM_INFINITY else soft
    raised = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
    resource.setrlimit(resource.RLIMIT_NOFILE, (raised, hard))
    if raised < needed:
        log.warning("open-file limit %d (hard) is below limit_concurrency %d + %d; lower --limit-concurrency "
                    "or raise the limit (ulimit -n)", hard, connections, FD_RESERVE)
    return raised


def run_serve(args: argparse.Namespace) -> None:
    import uvicorn
    from pydantic import ValidationError

    from wdserve.server.app import check_serving_plan, create_app, load_registry
    from wdserve.server.protocol import guarded_protocol

    try:
        settings = settings_from_args(args)
    except (ValidationError, ValueError) as err:
        raise ConfigError(f"invalid settings: {err}") from err
    registry = load_registry(settings)  # ModelLoadError names the model that cannot start
    check_serving_plan(settings, registry)  # cascades and the shadow reference name served models
    ensure_file_descriptors(settings.limit_concurrency)
    log.info("models loaded; listening on http://%s:%d", settings.host, settings.port)
    app = create_app(settings, registry)
    protocol = guarded_protocol(settings.header_timeout_s, settings.body_timeout_s, settings.max_header_bytes,
                                app.state.observe_unanswered)
    uvicorn.run(app, host=settings.host, port=settings.port,
                log_level=args.log_level, timeout_graceful_shutdown=settings.graceful_timeout_s,
                access_log=False, http=protocol, limit_concurrency=settings.limit_concurrency,
                timeout_keep_alive=settings.keep_alive_timeout_s)
