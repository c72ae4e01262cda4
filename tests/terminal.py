"""Run a jaxft command the way a user at a terminal does: stderr on a pseudo-terminal."""

from __future__ import annotations

import fcntl
import os
import pty
import struct
import subprocess
import sys
import termios
import threading
from pathlib import Path

REPO = Path(__file__).parents[1]


def on_a_terminal(args: list[str], timeout: float = 300) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `python -m <args>`, stderr on a 120-column terminal."""
    master, slave = pty.openpty()
    # a fresh pseudo-terminal is 0 x 0, where tqdm draws nothing; a user's is not
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))
    proc = subprocess.Popen([sys.executable, "-m", *args], stdout=subprocess.PIPE,
                            stderr=slave, cwd=REPO, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    os.close(slave)
    chunks: list[bytes] = []

    def drain() -> None:
        while True:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # the child closed its end
                return
            if not chunk:
                return
            chunks.append(chunk)

    reader = threading.Thread(target=drain)
    reader.start()
    stdout, _ = proc.communicate(timeout=timeout)
    reader.join(timeout=30)
    os.close(master)
    return proc.returncode, stdout.decode(), b"".join(chunks).decode(errors="replace")
