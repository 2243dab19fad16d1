"""`openset serve`: run the gateway with uvicorn; every setting is a flag and an OPENSET_ variable."""

from __future__ import annotations

import argparse
import sys
import types
from typing import Any, get_args

import uvicorn

from service.settings import Settings


def add_command(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "serve",
        help="serve the REST API (flags override OPENSET_* environment variables)",
        description="Serve the OpenSet REST API. A flag overrides its OPENSET_<NAME> environment variable.",
    )
    for name, info in Settings.model_fields.items():
        flag = "--" + name.replace("_", "-")
        choices = get_args(info.annotation) if "Literal" in str(info.annotation) else None
        parser.add_argument(
            flag,
            dest=name,
            default=None,
            type=_flag_type(info.annotation),
            choices=choices or None,
            help=f"{info.description} (env OPENSET_{name.upper()}; default {info.default!r})",
        )
    parser.set_defaults(func=run)


def _flag_type(annotation: Any) -> Any:
    """int / float / str parser for a settings field (optional fields take their inner type)."""
    args = [arg for arg in get_args(annotation) if arg is not type(None)]
    base = args[0] if isinstance(annotation, types.UnionType) and args else annotation
    return base if base in (int, float) else str


class Server(uvicorn.Server):
    """uvicorn's server that also marks the gateway as draining (readyz false) on SIGTERM / SIGINT."""

    def __init__(self, config: uvicorn.Config, app: Any) -> None:
        super().__init__(config)
        self.gateway = app.state.gateway

    def handle_exit(self, sig: int, frame: types.FrameType | None) -> None:
        self.gateway.draining = True
        super().handle_exit(sig, frame)
        # uvicorn re-raises the signal once it has shut down; a drained server exits with status 0.
        self._captured_signals.clear()


def settings_from_args(args: argparse.Namespace) -> Settings:
    """Settings from OPENSET_* variables, overridden by the flags given on the command line."""
    overrides = {
        name: getattr(args, name) for name in Settings.model_fields if getattr(args, name, None) is not None
    }
    return Settings(**overrides)


def run(args: argparse.Namespace) -> int:
    from service.app import create_app
    from service.logs import configure_logging

    settings = settings_from_args(args)
    from models.predictor import model_names  # the gateway's one model import: a typo fails here

    if settings.model not in model_names():
        print(
            f"openset serve: unknown model {settings.model!r}; known models: {', '.join(model_names())}",
            file=sys.stderr,
        )
        return 2
    configure_logging(settings.log_level)
    app = create_app(settings)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=int(settings.shutdown_grace_s) or None,
        lifespan="on",
    )
    Server(config, app).run()
    return 0
