"""Render a kustomization without kubectl: the small subset of kustomize that k8s/ uses.

    python k8s/render.py k8s/overlays/gpu > openset-gpu.yaml

Supported kustomization fields: `resources` (YAML files or folders holding a kustomization) and
`patches` given by `path`, each a strategic-merge patch that names its target by apiVersion, kind and
metadata.name. Any other field is an error, so nothing is ever dropped silently. `kubectl kustomize`
gives the same objects (tests/test_deploy.py compares the two where kubectl is installed).
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path
from typing import Any

import yaml

Manifest = dict[str, Any]

SUPPORTED_FIELDS = {"apiVersion", "kind", "resources", "patches"}

# Strategic-merge keys of the Kubernetes lists that the patches touch: a patch item replaces or merges
# into the item with the same key. Lists not named here are replaced whole, as Kubernetes does for
# lists without a merge key (tolerations, args, command, accessModes, ...).
MERGE_KEYS = {
    "containers": "name",
    "initContainers": "name",
    "env": "name",
    "volumes": "name",
    "volumeMounts": "mountPath",
    "imagePullSecrets": "name",
}

# kustomize's default output order for the kinds used here (its "legacy" order); others follow.
KIND_ORDER = [
    "Namespace",
    "ServiceAccount",
    "ConfigMap",
    "Secret",
    "Service",
    "PersistentVolumeClaim",
    "Deployment",
    "StatefulSet",
    "Job",
    "PodDisruptionBudget",
    "HorizontalPodAutoscaler",
]


def resource_id(manifest: Manifest) -> tuple[str, str, str]:
    """(apiVersion, kind, name): how a patch finds its target."""
    return manifest["apiVersion"], manifest["kind"], manifest["metadata"]["name"]


def load_documents(path: Path) -> list[Manifest]:
    """Every non-empty YAML document of a file."""
    with path.open() as f:
        return [doc for doc in yaml.safe_load_all(f) if doc]


def find_kustomization(folder: Path) -> Path:
    for name in ("kustomization.yaml", "kustomization.yml", "Kustomization"):
        if (folder / name).is_file():
            return folder / name
    raise FileNotFoundError(f"no kustomization.yaml in {folder}")


def merge_key_for(field: str, items: list[Any]) -> str | None:
    """The strategic-merge key of a list field, or None when the list is replaced whole."""
    if field == "ports":  # container ports merge on containerPort, Service ports on port
        return "containerPort" if all("containerPort" in item for item in items) else "port"
    return MERGE_KEYS.get(field)


def merge_list(base: list[Any], patch: list[Any], key: str) -> list[Any]:
    """Merge two lists of objects by `key`: matching items merge, new items are appended."""
    merged = [copy.deepcopy(item) for item in base]
    index = {item.get(key): i for i, item in enumerate(merged) if isinstance(item, dict)}
    for item in patch:
        if isinstance(item, dict) and item.get(key) in index:
            position = index[item[key]]
            merged[position] = strategic_merge(merged[position], item)
        else:
            merged.append(copy.deepcopy(item))
    return merged


def strategic_merge(base: Manifest, patch: Manifest) -> Manifest:
    """Apply a strategic-merge patch: maps merge, null deletes, keyed lists merge, other lists replace."""
    merged = copy.deepcopy(base)
    for field, value in patch.items():
        if field.startswith("$"):
            raise ValueError(f"strategic-merge directive {field!r} is not supported")
        if value is None:
            merged.pop(field, None)
        elif isinstance(value, dict) and isinstance(merged.get(field), dict):
            merged[field] = strategic_merge(merged[field], value)
        elif isinstance(value, list) and isinstance(merged.get(field), list):
            key = merge_key_for(field, merged[field] + value)
            is_keyed = key is not None and all(isinstance(i, dict) for i in merged[field] + value)
            merged[field] = merge_list(merged[field], value, key) if is_keyed else copy.deepcopy(value)
        else:
            merged[field] = copy.deepcopy(value)
    return merged


def build(folder: str | Path) -> list[Manifest]:
    """The objects a kustomization folder renders to, in kustomize's order."""
    folder = Path(folder)
    kustomization = load_documents(find_kustomization(folder))[0]
    unknown = set(kustomization) - SUPPORTED_FIELDS
    if unknown:
        raise ValueError(f"{folder}: kustomization fields not supported by render.py: {sorted(unknown)}")

    manifests: list[Manifest] = []
    for entry in kustomization.get("resources", []):
        path = folder / entry
        manifests.extend(build(path) if path.is_dir() else load_documents(path))

    ids = [resource_id(m) for m in manifests]
    duplicates = {i for i in ids if ids.count(i) > 1}
    if duplicates:
        raise ValueError(f"{folder}: resources defined twice: {sorted(duplicates)}")

    for entry in kustomization.get("patches", []):
        if set(entry) != {"path"}:
            raise ValueError(f"{folder}: only `patches: [{{path: ...}}]` is supported, got {entry}")
        for patch in load_documents(folder / entry["path"]):
            target = resource_id(patch)
            if target not in ids:
                raise ValueError(f"{folder}/{entry['path']}: no resource {target} to patch")
            position = ids.index(target)
            manifests[position] = strategic_merge(manifests[position], patch)

    def order(manifest: Manifest) -> tuple[int, str, str]:
        kind = manifest["kind"]
        rank = KIND_ORDER.index(kind) if kind in KIND_ORDER else len(KIND_ORDER)
        return rank, kind, manifest["metadata"]["name"]

    return sorted(manifests, key=order)


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python k8s/render.py KUSTOMIZATION_FOLDER", file=sys.stderr)
        return 2
    yaml.safe_dump_all(build(argv[0]), sys.stdout, sort_keys=False)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
