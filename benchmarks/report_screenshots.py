"""Screenshots of an analysis report as a reader sees it: headless Chromium at a desktop width
(1,280 px) and a phone's (390 px), the first screen and the findings section of each.

    python benchmarks/report_screenshots.py analyses/quick-.../report.html shots/

writes shots/desktop_first_screen.png, shots/desktop_findings.png, shots/phone_first_screen.png and
shots/phone_findings.png, and prints each page's width against the window's (a page wider than
its window scrolls sideways). With ``--mlflow SERVER EXPERIMENT_ID RUN_ID`` it also opens the
analysis run's artifacts in a running ``mlflow server``, clicks report.html and checks that MLflow
previews it (shots/mlflow_artifact_view.png). Needs Chromium (Debian: apt-get install -y
chromium); nothing is fetched from the network (the report is self-contained).

Chromium is driven over its DevTools protocol on a pipe (``--remote-debugging-pipe``: JSON
messages ended by a NUL byte on file descriptors 3 and 4), which needs no Python package. Its
``--screenshot`` flag cannot do this: a page opened at an anchor came out half blank, and it
cannot ask the page for its width. tests/integration/test_analysis_report.py uses `Chromium` too.
"""

from __future__ import annotations

import argparse
import base64
import fcntl
import json
import os
import select
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# (name, window width, window height): a laptop's browser window and an iPhone-sized screen.
VIEWPORTS = (("desktop", 1280, 900), ("phone", 390, 844))
# A quiet browser: no first-run pages, no background requests, no GPU, a fresh profile.
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--hide-scrollbars",
)
TIMEOUT_S = 120


def find_chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if path := shutil.which(name):
            return path
    return None


class Chromium:
    """One headless Chromium and one page in it, driven over the DevTools protocol on a pipe."""

    def __init__(self, executable: str | None = None):
        executable = executable or find_chromium()
        if executable is None:
            raise RuntimeError("Chromium not found (Debian: apt-get install -y chromium)")
        self.profile = tempfile.mkdtemp(prefix="report-chromium-")
        commands_read, self._commands = os.pipe()
        self._replies, replies_write = os.pipe()

        def on_fds_3_and_4():
            # Chromium reads commands on fd 3 and writes replies on fd 4. Copied above 10 first,
            # so that neither copy overwrites the other when the pipes were given the numbers 3 or 4.
            high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 10) for fd in (commands_read, replies_write)]
            os.dup2(high[0], 3)
            os.dup2(high[1], 4)

        self.process = subprocess.Popen(
            [executable, *FLAGS, "--remote-debugging-pipe", f"--user-data-dir={self.profile}", "about:blank"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            pass_fds=(3, 4),
            preexec_fn=on_fds_3_and_4,
        )
        os.close(commands_read)
        os.close(replies_write)
        self._buffer = b""
        self._next_id = 0
        self._events: list[dict] = []
        target = self.send("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.send("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        self.send("Page.enable", session=True)

    # ---------------------------------------------------------------- the protocol

    def _message(self, deadline: float) -> dict:
        while b"\0" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._replies], [], [], left)[0]:
                raise TimeoutError("Chromium did not answer")
            chunk = os.read(self._replies, 1 << 20)
            if not chunk:
                raise RuntimeError("Chromium exited")
            self._buffer += chunk
        message, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(message)

    def send(self, method: str, session: bool = False, **params) -> dict:
        """One command; its result (events that arrive meanwhile are kept for `wait_for`)."""
        self._next_id += 1
        message = {"id": self._next_id, "method": method, "params": params}
        if session:
            message["sessionId"] = self.session
        os.write(self._commands, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + TIMEOUT_S
        while True:
            reply = self._message(deadline)
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self._events.append(reply)

    def wait_for(self, event: str) -> dict:
        deadline = time.monotonic() + TIMEOUT_S
        while True:
            for index, message in enumerate(self._events):
                if message.get("method") == event:
                    return self._events.pop(index)
            self._events.append(self._message(deadline))

    # ---------------------------------------------------------------- what a reader does

    def open(self, url: str, width: int, height: int) -> None:
        """``url`` in a window of ``width`` x ``height`` CSS pixels, after its load event."""
        self.send("Emulation.setDeviceMetricsOverride", session=True, width=width, height=height, deviceScaleFactor=1, mobile=width < 600)
        self._events.clear()
        self.send("Page.navigate", session=True, url=url)
        self.wait_for("Page.loadEventFired")

    def evaluate(self, expression: str):
        result = self.send("Runtime.evaluate", session=True, expression=expression, returnByValue=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def click(self, x: float, y: float) -> None:
        """A left click at (x, y) CSS pixels of the window, as a mouse makes it."""
        for kind in ("mouseMoved", "mousePressed", "mouseReleased"):
            self.send("Input.dispatchMouseEvent", session=True, type=kind, x=x, y=y, button="left", clickCount=1)

    def screenshot(self, path: Path) -> Path:
        """What the window shows now, as a PNG."""
        data = self.send("Page.captureScreenshot", session=True, format="png")["data"]
        path = Path(path)
        path.write_bytes(base64.b64decode(data))
        return path

    def close(self) -> None:
        try:
            self.send("Browser.close")
        except (OSError, RuntimeError, TimeoutError):
            pass
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        for fd in (self._commands, self._replies):
            os.close(fd)
        shutil.rmtree(self.profile, ignore_errors=True)

    def __enter__(self) -> Chromium:
        return self

    def __exit__(self, *_) -> None:
        self.close()


PAGE_WIDTH = "document.documentElement.scrollWidth"
SHOW_FINDINGS = "document.getElementById('findings').scrollIntoView(); window.scrollY"


def screenshots(report: Path, out: Path) -> dict[str, dict]:
    """The four screenshots of ``report`` in ``out``: per viewport, the file of each shot and the
    page's width (scrollWidth) beside the window's."""
    out.mkdir(parents=True, exist_ok=True)
    measured = {}
    with Chromium() as browser:
        for device, width, height in VIEWPORTS:
            browser.open(Path(report).resolve().as_uri(), width, height)
            first = browser.screenshot(out / f"{device}_first_screen.png")
            browser.evaluate(SHOW_FINDINGS)
            findings = browser.screenshot(out / f"{device}_findings.png")
            measured[device] = {"window_width": width, "page_width": browser.evaluate(PAGE_WIDTH), "files": [str(first), str(findings)]}
    return measured


# Where report.html is in the artifact list (clicked with real mouse events: the UI's tree ignores
# a scripted click()).
FIND_REPORT = """(() => {
  const walker = document.createTreeWalker(document.body, NodeFilter.SHOW_TEXT);
  for (let node = walker.nextNode(); node; node = walker.nextNode()) {
    if (node.textContent.trim() !== 'report.html') continue;
    const box = node.parentElement.getBoundingClientRect();
    if (box.width > 0) return [box.x + box.width / 2, box.y + box.height / 2];
  }
  return null;
})()"""
# MLflow previews an HTML artifact in a sandboxed frame of a blob: URL (its content cannot be read
# from the page): the frame's URL once it is there.
PREVIEW_FRAME = """(() => {
  const frame = [...document.querySelectorAll('iframe')].find(f => f.src.startsWith('blob:'));
  return frame ? frame.src : null;
})()"""


def mlflow_artifact_view(server: str, experiment_id: str, run_id: str, out: Path) -> dict:
    """The analysis run's report.html as MLflow's UI shows it: the run's artifacts page, report.html
    clicked, a screenshot once the preview frame is there; the frame's URL (None when the preview
    never came)."""
    out.mkdir(parents=True, exist_ok=True)
    with Chromium() as browser:
        browser.open(f"{server.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}/artifacts", 1280, 900)
        preview, deadline = None, time.monotonic() + TIMEOUT_S
        while preview is None and time.monotonic() < deadline:
            time.sleep(1)  # the UI is a single-page app: the file list arrives after the load event
            if where := browser.evaluate(FIND_REPORT):
                browser.click(*where)
                for _ in range(20):
                    time.sleep(1)
                    if preview := browser.evaluate(PREVIEW_FRAME):
                        break
        shot = browser.screenshot(out / "mlflow_artifact_view.png")
    return {"preview": preview, "file": str(shot)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("report", type=Path, help="report.html written by irrep-study analyze")
    parser.add_argument("out", type=Path, help="folder for the PNG files (created)")
    parser.add_argument(
        "--mlflow",
        nargs=3,
        metavar=("SERVER", "EXPERIMENT_ID", "RUN_ID"),
        help="also the analysis run's report.html in a running MLflow server's artifact view",
    )
    args = parser.parse_args(argv)
    if not args.report.is_file():
        raise SystemExit(f"{args.report}: no such file")
    if find_chromium() is None:
        raise SystemExit("Chromium not found (Debian: apt-get install -y chromium)")
    for device, result in screenshots(args.report, args.out).items():
        scroll = "no sideways scroll" if result["page_width"] <= result["window_width"] else "SCROLLS SIDEWAYS"
        print(f"{device}: page {result['page_width']} px in a {result['window_width']} px window ({scroll})")
        for path in result["files"]:
            print(f"  {path}")
    if args.mlflow:
        shown = mlflow_artifact_view(*args.mlflow, args.out)
        if shown["preview"] is None:
            raise SystemExit(f"MLflow's artifact view did not show report.html (screenshot: {shown['file']})")
        print(f"MLflow artifact view: report.html previewed ({shown['preview']})\n  {shown['file']}")


if __name__ == "__main__":
    main(sys.argv[1:])
