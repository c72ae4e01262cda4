r"""Hand a training run back to PyTorch: a PEFT adapter, a merged model, or a full model.

  python -m jaxft.export --workdir=runs/lora --out=exported/lora            # PEFT adapter
  python -m jaxft.export --workdir=runs/lora --out=exported/merged --merged # one HF model
  python -m jaxft.export --workdir=runs/lora --out=model.gguf --gguf         # llama.cpp, Ollama

A LoRA run becomes a PEFT adapter directory (`PeftModel.from_pretrained(base, out)`), or with
`--merged` a plain Hugging Face model with W + scale·B·A folded into each kernel. A full
fine-tune always becomes a plain model. The tokenizer (and its chat template) is copied alongside.
A classifier's model names its classes as the run's `label_map.json` does (`id2label`,
`label2id`), so a transformers pipeline answers with the run's label names; a PEFT adapter has
no place for them (its config names only the base), so the printed load line passes them to the
base model.
With `--gguf`, a Llama-family run becomes one merged `.gguf` file (`jaxft.hf.gguf_write`).
The run is rebuilt from the workdir alone: `config.json` names the base model and the LoRA
setup, and the checkpoint (the newest, or `--step`) holds what trained.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

from absl import app, flags
from flax import nnx

from jaxft import cli, dtypes, lora, outdir
from jaxft.dtypes import DTypeLike
from jaxft.errors import JaxftError
from jaxft.hf import adapters, gguf_write, hub, weights
from jaxft.workdir import load_run, read_label_map, read_run_config


def export_model(
    model: nnx.Module,
    lora_cfg: lora.LoraConfig | None,
    out: str | os.PathLike,
    *,
    base: str | None = None,
    base_name: str | None = None,
    merged: bool = False,
    dtype: DTypeLike = "float32",
    overwrite: bool = False,
    max_shard_size: int | str = weights.MAX_SHARD_SIZE,
    label_map: Mapping[str, int] | None = None,
    tokenizer: str | None = None,
) -> Path:
    """Write a model as a PEFT adapter (it has adapters and not `merged`) or a full HF model.

    `base` is the base checkpoint, whose tokenizer is copied (or `tokenizer`'s, when the run
    named one); an adapter names `base_name` (default: `base`) as its base model. Merging
    changes the model in place. A full model is written in safetensors shards of at most
    `max_shard_size`, gathered a tensor at a time, and a classifier's names its classes by
    `label_map` (an adapter has no field for them).
    Overwriting removes a previous export of either kind first.
    """
    dtypes.canonical(dtype, "dtype")
    out = outdir.prepare(out, overwrite=overwrite)
    if lora.has_adapters(model) and not merged:
        if lora_cfg is None:
            raise JaxftError("exporting an adapter needs the LoraConfig it was built with")
        adapters.save_peft_adapter(model, lora_cfg, out, base_name=base_name or base,
                                   dtype=dtype, overwrite=True)
    else:
        lora.merge_lora(model)
        weights.save_pretrained(model, out, dtype=dtype, overwrite=True,
                                max_shard_size=max_shard_size, label_map=label_map)
    if tokenizer or base is not None:
        weights.copy_tokenizer(tokenizer or base, out)
    return out


def export_workdir(
    workdir: str | os.PathLike,
    out: str | os.PathLike,
    *,
    step: int | str | None = None,
    merged: bool = False,
    dtype: DTypeLike = "float32",
    overwrite: bool = False,
    max_shard_size: int | str = weights.MAX_SHARD_SIZE,
) -> Path:
    """`python -m jaxft.export` as a function: export a run's checkpoint to `out`.

    The output directory is checked (writable, empty or `overwrite`) before minutes of loading,
    not after; nothing in it changes until the model is loaded.
    """
    dtypes.canonical(dtype, "dtype")
    weights.shard_size_bytes(max_shard_size)
    outdir.check_output(out, overwrite=overwrite)
    run = load_run(workdir, step)
    return export_model(run.model, run.lora, out, base=run.base, base_name=run.base_name,
                        merged=merged, dtype=dtype, overwrite=overwrite,
                        max_shard_size=max_shard_size, label_map=run.label_map,
                        tokenizer=run.tokenizer_path)


def export_gguf(
    workdir: str | os.PathLike,
    out: str | os.PathLike,
    *,
    step: int | str | None = None,
    gguf_type: str = "f16",
    overwrite: bool = False,
) -> Path:
    """`python -m jaxft.export --gguf` as a function: a run's merged model as one `.gguf` file.

    Everything that can refuse the export (the output path, the storage type, a family or rope
    scaling GGUF cannot express) is checked from the run's config before any weight is read.
    """
    gguf_write.check_output_file(out, overwrite=overwrite)
    gguf_write.check_gguf_type(gguf_type)
    cfg = read_run_config(Path(workdir))
    base = cfg.model.resolved_path
    hf_config = hub.read_config(hub.resolve(base))
    gguf_write.check_exportable(hf_config.get("model_type"), hf_config,
                                 str(Path(workdir) / "config.json"))
    run = load_run(workdir, step, dtype="float32")
    lora.merge_lora(run.model)
    return gguf_write.write_gguf(run.model, out, tokenizer_source=run.tokenizer_path,
                                  gguf_type=gguf_type, name=Path(workdir).name,
                                  overwrite=overwrite)


# ------------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------------

FLAGS = flags.FLAGS


def define_flags() -> None:
    """The command's flags, defined only when it runs: importing jaxft.export defines none."""
    flags.DEFINE_string("workdir", None, "The training run's workdir (config.json, checkpoints/).")
    flags.DEFINE_string("out", None, "Directory to write (with --gguf: the .gguf file).")
    flags.DEFINE_string("step", None, "Checkpoint to export: a step number, or 'best' (early "
                        "stopping's best eval); default: the newest.")
    flags.DEFINE_bool("merged", False, "Fold LoRA into the base weights: write a full model.")
    flags.DEFINE_bool("gguf", False, "Write one merged llama.cpp .gguf file to --out.")
    flags.DEFINE_enum("gguf_type", "f16", list(gguf_write.GGUF_TYPES),
                      "Storage type of the GGUF file's matrices (norms stay float32).")
    flags.DEFINE_enum("dtype", "float32", list(dtypes.NAMES), "dtype of the written tensors.")
    flags.DEFINE_bool("overwrite", False, "Replace an existing export in --out.")
    flags.DEFINE_string("max_shard_size", weights.MAX_SHARD_SIZE,
                        "Largest safetensors file of a full model ('5GB', '500MB').")


def main(argv: list[str]) -> None:
    cli.start(argv)
    if not FLAGS.workdir or not FLAGS.out:
        raise app.UsageError("--workdir and --out are required")
    with cli.user_errors():
        if FLAGS.gguf:
            out = export_gguf(FLAGS.workdir, FLAGS.out, step=FLAGS.step,
                              gguf_type=FLAGS.gguf_type, overwrite=FLAGS.overwrite)
            counts = gguf_write.describe_tensor_types(out)
            print(f"wrote a GGUF file to {out} ({out.stat().st_size / 1e6:.1f} MB; tensors: "
                  + ", ".join(f"{n} {k}" for k, n in sorted(counts.items()))
                  + f"); run it with llama.cpp: llama-cli -m {out}")
            return
        out = export_workdir(FLAGS.workdir, FLAGS.out, step=FLAGS.step, merged=FLAGS.merged,
                             dtype=FLAGS.dtype, overwrite=FLAGS.overwrite,
                             max_shard_size=FLAGS.max_shard_size)
    print(_describe(out, Path(FLAGS.workdir)))


def _describe(out: Path, workdir: Path) -> str:
    """What was written, and the PyTorch line that loads it."""
    if not (out / adapters.CONFIG_NAME).is_file():
        return f"wrote a Hugging Face model to {out}; load it with transformers' from_pretrained"
    config = json.loads((out / adapters.CONFIG_NAME).read_text())
    base = repr(config["base_model_name_or_path"])
    if base.endswith(".gguf'"):  # transformers dequantizes it; --merged avoids the question
        path = Path(config["base_model_name_or_path"])
        base = f"{str(path.parent)!r}, gguf_file={path.name!r}"
    if config["task_type"] == "SEQ_CLS":  # PyTorch must build the head the adapter fills
        base = f"AutoModelForSequenceClassification.from_pretrained({base}, {_head(workdir)})"
    elif config["task_type"] == "FEATURE_EXTRACTION":
        base = f"AutoModel.from_pretrained({base})"
    else:
        base = f"AutoModelForCausalLM.from_pretrained({base})"
    return (f"wrote a PEFT LoRA adapter to {out}; load it with "
            f"PeftModel.from_pretrained({base}, {str(out)!r})")


def _head(workdir: Path) -> str:
    """The from_pretrained arguments that build a classifier's head as the run had it: its
    size, and the run's label names where it saved them (the adapter cannot carry them)."""
    num_labels = json.loads((workdir / "config.json").read_text())["model"].get("num_labels")
    label_map = read_label_map(workdir)
    if not num_labels or label_map is None:
        return f"num_labels={num_labels}"
    fields = weights.label_fields(label_map, num_labels)
    id2label = {int(i): name for i, name in fields["id2label"].items()}
    return f"id2label={id2label!r}, label2id={fields['label2id']!r}"


if __name__ == "__main__":
    define_flags()
    app.run(main, flags_parser=cli.parse_flags)
