"""A real browser for the tests: Debian's chromium, headless, on pages served from this machine's
loopback only. A page reports what it found by POSTing JSON to /answer, which `answer` waits for."""

from __future__ import annotations

import http.server
import json
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run")
TYPES = {".html": "text/html", ".js": "text/javascript", ".mjs": "text/javascript", ".wasm": "application/wasm",
         ".json": "application/json"}


def chromium(profile: Path, *args: str) -> list[str]:
    return ["chromium", *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args]


class Site:
    """`page` at /, each folder of `routes` under its prefix ('/models/': a folder), and /answer."""

    def __init__(self, page: str, routes: dict[str, Path]) -> None:
        self.answers: list[Any] = []
        self.answered = threading.Event()
        site = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                path = self.path.split("?")[0]
                if path == "/":
                    return self.reply(200, page.encode(), TYPES[".html"])
                for prefix, folder in routes.items():
                    root = folder.resolve()
                    file = (root / path[len(prefix):]).resolve() if path.startswith(prefix) else None
                    if file is not None and file.is_relative_to(root) and file.is_file():
                        return self.reply(200, file.read_bytes(), TYPES.get(file.suffix, "application/octet-stream"))
                self.reply(404, b"", "text/plain")

            def do_POST(self) -> None:
                site.answers.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
                site.answered.set()
                self.reply(200, b"", "text/plain")

            def reply(self, code: int, data: bytes, kind: str) -> None:
                self.send_response(code)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_port}/"


@contextmanager
def serving(page: str, routes: dict[str, Path]) -> Iterator[Site]:
    site = Site(page, routes)
    thread = threading.Thread(target=site.server.serve_forever, daemon=True)
    thread.start()
    try:
        yield site
    finally:
        site.server.shutdown()
        site.server.server_close()


def answer(site: Site, query: str, profile: Path, timeout: float = 120) -> Any:
    """Open the site's page with `query` in headless chromium and return what the page POSTed."""
    browser = subprocess.Popen(chromium(profile, site.url + query), stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)
    try:
        if not site.answered.wait(timeout):
            browser.terminate()
            raise AssertionError(f"the page sent no answer in {timeout:.0f} s: {browser.communicate()[1][-2000:]}")
    finally:
        browser.terminate()
        browser.wait(30)
    return site.answers[-1]
