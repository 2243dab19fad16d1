"""`python -m models.ops.build`: compile the C++ multi-scale deformable attention kernel now.

Exits 1 when it cannot be built (the operator then uses the reference on CPU). `make setup` runs it.
"""

from __future__ import annotations

from models.ops.cpu_kernel import EXTENSION_NAME, build_directory, load_cpu_extension


def main() -> int:
    if load_cpu_extension() is None:
        return 1
    print(f"{EXTENSION_NAME} is built in {build_directory()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
