"""The JSON manifest written next to the exported graphs (and engines): what was exported, from which
weights, with which settings, and a sha256 per file so a runtime refuses a changed or partial export.

    {"format": 1, "kind": "onnx" | "tensorrt", "model": "demo", "weights_id": "...", "config": {...},
     "opset": 17, "msda": "plugin" | "portable", "dynamic": true, "input_sizes": [[H, W], ...],
     "logit_scale": 2.65, "graphs": [{"name", "size": [H, W] | null, "file", "sha256",
     "inputs": [...], "outputs": [...]}], "family": "xdecoder" | "openseed" | "mask2former", ...}

`size` is null for graphs with dynamic image axes and for the text graphs. `family` names the model
family whose graphs the export holds (`export.graphs` or `export.families`); manifests written
before it existed are X-Decoder exports.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from models.checkpoint import file_sha256
from models.configs import (
    DecoderConfig,
    FocalNetConfig,
    PixelDecoderConfig,
    ResizeRule,
    XDecoderConfig,
    get_config,
)
from models.language.text_encoder import TextEncoderConfig

MANIFEST = "manifest.json"
FORMAT = 1
# `--msda` names on the command line -> the forms of `models.ops.onnx_export`.
MSDA_FORMS = {"plugin": "trt_plugin", "portable": "grid_sample"}


@dataclass
class GraphEntry:
    name: str
    file: str
    sha256: str
    inputs: list[str]
    outputs: list[str]
    size: list[int] | None = None  # (H, W) of a fixed-size image graph; None when dynamic / text


@dataclass
class Manifest:
    kind: str
    model: str
    weights_id: str
    config: dict[str, Any]
    opset: int
    msda: str
    dynamic: bool
    input_sizes: list[list[int]]
    logit_scale: float
    graphs: list[GraphEntry] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)
    format: int = FORMAT
    family: str = "xdecoder"

    def graph(self, name: str, size: tuple[int, int] | None = None) -> GraphEntry:
        """The entry of graph `name` for image size `size` (the dynamic one when it exists)."""
        for entry in self.graphs:
            if entry.name == name and (entry.size is None or size is None or tuple(entry.size) == size):
                return entry
        sizes = [tuple(e.size) for e in self.graphs if e.name == name and e.size]
        remedy = "export with --dynamic or add" if self.family == "xdecoder" else "export again and add"
        raise KeyError(
            f"no {name!r} graph for image size {size} in this export (fixed sizes {sizes}); "
            f"{remedy} the size with --size HxW"
        )

    def write(self, directory: Path) -> Path:
        path = directory / MANIFEST
        path.write_text(json.dumps(dataclasses.asdict(self), indent=2) + "\n")
        return path


def config_dict(name: str) -> dict[str, Any]:
    """The current named config as plain JSON data (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(get_config(name))))


def config_from_dict(data: dict[str, Any]) -> XDecoderConfig:
    """The `XDecoderConfig` a manifest's `config` holds (the inverse of `config_dict`)."""
    rules = {
        task: ResizeRule(
            rule["short"],
            rule["max_size"],
            tuple(rule["fixed"]) if rule["fixed"] else None,
            rule.get("scale"),
        )
        for task, rule in data["resize"].items()
    }
    backbone = {**data["backbone"], "depths": tuple(data["backbone"]["depths"])}
    return XDecoderConfig(
        name=data["name"],
        backbone=FocalNetConfig(**backbone),
        pixel_decoder=PixelDecoderConfig(**data["pixel_decoder"]),
        decoder=DecoderConfig(**data["decoder"]),
        text=TextEncoderConfig(**data["text"]),
        resize=rules,
        reference_keys=data["reference_keys"],
        released=data["released"],
    )


def read_manifest(directory: str | Path, check_files: bool = True) -> Manifest:
    """Load `directory/manifest.json`; with `check_files`, every file's sha256 must match."""
    directory = Path(directory)
    path = directory / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: not an export directory (run `openset export onnx`)")
    data = json.loads(path.read_text())
    if data.get("format") != FORMAT:
        raise ValueError(f"{path}: manifest format {data.get('format')!r}, expected {FORMAT}")
    data["graphs"] = [GraphEntry(**g) for g in data["graphs"]]
    manifest = Manifest(**data)
    if check_files:
        for entry in manifest.graphs:
            file = directory / entry.file
            if not file.is_file():
                raise FileNotFoundError(f"{file} listed in the manifest is missing")
            if file_sha256(file) != entry.sha256:
                raise ValueError(f"{file} does not match its sha256 in the manifest (changed or partial)")
    return manifest


def check_config(manifest: Manifest) -> None:
    """The export must come from the config the code now has under that name (else re-export), and
    be an X-Decoder export (the runtimes serve those only)."""
    if manifest.family != "xdecoder":
        raise ValueError(
            f"this is an export of the {manifest.family} model {manifest.model!r}: the ONNX Runtime and "
            "TensorRT runtimes serve X-Decoder exports only (`openset export verify` checks this one)"
        )
    current = config_dict(manifest.model)
    if current != manifest.config:
        changed = sorted(k for k in current if current.get(k) != manifest.config.get(k))
        raise ValueError(
            f"the export of {manifest.model!r} was made with a different config (fields {changed}); "
            "export the model again"
        )
