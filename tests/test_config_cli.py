"""Config fields as users pass them: `--config.x=y` overrides parsed as absl parses the command
line, and JAX-native values (`jnp.bfloat16`) in config files."""

import peft
import pytest
from absl import flags
from flax import nnx
from ml_collections import config_flags

import jaxft
from jaxft import lora, spec
from tests import hf_models


def parse(config_file, *overrides: str):
    """The config `python -m jaxft.train --config=<file> <overrides>` would run."""
    argv = ["jaxft.train", f"--config={config_file}", *overrides]
    values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "", flag_values=values, lock_config=True,
                                    sys_argv=argv)  # (overrides are read from it, not sys.argv)
    values(argv)
    cfg = values.config
    return spec.resolve(cfg)


@pytest.fixture
def llama(tmp_path):
    hf = hf_models.build(hf_models.llama_config())
    hf.save_pretrained(tmp_path / "model")
    return hf, tmp_path / "model"


def write_config(path, model_dir, *lines: str):
    path.write_text(
        "import jax.numpy as jnp\n"
        "from jaxft.config import base_config\n"
        "def get_config():\n"
        "    c = base_config()\n"
        f"    c.model.path = {str(model_dir)!r}\n"
        "    c.data.train_path = 'chatterbot:chat'\n"
        "    c.lora.rank = 4\n" + "".join(f"    {line}\n" for line in lines) +
        "    return c\n")
    return path


@pytest.fixture
def config_file(tmp_path, llama):
    return write_config(tmp_path / "cfg.py", llama[1])


@pytest.mark.parametrize("flag, target_modules", [
    ("all-linear", "all-linear"),
    ("ALL-LINEAR", "all-linear"),
    ("q_proj,v_proj", ["q_proj", "v_proj"]),
    ("down_proj", ["down_proj"]),
    ('("k_proj", "o_proj")', ["k_proj", "o_proj"]),
    (r".*\.(q|v)_proj", r".*\.(q|v)_proj"),  # PEFT's single-regex form
])
def test_lora_targets_from_the_command_line_adapt_what_peft_adapts(flag, target_modules, llama,
                                                                  config_file):
    hf, model_dir = llama
    run = parse(config_file, f"--config.lora.targets={flag}")
    model = jaxft.from_pretrained(model_dir)
    lora.apply_lora(model, run.lora)
    ours = lora.count_parameters(nnx.state(model, nnx.LoRAParam))
    theirs, _ = peft.get_peft_model(hf, peft.LoraConfig(
        r=4, target_modules=target_modules)).get_nb_trainable_parameters()
    assert ours == theirs > 0


def test_string_or_list_fields_take_one_string(config_file):
    cfg = parse(config_file, "--config.train.sample_prompts=How do I reset my password, please?",
                "--config.lora.modules_to_save=lm_head")
    assert cfg.train.sample_prompts == ("How do I reset my password, please?",)
    assert cfg.lora.modules_to_save == ("lm_head",)
    cfg = parse(config_file, '--config.train.sample_prompts=("Hi", "Bye")')
    assert cfg.train.sample_prompts == ("Hi", "Bye")


def test_dtypes_in_config_files_and_flags(config_file, llama, tmp_path):
    jax_style = write_config(tmp_path / "jax_style.py", llama[1],
                             "c.train.param_dtype = jnp.bfloat16  # as a JAX user writes it")
    assert parse(jax_style).train.param_dtype == "bfloat16"  # recorded as its name
    cfg = parse(config_file, "--config.train.optimizer_state_dtype=bfloat16",
                "--config.train.compute_dtype=float32")
    assert (cfg.train.optimizer_state_dtype, cfg.train.compute_dtype) == ("bfloat16", "float32")
    with pytest.raises(jaxft.JaxftError, match=r"^config: train\.param_dtype is 'int8', "
                       r"expected one of float32, bfloat16, float16"):
        parse(config_file, "--config.train.param_dtype=int8")


def test_the_default_data_axis_takes_what_fsdp_or_tensor_leave():
    """`mesh.data=-1` (the default) is the devices the other axes leave: `--config.mesh.fsdp=-1`
    alone shards over every device, as the README's dry-run command writes it."""
    from jaxft import sharding

    # (data, fsdp, expert, tensor)
    assert sharding.mesh_shape(-1, -1, 1, 8) == (1, 8, 1, 1)
    assert sharding.mesh_shape(-1, 2, -1, 8) == (1, 2, 1, 4)
    assert sharding.mesh_shape(-1, 2, 2, 8) == (2, 2, 1, 2)
    assert sharding.mesh_shape(-1, 2, 1, 8, expert=-1) == (1, 2, 4, 1)
    with pytest.raises(jaxft.JaxftError, match=r"^mesh: at most one of mesh.fsdp/expert/tensor "
                       r"may be -1, got \[1, -1, 1, -1\]$"):
        sharding.mesh_shape(-1, -1, -1, 8)
