"""Settings: OPENSET_ environment variables and the matching `openset serve` flags."""

from __future__ import annotations

import subprocess
import sys

import pytest

from service.cli import build_parser
from service.serve_command import settings_from_args
from service.settings import Settings

DESIGN_SETTINGS = [
    "model",
    "checkpoint",
    "runtime",
    "device",
    "workers",
    "max_batch_size",
    "max_batch_delay_ms",
    "queue_size",
    "request_timeout_s",
    "redis_url",
    "api_key",
    "max_upload_bytes",
    "max_image_pixels",
    "max_vocabulary",
    "host",
    "port",
]


def test_defaults_follow_the_design(monkeypatch):
    for name in DESIGN_SETTINGS:
        monkeypatch.delenv(f"OPENSET_{name.upper()}", raising=False)
    settings = Settings()
    assert (settings.model, settings.port, settings.host) == ("demo", 8000, "0.0.0.0")
    assert settings.redis_url is None and settings.api_key is None


def test_every_setting_is_a_flag_and_flags_override_the_environment(monkeypatch):
    monkeypatch.setenv("OPENSET_MAX_BATCH_SIZE", "4")
    monkeypatch.setenv("OPENSET_WORKERS", "3")
    help_text = build_parser()._subparsers._group_actions[0].choices["serve"].format_help()
    for name in DESIGN_SETTINGS:
        assert "--" + name.replace("_", "-") in help_text
    args = build_parser().parse_args(
        ["serve", "--workers", "2", "--redis-url", "redis://x:1/0", "--port", "9"]
    )
    settings = settings_from_args(args)
    assert (settings.workers, settings.redis_url, settings.port) == (2, "redis://x:1/0", 9)
    assert settings.max_batch_size == 4  # from the environment


def test_invalid_values_are_refused():
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--runtime", "tflite"])
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--precision", "fp8"])
    with pytest.raises(ValueError):
        Settings(max_batch_size=0)


def test_an_unknown_model_stops_serve_at_once_naming_the_known_ones():
    result = subprocess.run(
        [sys.executable, "-m", "service.cli", "serve", "--model", "xdecoder-focal-typo"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert "xdecoder-focal-typo" in result.stderr
    assert "openseed-swint" in result.stderr and "mask2former-swint-coco-panoptic" in result.stderr
