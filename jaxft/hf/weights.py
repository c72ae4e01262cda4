"""Read and write Hugging Face checkpoints: `load_hf_model` and `save_pretrained`.

A checkpoint is a local directory, a hub id (found by `jaxft.hf.hub`), or a llama.cpp `.gguf` file.
Weights stream in one tensor at a time (safetensors, sharded safetensors, or a pickled `.bin`
only through `torch.load(weights_only=True)`), so peak host memory stays near one copy of the
model, and stream out a shard at a time. Remote code is never run. This is weight conversion
only: LoRA adapters live in `jaxft.hf.adapters`, and `jaxft.from_pretrained` composes the
two.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from jaxft import dtypes, models, outdir, progress, quant
from jaxft.dtypes import DTypeLike
from jaxft.errors import JaxftError, first_line
from jaxft.hf import hub, mxfp4
from jaxft.hf.model import ModelOptions, blueprint
from jaxft.models import params

SAFETENSORS_NAME = "model.safetensors"
SAFETENSORS_INDEX_NAME = "model.safetensors.index.json"
SAFETENSORS_PATTERN = "model{suffix}.safetensors"  # huggingface_hub's shard names
PYTORCH_NAME = "pytorch_model.bin"
PYTORCH_INDEX_NAME = "pytorch_model.bin.index.json"
# transformers 4's default shard size: a few GB bounds the host memory an export holds at once.
MAX_SHARD_SIZE = "5GB"
_SIZE_UNITS = {"": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}  # as transformers


def shard_size_bytes(size: int | str) -> int:
    """`max_shard_size` in bytes: an int, or '5GB', '500MB' (decimal units, as transformers)."""
    if isinstance(size, int) and size > 0:
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]B)?\s*", str(size), re.IGNORECASE)
    if not match or float(match.group(1)) <= 0:
        raise JaxftError(f"max_shard_size {size!r} is not a size (bytes, or e.g. '5GB', '500MB')")
    return int(float(match.group(1)) * _SIZE_UNITS[(match.group(2) or "").upper()])


def iter_tensors(path: Path) -> Iterator[tuple[str, np.ndarray]]:
    """Yield (Hugging Face name, numpy array) for every tensor in a checkpoint, one at a time."""
    if path.suffix == ".gguf":
        from jaxft.hf import gguf

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
    try:
        weight_map = json.loads(index_file.read_text()).get("weight_map", {})
    except (json.JSONDecodeError, AttributeError) as e:
        raise JaxftError(f"{index_file}: not a JSON object with a weight_map ({e})") from e
    return sorted(set(weight_map.values()))


def _iter_safetensors(file: Path) -> Iterator[tuple[str, np.ndarray]]:
    from safetensors import SafetensorError, safe_open

    if not file.is_file():
        raise JaxftError(f"{file}: shard listed in the index is missing")
    try:
        with safe_open(file, framework="np") as f:  # bfloat16 arrives as an ml_dtypes array
            for name in f.keys():
                yield name, f.get_tensor(name)
    except SafetensorError as e:  # truncated or overwritten: the header does not fit the file
        raise JaxftError(f"{file}: not a readable safetensors file, truncated or damaged "
                         f"({first_line(e)})") from e


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


def load_hf_model(path_or_id: str | os.PathLike, options: ModelOptions | None = None, *,
                  mesh: Mesh | None = None) -> nnx.Module:
    """Load a Hugging Face checkpoint (directory, hub id or .gguf file) as a jaxft model,
    built with `options` (`jaxft.hf.model`), in eval mode (no dropout), as transformers'
    `from_pretrained` returns it; `model.train()` turns dropout on. Adapters are
    `jaxft.from_pretrained`'s business.

    With a `mesh`, each tensor goes straight onto its sharding as it is read, so no device ever
    holds the whole model. With a quantized base (`options.quantize`: NF4 or int8, all but the
    output head) each tensor is quantized on the host as it is read, so no device ever holds
    the model in its float dtype. A parameter the checkpoint lacks that the model may add (a
    new classifier head) is initialised as the family's `__init__` does, and nothing else.
    With `options.random_init` nothing but the config is read: every weight is initialised
    (training from scratch), on its sharding when there is a mesh.
    """
    options = options or ModelOptions()
    path = hub.resolve(path_or_id, weights=not options.random_init)
    hf_config = hub.read_config(path)
    plan = blueprint(hf_config, hub.config_source(path), options)
    if options.random_init:
        model = plan.initialised(mesh)
        model.eval()
        return model
    cfg = plan.config
    # Weights come from the checkpoint; dropout keys (rewritten every training step) start at 0.
    graphdef, abstract_state, abstract_keys = nnx.split(
        plan.abstract(), nnx.Any(nnx.Param, quant.Quantized), ...)
    keys = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), abstract_keys)
    place = None if mesh is None else _placer(mesh)
    what = "loading weights" + (f" (quantizing to {options.quantize.kind})"
                                if options.quantized else "")
    tensors = iter_tensors(path)
    if hf_config.get("model_type") == "gpt_oss":  # its released experts are MXFP4
        tensors = mxfp4.dequantized(tensors, str(path))
    state, missing = params.load_state(
        abstract_state,
        models.tensor_table(cfg),
        _with_progress(tensors, what, _expected_tensors(abstract_state, cfg)),
        source=str(path),
        tied=cfg.tie_word_embeddings,
        num_layers=cfg.num_hidden_layers,
        may_be_missing=cfg.may_be_missing,
        place=place,
        encoders=plan.encoders,
    )
    if missing:
        fresh = jax.jit(plan.initialiser(missing))()
        place = place or (lambda var, array: jnp.asarray(array))
        state = nnx.from_flat_state([
            (p, v.replace(value=place(v, fresh[key])) if (key := ".".join(map(str, p))) in fresh
             else v) for p, v in nnx.to_flat_state(state)])
    model = nnx.merge(graphdef, state, keys)
    model.eval()
    return model


def _expected_tensors(abstract_state: nnx.State, cfg: models.ModelConfig) -> int | None:
    """How many checkpoint tensors loading will read (for the bar's estimate), if countable."""
    try:
        return len(params.export_plan(abstract_state, models.tensor_table(cfg),
                                      num_layers=cfg.num_hidden_layers,
                                      with_base_prefix=cfg.has_base_prefix)) or None
    except (AttributeError, KeyError, TypeError, ValueError):  # e.g. packed quantized kernels
        return None


def _with_progress(tensors: Iterator[tuple[str, np.ndarray]], desc: str,
                   total: int | None) -> Iterator[tuple[str, np.ndarray]]:
    """The tensors, counted on a bar (tensors and bytes read) while they stream in."""
    read = 0
    with progress.bar(total, desc=desc, unit="tensor") as bar:
        for name, array in tensors:
            yield name, array
            read += array.nbytes
            bar.set_postfix_str(f"{read / 1e9:.2f} GB", refresh=False)
            bar.update(1)


def _placer(mesh: Mesh) -> Callable[[nnx.Variable, np.ndarray], jax.Array]:
    from jaxft import sharding

    def place(var: nnx.Variable, array: np.ndarray) -> jax.Array:
        return sharding.put(array, sharding.variable_sharding(var, mesh))

    return place


def save_pretrained(
    model: nnx.Module,
    out_dir: str | os.PathLike,
    *,
    dtype: DTypeLike = "float32",
    overwrite: bool = False,
    max_shard_size: int | str = MAX_SHARD_SIZE,
    label_map: Mapping[str, int] | None = None,
) -> Path:
    """Write `config.json` + safetensors with Hugging Face names, as transformers does.

    The directory loads with `transformers.AutoModelFor*.from_pretrained`. Tensors are gathered
    to the host one at a time (one layer of a stacked array at a time, from every process of a
    multi-host mesh) and written a shard at a time: `model.safetensors` when everything fits in
    `max_shard_size` (bytes, or a string such as "5GB"), else `model-0000k-of-0000n.safetensors`
    plus `model.safetensors.index.json`, huggingface_hub's names and index. Host memory stays
    near one shard. Adapters are not written here (see `jaxft.export`): this is the plain
    weight table read backwards. A classifier's `label_map` ({name: id}, the one it trained
    with) names its classes in `config.json` (`label_fields`). Only process 0 writes; every
    process must call it.
    """
    from huggingface_hub import split_state_dict_into_shards_factory

    name = dtypes.canonical(dtype, "dtype")
    labels = {} if label_map is None else label_fields(label_map, model.config.num_labels)
    shard_bytes = shard_size_bytes(max_shard_size)
    out = outdir.prepare(out_dir, overwrite=overwrite)
    pending = {t.name: t for t in params.export_plan(
        nnx.state(model, nnx.Param), models.tensor_table(model.config),
        num_layers=model.config.num_hidden_layers,
        with_base_prefix=model.config.has_base_prefix)}
    split = split_state_dict_into_shards_factory(
        pending, get_storage_size=lambda t: t.nbytes(name), filename_pattern=SAFETENSORS_PATTERN,
        max_shard_size=shard_bytes)
    writing = jax.process_index() == 0
    with progress.bar(sum(t.nbytes(name) for t in pending.values()), desc="exporting",
                      bytes_=True) as bar:
        for filename, names in split.filename_to_tensors.items():
            shard = {}
            for n in names:
                shard[n] = _to_dtype(pending[n].fetch(), name)
                bar.update(shard[n].nbytes)
            if writing:
                write_safetensors(shard, out / filename)
            del shard
    if writing:
        if split.is_sharded:
            index = {"metadata": split.metadata, "weight_map": split.tensor_to_filename}
            (out / SAFETENSORS_INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
        hf_config = {**model.config.to_hf(), **labels}
        hf_config["torch_dtype"] = name
        hf_config.pop("dtype", None)
        hf_config.pop("quantization_config", None)  # what was quantized is written in `dtype`
        (out / hub.CONFIG_NAME).write_text(json.dumps(hf_config, indent=2, sort_keys=True) + "\n")
    return out


def label_fields(label_map: Mapping[str, int], num_labels: int | None) -> dict[str, dict]:
    """`config.json`'s `id2label` and `label2id` for a classifier trained with `label_map`
    ({name: id}), as transformers writes them (string ids in id2label, int ids in label2id): what
    makes a `pipeline` answer "billing" rather than "LABEL_1". An id no name claims keeps
    transformers' default name."""
    if not num_labels:
        raise JaxftError("label names apply to a sequence classifier; this model has no "
                         "classification head")
    names = {i: f"LABEL_{i}" for i in range(num_labels)}
    for label, i in label_map.items():
        if not 0 <= i < num_labels:
            raise JaxftError(f"label {label!r} has id {i}, outside the classifier's "
                             f"{num_labels} classes (ids 0 to {num_labels - 1})")
        names[i] = label
    return {"id2label": {str(i): label for i, label in names.items()},
            "label2id": {label: i for i, label in names.items()}}


def write_safetensors(tensors: dict[str, np.ndarray], file: Path) -> None:
    """One safetensors file, tagged for PyTorch as transformers' own are."""
    from safetensors.numpy import save_file

    save_file(tensors, str(file), metadata={"format": "pt"})
    outdir.readable_by_all(file)


def _to_dtype(value: np.ndarray, dtype: str) -> np.ndarray:
    if not np.issubdtype(value.dtype, np.floating) and value.dtype != ml_dtypes.bfloat16:
        return np.ascontiguousarray(value)
    return np.ascontiguousarray(value.astype(dtypes.numpy_type(dtype)))


def copy_tokenizer(source: str | os.PathLike, out_dir: str | os.PathLike) -> None:
    """Write the checkpoint's tokenizer (and chat template) next to exported weights."""
    from jaxft.hf.tokenizer import load_tokenizer

    if jax.process_index() == 0:
        load_tokenizer(str(hub.resolve(source))).save_pretrained(str(out_dir))
