"""Container health check: exit 0 when ``GET http://127.0.0.1:$WDSERVE_PORT<path>`` answers 2xx.

Used by the serving image's HEALTHCHECK and by compose. Standard library only, because slim
images have no curl. Usage: ``python healthcheck.py [/ready]``.
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request


def check(path: str, port: str, timeout: float) -> tuple[bool, str]:
    """Return (healthy, message) for one GET of ``path`` on the local server."""
    url = f"http://127.0.0.1:{port}{path}"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            status = response.status
    except urllib.error.HTTPError as error:
        return False, f"{url}: HTTP {error.code}"
    except (urllib.error.URLError, OSError) as error:
        return False, f"{url}: {error}"
    return 200 <= status < 300, f"{url}: HTTP {status}"


def main(argv: list[str]) -> int:
    path = argv[1] if len(argv) > 1 else "/ready"
    healthy, message = check(
        path,
        port=os.environ.get("WDSERVE_PORT", "8000"),
        timeout=float(os.environ.get("WDSERVE_HEALTHCHECK_TIMEOUT", "4")),
    )
    print(message, file=sys.stdout if healthy else sys.stderr)
    return 0 if healthy else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
