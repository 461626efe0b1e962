"""Loading a page in a real browser (headless Chromium, Debian's ``chromium`` package) to check what a person sees:
here, that every picture of a run's report loads."""
from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from storage.errors import UserError

BROWSERS = ("chromium", "chromium-browser", "google-chrome")
INSTALL_HINT = "apt-get install chromium (or `make report-check`, which installs it)"


class BrowserMissingError(UserError):
    """No headless browser on this machine."""


@dataclass(frozen=True)
class PageCheck:
    images: int  # pictures on the page
    broken: int  # of which failed to load


def find_browser() -> str:
    for name in BROWSERS:
        if (path := shutil.which(name)) is not None:
            return path
    raise BrowserMissingError(f"no headless browser found ({', '.join(BROWSERS)}); install one: {INSTALL_HINT}")


def rendered_dom(url: str, wait_ms: int = 10000, timeout: float = 120.0) -> str:
    """The DOM of ``url`` after headless Chromium loaded it and ran its scripts for ``wait_ms`` of virtual time."""
    browser = find_browser()
    with tempfile.TemporaryDirectory() as profile:
        result = subprocess.run(
            [browser, "--headless=new", "--no-sandbox", "--disable-gpu", f"--user-data-dir={profile}",
             f"--virtual-time-budget={wait_ms}", "--window-size=1600,900", "--dump-dom", url],
            capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0 or "<body" not in result.stdout:
        raise RuntimeError(f"{url}: {browser} could not load it (exit {result.returncode}): "
                           f"{result.stderr.strip()[-300:]}")
    return result.stdout


def check_page(path: str | Path) -> PageCheck:
    """Load the local HTML file ``path`` in headless Chromium and read the counts its load handler wrote on
    ``<body>`` (``data-images``, ``data-broken``: see flows/report.py)."""
    body = re.search(r"<body[^>]*>", rendered_dom(Path(path).resolve().as_uri()))
    images = re.search(r'data-images="(\d+)"', body.group(0)) if body else None
    broken = re.search(r'data-broken="(\d+)"', body.group(0)) if body else None
    if images is None or broken is None:
        raise RuntimeError(f"{path}: the page did not finish loading in headless Chromium")
    return PageCheck(int(images.group(1)), int(broken.group(1)))
