"""Load a page in headless Chromium and report what a user's browser would: console errors, uncaught
exceptions, failed resource loads, and facts read off the loaded page by a JavaScript expression.

It speaks the Chrome DevTools Protocol over ``--remote-debugging-pipe`` (file descriptors 3 and 4 of the
browser, JSON messages ended by a NUL byte), so no websocket client or other package is needed.
"""

from __future__ import annotations

import fcntl
import json
import os
import select
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: Executable names tried in order (Debian's package installs ``chromium``).
BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def find_browser() -> str | None:
    return next((path for name in BROWSERS if (path := shutil.which(name))), None)


@dataclass
class PageLoad:
    """``errors``: one line per console error, uncaught exception or failed load; ``value``: what the
    expression evaluated to once the page had loaded (JSON-decoded)."""

    errors: list[str]
    value: Any


def load(browser: str, url: str, expression: str, timeout: float = 60.0) -> PageLoad:
    """Open ``url``, wait for its load event, evaluate ``expression`` (it must return a JSON string)."""
    to_browser_r, to_browser_w = os.pipe()
    from_browser_r, from_browser_w = os.pipe()

    def wire_descriptors() -> None:  # in the child: the browser reads commands on 3 and writes on 4
        # Moved above 4 first: dup2 onto 3 must not close a pipe end that happens to be descriptor 3 or 4.
        read = fcntl.fcntl(to_browser_r, fcntl.F_DUPFD, 10)
        write = fcntl.fcntl(from_browser_w, fcntl.F_DUPFD, 10)
        os.dup2(read, 3)
        os.dup2(write, 4)

    with tempfile.TemporaryDirectory(prefix="dmlkit-chromium-") as profile:
        command = [
            browser, "--headless", "--disable-gpu", "--no-sandbox", "--no-first-run",
            "--remote-debugging-pipe", f"--user-data-dir={profile}", "about:blank",
        ]  # fmt: skip
        process = subprocess.Popen(
            command,
            pass_fds=(3, 4),
            preexec_fn=wire_descriptors,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        os.close(to_browser_r)
        os.close(from_browser_w)
        session = _Session(to_browser_w, from_browser_r, time.monotonic() + timeout)
        try:
            return _load(session, url, expression)
        finally:
            os.close(to_browser_w)
            os.close(from_browser_r)
            if process.poll() is None:
                process.kill()
            process.wait(timeout=30)


def _load(session: _Session, url: str, expression: str) -> PageLoad:
    targets = session.call("Target.getTargets")["targetInfos"]
    page = next(target for target in targets if target["type"] == "page")
    attached = session.call("Target.attachToTarget", {"targetId": page["targetId"], "flatten": True})
    sid = attached["sessionId"]
    for domain in ("Page", "Runtime", "Log"):
        session.call(f"{domain}.enable", session=sid)
    session.call("Page.navigate", {"url": url}, session=sid)
    session.wait_for(lambda message: message.get("method") == "Page.loadEventFired")
    result = session.call("Runtime.evaluate", {"expression": expression, "returnByValue": True}, session=sid)
    if "exceptionDetails" in result:
        raise AssertionError(f"the check expression failed: {result['exceptionDetails']}")
    value = json.loads(result["result"]["value"])
    session.call("Browser.close")
    return PageLoad(_errors(session.events), value)


def _errors(events: list[dict[str, Any]]) -> list[str]:
    found = []
    for event in events:
        method, params = event.get("method"), event.get("params", {})
        if method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
            args = " ".join(
                str(arg.get("value", arg.get("description", ""))) for arg in params.get("args", [])
            )
            found.append(f"console.{params['type']}: {args}")
        elif method == "Runtime.exceptionThrown":
            details = params.get("exceptionDetails", {})
            found.append(
                f"exception: {details.get('exception', {}).get('description') or details.get('text')}"
            )
        elif method == "Log.entryAdded" and params.get("entry", {}).get("level") == "error":
            entry = params["entry"]
            found.append(f"{entry.get('source')}: {entry.get('text')} {entry.get('url', '')}".strip())
    return found


class _Session:
    """Requests and their answers over the pipe; every event seen is kept in :attr:`events`."""

    def __init__(self, write_fd: int, read_fd: int, deadline: float) -> None:
        self.write_fd, self.read_fd, self.deadline = write_fd, read_fd, deadline
        self.buffer = b""
        self.events: list[dict[str, Any]] = []
        self.last_id = 0

    def call(self, method: str, params: dict[str, Any] | None = None, session: str | None = None) -> Any:
        self.last_id += 1
        message: dict[str, Any] = {"id": self.last_id, "method": method, "params": params or {}}
        if session is not None:
            message["sessionId"] = session
        os.write(self.write_fd, json.dumps(message).encode() + b"\0")
        asked = self.last_id
        answer = self.wait_for(lambda reply: reply.get("id") == asked)
        if "error" in answer:
            raise AssertionError(f"{method}: {answer['error']}")
        return answer.get("result", {})

    def wait_for(self, wanted: Any) -> dict[str, Any]:
        while True:
            while b"\0" in self.buffer:
                raw, self.buffer = self.buffer.split(b"\0", 1)
                message = json.loads(raw)
                if "method" in message:
                    self.events.append(message)
                if wanted(message):
                    return message
            left = self.deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("headless Chromium did not answer in time")
            ready, _, _ = select.select([self.read_fd], [], [], left)
            if ready:
                chunk = os.read(self.read_fd, 1 << 16)
                if not chunk:
                    raise AssertionError("headless Chromium closed the DevTools pipe (it crashed or exited)")
                self.buffer += chunk


def file_url(path: Path) -> str:
    return path.resolve().as_uri()
