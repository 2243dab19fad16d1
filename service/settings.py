"""Service settings: environment variables with the prefix `OPENSET_`, each also an `openset serve` flag."""

from __future__ import annotations

from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """Everything the gateway and its workers need to know; see DESIGN.md, section Settings."""

    model_config = SettingsConfigDict(env_prefix="OPENSET_", extra="ignore", protected_namespaces=())

    model: str = Field("demo", description="Named model config to load (models.configs).")
    checkpoint: str | None = Field(None, description="Checkpoint file; unset loads the config's own weights.")
    runtime: Literal["torch", "onnxruntime", "tensorrt"] = Field("torch", description="Inference runtime.")
    precision: Literal["fp32", "tf32", "bf16", "fp16"] = Field(
        "fp32", description="Torch compute precision: fp32 (the reference), tf32, bf16 or fp16 (GPUs)."
    )
    device: str = Field("cpu", description="'cpu', 'cuda' (one worker per GPU) or 'cuda:N'.")
    workers: int = Field(1, ge=1, le=64, description="Worker processes on CPU (ignored on cuda).")
    max_batch_size: int = Field(
        8, ge=1, le=256, description="A batch closes when it holds this many requests."
    )
    max_batch_delay_ms: float = Field(
        2.0, ge=0, le=10_000, description="...or when its oldest request has waited this long."
    )
    queue_size: int = Field(64, ge=1, description="Bound of each (model, task, size bucket) queue.")
    request_timeout_s: float = Field(30.0, gt=0, description="Deadline of every request.")
    redis_url: str | None = Field(None, description="Second text-embedding cache tier; unset: memory only.")
    api_key: str | None = Field(None, description="Bearer token required on /v1 routes; unset: open.")
    max_upload_bytes: int = Field(10 * 1024 * 1024, ge=1024, description="Largest request body.")
    max_image_pixels: int = Field(25_000_000, ge=1, description="Largest image (width x height).")
    max_vocabulary: int = Field(256, ge=1, description="Most class names in one /segment request.")
    max_text_length: int = Field(200, ge=1, description="Longest class name or phrase, in characters.")
    max_retrieve_items: int = Field(32, ge=1, description="Most images and most texts in one request.")
    text_cache_size: int = Field(100_000, ge=0, description="Entries in the in-memory embedding LRU.")
    shutdown_grace_s: float = Field(30.0, ge=0, description="Time to finish in-flight work on SIGTERM.")
    torch_threads: int | None = Field(None, ge=1, description="Threads per worker; unset: cores / workers.")
    host: str = Field("0.0.0.0", description="Address to bind.")
    port: int = Field(8000, ge=0, le=65535, description="Port to bind.")
    log_level: str = Field("info", description="Log level of the JSON-lines logs.")
