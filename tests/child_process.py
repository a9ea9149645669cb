"""A test's server *process*: ``python -m tests.<module>`` run from the repository root, with its
stdout read line by line as it comes, its stderr kept for error messages, and its stdin as the
off switch (the child exits when stdin closes). ``say`` is the child's side: one whole line per
call, flushed, from any thread. :func:`run_module` runs a module (a benchmark) to its end."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from collections.abc import Mapping
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def run_module(
    module: str, *arguments: str, timeout: float, env: Mapping[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """``python -m module *arguments`` from the repository root, run to its end within
    ``timeout`` s; output captured as text. ``env`` adds to (or overrides) the environment."""
    return subprocess.run(
        [sys.executable, "-m", module, *arguments],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


class ChildProcess:
    """Starts ``python -m module *arguments``; every stdout line goes to :meth:`on_line` (on a
    reader thread), stderr collects in :attr:`errors`."""

    def __init__(self, module: str, arguments: list[str]) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", module, *arguments],
            cwd=REPO,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )
        self.errors: list[str] = []
        stdout, stderr = self.process.stdout, self.process.stderr
        assert stdout is not None and stderr is not None
        self._reader = threading.Thread(
            target=lambda: [self.on_line(line.strip()) for line in stdout], daemon=True
        )
        self._reader.start()
        threading.Thread(target=lambda: self.errors.extend(stderr), daemon=True).start()

    def on_line(self, line: str) -> None:
        """One line the child printed (called on the reader thread, in order)."""

    def kill(self) -> None:
        self.process.kill()
        self.process.wait(timeout=10)

    def stop(self) -> None:
        """Close stdin (the child exits; killed after 10 s if it does not), then read the rest
        of its output."""
        if self.process.poll() is None:
            assert self.process.stdin is not None
            self.process.stdin.close()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.kill()
        self._reader.join(timeout=10)


_say_lock = threading.Lock()


def say(text: str) -> None:
    """Print one line to the controller (child side), whole and flushed even from many threads."""
    with _say_lock:
        print(text, flush=True)
