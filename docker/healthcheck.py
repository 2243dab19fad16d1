"""Container health check: exit 0 when the local OpenSet server answers 200 on a path (default /healthz).

    python /opt/openset/healthcheck.py [/readyz]

Reads the port from OPENSET_PORT (8000 when unset). Standard library only, so it runs in any image.
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request


def check(path: str = "/healthz", timeout_s: float = 4.0) -> bool:
    """True when GET http://127.0.0.1:$OPENSET_PORT{path} answers 200."""
    port = int(os.environ.get("OPENSET_PORT", "8000"))
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=timeout_s) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


if __name__ == "__main__":
    sys.exit(0 if check(*sys.argv[1:2]) else 1)
