"""Bad input a user can fix ends in one line naming the file, field or directory: never a
traceback, and never after minutes of loading what a later check would refuse anyway."""

import subprocess
import sys
from pathlib import Path

import pytest

import jaxft
from jaxft import cli as cli_lib
from jaxft import export, train
from jaxft.data import files
from tests.read_only import read_only
from tests.tiny_run import REPO, subprocess_env, tiny_config, tiny_model_dir, write_config_file


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory.mktemp("llama"), "llama")


@pytest.fixture(scope="module")
def trained(model_dir, tmp_path_factory):
    """A finished two-step LoRA run."""
    workdir = tmp_path_factory.mktemp("run")
    train.run(tiny_config(model_dir, workdir, **{"train.steps": 2}))
    return workdir


def one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message
    return message


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], cwd=REPO, env=subprocess_env(1),
                          capture_output=True, text=True, timeout=300)


def last_error_line(done: subprocess.CompletedProcess) -> str:
    """The one line a refused command leaves, after checking it left nothing else alarming."""
    assert done.returncode == 1, done.stderr[-2000:]
    assert "Traceback" not in done.stderr + done.stdout, done.stderr[-2000:]
    return done.stderr.strip().splitlines()[-1]


# -- files that are not what their name says -------------------------------------------------

def test_truncated_safetensors_is_named(model_dir, tmp_path):
    broken = tiny_model_dir(tmp_path / "broken", "llama")
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(jaxft.JaxftError) as e:
        jaxft.from_pretrained(broken)
    assert one_line(e).startswith(f"{weights}: not a readable safetensors file, truncated or "
                                  "damaged (SafetensorError: ")


def test_file_named_parquet_that_is_not_parquet(tmp_path):
    path = tmp_path / "tickets.parquet"
    path.write_text('{"text": "this is JSON, not parquet"}\n')
    with pytest.raises(jaxft.JaxftError) as e:
        files.read_files(str(path), skip_bad_rows=False)
    assert one_line(e).startswith(f"{path}: cannot read as parquet: ArrowInvalid: ")


# -- workdirs: checked before anything loads (the model path here does not even exist) -------

@pytest.mark.parametrize("layout, message", [
    ("workdir is a file", "{w}: workdir exists and is not a directory"),
    ("workdir under a file", "{w}: workdir cannot be created: {w.parent} is a file"),
    ("checkpoints is a file", "{w}/checkpoints: exists and is not a directory"),
])
def test_unusable_workdir_is_refused_before_loading(layout, message, tmp_path):
    workdir = tmp_path / "w"
    if layout == "workdir is a file":
        workdir.write_text("not a directory")
    elif layout == "workdir under a file":
        tmp_path.joinpath("file").write_text("x")
        workdir = tmp_path / "file" / "w"
    else:
        workdir.mkdir()
        (workdir / "checkpoints").write_text("not a directory")
    cfg = tiny_config(tmp_path / "no-model-here", workdir)
    with pytest.raises(jaxft.JaxftError) as e:
        train.run(cfg)
    assert one_line(e).startswith(message.format(w=workdir))


def test_read_only_workdir_is_refused_on_resume(model_dir, trained):
    with read_only(trained, recursive=True):
        with pytest.raises(jaxft.JaxftError) as e:
            train.run(tiny_config(model_dir, trained, **{"train.steps": 4}))
    assert one_line(e).startswith(f"{trained}")
    assert "is not writable" in one_line(e)


def test_export_into_a_read_only_directory_is_refused_before_loading(trained, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    with read_only(out):
        with pytest.raises(jaxft.JaxftError) as e:
            export.export_workdir(trained, out)
        assert one_line(e).startswith(f"{out}: output directory is not writable: ")
        # refused before the run is even looked at: a workdir with no checkpoint says the same
        with pytest.raises(jaxft.JaxftError, match="output directory is not writable"):
            export.export_workdir(out.parent / "no-such-run", out)


# -- the command line: the same refusals, one line each ---------------------------------------

@pytest.mark.slow
def test_misspelt_config_field_is_one_line(model_dir, tmp_path):
    config = write_config_file(tmp_path / "cfg.py", model_dir, tmp_path / "w")
    for command in ("jaxft.train", "jaxft.evaluate"):
        done = cli(command, f"--config={config}", "--config.optim.lrr=0.1")
        assert last_error_line(done) == \
            "error: config: optim.lrr is not a field (did you mean optim.lr?)"
    # ml_collections' other wording, for a section that does not exist (no "did you mean")
    error = KeyError(repr("'nosuch'"))
    assert cli_lib.unknown_field(["jaxft.train", "--config.nosuch.x=1"], error) == \
        "config: nosuch is not a field (in --config.nosuch.x)"


@pytest.mark.slow
def test_command_line_refusals_are_one_line(model_dir, trained, tmp_path):
    (tmp_path / "w").write_text("a file where the workdir should be")
    config = write_config_file(tmp_path / "cfg.py", model_dir, tmp_path / "w")
    assert last_error_line(cli("jaxft.train", f"--config={config}")) == \
        f"error: {tmp_path / 'w'}: workdir exists and is not a directory"

    out = tmp_path / "out"
    out.mkdir()
    with read_only(out):
        done = cli("jaxft.export", f"--workdir={trained}", f"--out={out}")
    assert last_error_line(done).startswith(f"error: {out}: output directory is not writable")

    broken = tiny_model_dir(tmp_path / "broken", "llama")
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    done = cli("jaxft.convert", f"--model={broken}", f"--out={tmp_path / 'converted'}")
    assert last_error_line(done).startswith(f"error: {weights}: not a readable safetensors")
    assert not Path(tmp_path / "converted").exists()


@pytest.mark.slow
def test_generate_and_evaluate_flags_are_checked_in_one_line(trained, tmp_path):
    """Numbers that cannot be right and a prompts file that is not there: one line each,
    before any model loads."""
    for flags, message in [
        (("--batch_size=0", "--prompt=hi"), "error: --batch_size must be a positive number of "
                                            "prompts, got 0"),
        ((f"--prompts_file={tmp_path / 'nope.txt'}",),
         f"error: --prompts_file {tmp_path / 'nope.txt'}: No such file or directory"),
        (("--max_new_tokens=-3", "--prompt=hi"), "error: --max_new_tokens must be positive, "
                                                 "got -3"),
    ]:
        assert last_error_line(cli("jaxft.generate", f"--workdir={trained}", *flags)) == message
    assert last_error_line(cli("jaxft.evaluate", f"--workdir={trained}", "--max_batches=-1")) \
        == "error: --max_batches must be >= 0 (0: all), got -1"


def test_a_preference_row_without_rejected_names_the_missing_field(tmp_path):
    from jaxft.data import preference

    with pytest.raises(preference.BadPair, match=r"^rejected is missing \(a preference row "
                       r"needs prompt, chosen and rejected\)$"):
        preference.parse("How do I reset my password?", "Use the link.", None)
    with pytest.raises(preference.BadPair, match=r"^chosen is missing"):
        preference.parse(None, None, "No.")
