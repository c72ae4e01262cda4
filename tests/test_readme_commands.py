"""Every shell command in the README's code blocks, run as printed wherever this machine can run
it, so none fails as a user types it.

The commands run in order, in a directory laid out as the repository's root (`configs/`,
`tools/`), each block after the outputs of the sections before it are cleared (`exported/`: the
README's sections are alternatives, not one script) while the runs they trained stay. What
cannot run here as printed is swapped for the nearest thing that can, and said so in `HOW`:
hub ids (this machine has no hub) become local directories of the same architecture, a user's
`tickets.jsonl` a chat file of the same format, training stops after 2 steps, and the
benchmark's flags are parsed (`tests/test_benchmark.py` runs it at its `--quick` shape). What
cannot run at all here (installs, which `.ci/run` performs from nothing; this test suite
itself; a GPU; llama.cpp) is checked as far as it can be: the files it would open exist, the
flags it passes parse. A README command this test does not know fails
it, so a new one cannot go unchecked.
"""

from __future__ import annotations

import importlib
import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_plan import GPT_OSS_20B, LLAMA3_8B
from tests.tiny_run import DATA, REPO, subprocess_env, tiny_model_dir

pytestmark = pytest.mark.slow

SHORT_TRAINING = ["--config.train.steps=2"]
# What each hub id or placeholder stands for on this machine.
STAND_INS = {
    "meta-llama/Meta-Llama-3-8B": "llama3-8b",  # config.json alone: the dry run reads no weights
    "<dir with Llama-3-8B config.json>": "llama3-8b",
    "<gpt-oss-20b>": "gpt-oss-20b",  # config.json alone, as released (MXFP4 experts)
    "meta-llama/Llama-3.2-1B": "tiny-llama",  # trained for 2 steps: a tiny model of its family
    "tickets.jsonl": "tickets.jsonl",  # a chat file, as the README's own data section describes
    "questions.csv": "questions.csv",  # new rows for the topic classifier: a text column
}
QUESTIONS = ["How do I reset my password?", "Who wrote Hamlet?", "What is the speed of light?",
             "Do you like music?", "What is your favourite food?"]


def readme_commands() -> list[list[str]]:
    """The commands of each ```bash block, continuations joined, comments and blanks dropped."""
    text = (REPO / "README.md").read_text()
    blocks = []
    for body in re.findall(r"```bash\n(.*?)```", text, re.S):
        lines = body.replace("\\\n", " ").splitlines()
        commands = [_without_comment(line).strip() for line in lines]
        blocks.append([re.sub(r"\s+", " ", c) for c in commands if c])
    return blocks


def _without_comment(line: str) -> str:
    """The line before its `#` comment (a `#` inside quotes is kept)."""
    quoted = None
    for i, ch in enumerate(line):
        if ch in "\"'" and quoted in (None, ch):
            quoted = None if quoted else ch
        elif ch == "#" and quoted is None and (i == 0 or line[i - 1].isspace()):
            return line[:i]
    return line


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory) -> Path:
    """A directory laid out as the repository's root, with the stand-ins beside."""
    root = tmp_path_factory.mktemp("readme")
    for name in ("configs", "tools"):
        (root / name).symlink_to(REPO / name)
    (root / "llama3-8b").mkdir()
    (root / "llama3-8b" / "config.json").write_text(json.dumps(
        {**LLAMA3_8B, "architectures": ["LlamaForCausalLM"]}))
    (root / "gpt-oss-20b").mkdir()
    (root / "gpt-oss-20b" / "config.json").write_text(json.dumps(GPT_OSS_20B))
    tiny_model_dir(root / "tiny-llama")
    shutil.copy(DATA / "support_chat.jsonl", root / "tickets.jsonl")
    (root / "questions.csv").write_text("text\n" + "".join(f'"{q}"\n' for q in QUESTIONS))
    return root


def run(argv: list[str], cwd: Path, timeout: int = 900) -> subprocess.CompletedProcess:
    done = subprocess.run(argv, cwd=cwd, env=subprocess_env(1), capture_output=True, text=True,
                          timeout=timeout)
    assert done.returncode == 0, (
        f"{shlex.join(argv)} failed ({done.returncode}):\n{done.stdout[-3000:]}\n"
        f"{done.stderr[-3000:]}")
    return done


def how(argv: list[str], cwd: Path) -> str:
    """Run or check one command of the README; returns what was done (for the report)."""
    program = argv[0]
    if program == "pip":
        return "skipped: an install (.ci/run installs from nothing as the README says)"
    if argv[:3] == ["python", "-m", "pytest"]:
        return "skipped: this test suite"
    if argv[:3] == ["python", "-m", "jaxft.train"] and "--dry_run" not in argv:
        run([sys.executable, *argv[1:], *SHORT_TRAINING], cwd)
        return "ran, 2 steps"
    if argv[:2] == ["python", "-m"]:
        run([sys.executable, *argv[1:]], cwd)
        return "ran"
    if argv[0] == "python" and argv[1] in ("tools/benchmark.py", "tools/benchmark_data.py"):
        # a run is minutes; tests/test_benchmark.py runs the printed command at its --quick
        # shape (and checks its rows), so here each printed form's flags must parse
        sys.path.insert(0, str(REPO / "tools"))
        try:
            tool = importlib.import_module(Path(argv[1]).stem)
        finally:
            sys.path.remove(str(REPO / "tools"))
        tool.parse_args(argv[2:])
        return "flags parse (tests/test_benchmark.py runs it, --quick)"
    if program == "tensorboard":
        logdir = cwd / argv[argv.index("--logdir") + 1]
        assert any(logdir.glob("events.out.tfevents.*")), f"{logdir}: no event files"
        return "the event files it serves exist"
    if program == "llama-cli":
        model = cwd / argv[argv.index("-m") + 1]
        assert model.is_file() and model.read_bytes()[:4] == b"GGUF", model
        return "the GGUF file it opens exists"
    if argv[:2] == ["bash", "tools/gpu_check.sh"]:
        script = (cwd / argv[1]).read_text()
        assert re.search(rf"\$stage == {re.escape(argv[2])}\b", script), argv
        subprocess.run(["bash", "-n", argv[1]], cwd=cwd, check=True)
        return "needs a GPU image: its subcommand exists and the script parses"
    raise AssertionError(f"README command not covered by this test: {shlex.join(argv)}")


def test_every_readme_command_runs_as_printed(sandbox, capsys):
    report = []
    for block in readme_commands():
        shutil.rmtree(sandbox / "exported", ignore_errors=True)
        for command in block:
            for stand_in, local in STAND_INS.items():
                command = command.replace(stand_in, local)
            for part in command.split("&&"):
                argv = shlex.split(part)
                report.append(f"{shlex.join(argv)[:100]}: {how(argv, sandbox)}")
    with capsys.disabled():
        print("\n" + "\n".join(report))
    assert len(report) >= 20
    labelled = (sandbox / "labelled.csv").read_text().splitlines()  # the classifier's answers
    assert labelled[0] == "text,predicted_label,probability" and len(labelled) == 1 + len(QUESTIONS)
