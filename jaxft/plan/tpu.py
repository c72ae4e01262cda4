"""TPU slices by the names Cloud TPU sells them under, as compile-only devices on any machine.

libtpu (the `tpu` extra) carries XLA's TPU compiler, and the compiler needs no TPU: given a
topology, `jax.experimental.topologies` hands out devices that `jit` can lower and compile for
(never run on). Compiling the real train step over a `Mesh` of them gives XLA:TPU's own
`memory_analysis()`, and its own out-of-memory refusal, on a laptop. This module names the
slices (`v5e-8`, `v4-8`, `v5p-8`, `v6e-8`, the other standard sizes, or a raw `v5e:2x4`), makes
their devices, and knows each chip's peak bf16 rate for the planner's time bound.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.metadata
import importlib.util
import math
import os
import re
import tempfile
from collections.abc import Iterator

from jaxft.errors import JaxftError, first_line

GIB = 1024**3


@dataclasses.dataclass(frozen=True)
class Chip:
    """One TPU generation as a JAX device (a chip; on v4 and v5p a megacore of its two cores).

    `peak_tflops` is the dense bf16 peak Google publishes per chip (v4 275, v5e 197, v5p 459,
    v6e 918); `hbm_gib` its physical HBM, of which XLA keeps a little for itself (the usable
    figure comes from the compiler, `usable_hbm`). `cores_in_name`: v4-8 and v5p-8 count
    TensorCores (8 cores = 4 chips), v5e-8 and v6e-8 count chips.
    """

    name: str
    hbm_gib: float
    peak_tflops: float
    cores_in_name: bool
    shapes: dict[int, str]  # chips -> topology, the standard slice sizes


_2D = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16", 256: "16x16"}
_3D = {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8",
       256: "4x8x8", 512: "8x8x8"}
CHIPS: dict[str, Chip] = {
    "v4": Chip("v4", 32, 275, True, _3D),
    "v5e": Chip("v5e", 16, 197, False, _2D),
    "v5p": Chip("v5p", 95, 459, True, _3D),
    "v6e": Chip("v6e", 32, 918, False, _2D),
}
# Single-host slices have every chip on one host; bigger ones have hosts of four chips (which
# only changes which process owns which device, not what compiles).
SINGLE_HOST_CHIPS = 8


@dataclasses.dataclass(frozen=True)
class Topology:
    """A TPU slice: its name, its chip, and its compile-only devices."""

    name: str  # as the user wrote it: "v5e-8" or "v5e:2x4"
    chip: Chip
    shape: str  # "2x4"
    devices: tuple
    compiler: str = "XLA:TPU"
    device_word: str = "chip"
    memory_word: str = "HBM"

    @property
    def num_devices(self) -> int:
        return len(self.devices)

    @property
    def peak_tflops(self) -> float:
        """Dense bf16 TFLOP/s of one chip."""
        return self.chip.peak_tflops

    @property
    def peak_flops(self) -> float:
        """bf16 FLOP/s of the whole slice."""
        return self.chip.peak_tflops * 1e12 * self.num_devices

    def describe(self) -> str:
        return f"{self.name} ({self.num_devices} × TPU {self.chip.name}, {self.shape})"

    def usable_bytes(self) -> int:
        """HBM one chip lets a program use (`usable_hbm`)."""
        return usable_hbm(self)

    def capacity_note(self) -> str:
        return "what XLA:TPU says a program may use"

    @staticmethod
    def refusal(error: BaseException) -> str | None:
        """XLA:TPU's out-of-memory refusal, which is a result (`out_of_memory`)."""
        return out_of_memory(error)

    @staticmethod
    def compile(lowered) -> tuple[object, list[str]]:
        """(compiled, warnings): XLA:TPU refuses what does not fit rather than warn."""
        return lowered.compile(), []


def known_names() -> list[str]:
    """Every standard slice name, smallest first per generation."""
    return [f"{chip.name}-{chips * (2 if chip.cores_in_name else 1)}"
            for chip in CHIPS.values() for chips in chip.shapes]


def parse(name: str) -> tuple[Chip, str]:
    """(chip, topology) of `v5e-8` or `v5e:2x4`; anything else is refused with the known names."""
    text = name.strip().lower()
    raw = re.fullmatch(r"(v\d+[a-z]*):(\d+(?:x\d+){1,2})", text)
    sized = re.fullmatch(r"(v\d+[a-z]*)-(\d+)", text)
    chip = CHIPS.get((raw or sized).group(1)) if (raw or sized) else None
    if chip is not None and raw:
        return chip, raw.group(2)
    if chip is not None and sized:
        count = int(sized.group(2))
        chips = count // 2 if chip.cores_in_name and count % 2 == 0 else count
        if (not chip.cores_in_name or count % 2 == 0) and chips in chip.shapes:
            return chip, chip.shapes[chips]
    raise JaxftError(f"--topology: {name!r} is not a TPU slice jaxft knows; known: "
                     f"{', '.join(known_names())}, or a raw '<chip>:<topology>' such as "
                     f"'v5e:2x4' (chips {', '.join(CHIPS)})")


def looks_like_tpu(name: str) -> bool:
    """Whether a `--topology` is meant as a TPU slice (`v5e-8`, `v4:2x2x2`)."""
    return re.match(r"v\d+[a-z]*[-:]", name.strip().lower()) is not None


def install_command() -> str:
    """The one command that brings the libtpu matching the installed jax."""
    return f'pip install "jax[tpu]=={importlib.metadata.version("jax")}"'


def topology(name: str) -> Topology:
    """The compile-only devices of a slice; no TPU needed, libtpu is."""
    chip, shape = parse(name)
    if importlib.util.find_spec("libtpu") is None:
        raise JaxftError(f"--topology {name} compiles with XLA's TPU compiler, which comes with "
                         f"libtpu; install it with: {install_command()}")
    from jax.experimental import topologies

    dims = [int(d) for d in shape.split("x")]
    options: dict = {}
    if chip.name == "v4":
        options["chip_config_name"] = "megacore"  # as Cloud TPU runs v4: one device per chip
    if math.prod(dims) <= SINGLE_HOST_CHIPS:
        options["chips_per_host_bounds"] = tuple(dims + [1] * (3 - len(dims)))
    # libtpu takes a machine-wide lock file when it loads, and another process that makes a
    # topology meanwhile fails. Compile-only devices never touch a TPU, so several may load it.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    try:
        with _quiet_stderr():  # libtpu warns at length that this machine is not a TPU VM
            devices = topologies.get_topology_desc(
                platform="tpu", topology_name=f"{chip.name}:{shape}", **options).devices
    except Exception as e:  # noqa: BLE001  (libtpu reports every refusal as a runtime error)
        raise JaxftError(f"--topology {name}: libtpu cannot make {chip.name}:{shape} "
                         f"({first_line(e)})") from None
    return Topology(name, chip, shape, tuple(devices))


_AVAILABLE = re.compile(r"available HBM \(([\d.]+)([KMGT]?)\)")
_UNITS = {"": 1, "K": 1024, "M": 1024**2, "G": GIB, "T": 1024**4}


_USABLE: dict[str, int] = {}


def usable_hbm(topo: Topology) -> int:
    """Bytes of HBM one device lets a program use, as XLA:TPU itself states it.

    A program that cannot fit is compiled for one device; the compiler's refusal names the
    available HBM (15.75 GiB of v5e's 16). Falls back to the chip's physical figure.
    """
    if topo.chip.name not in _USABLE:
        _USABLE[topo.chip.name] = _ask_compiler_for_hbm(topo)
    return _USABLE[topo.chip.name]


def _ask_compiler_for_hbm(topo: Topology) -> int:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    mesh = Mesh(np.asarray(topo.devices[:1]), ("one",))
    too_big = jax.jit(lambda: jnp.zeros((1 << 50,), jnp.int8),
                      out_shardings=NamedSharding(mesh, PartitionSpec()))
    try:
        too_big.lower().compile()
    except Exception as e:  # noqa: BLE001
        found = _AVAILABLE.search(str(e))
        if found:
            return int(float(found.group(1)) * _UNITS[found.group(2)])
    return int(topo.chip.hbm_gib * GIB)


def out_of_memory(e: BaseException) -> str | None:
    """XLA's own words when a compile ran out of HBM (its first line), else None."""
    text = str(e)
    if "RESOURCE_EXHAUSTED" not in text and "Ran out of memory" not in text:
        return None
    for line in text.splitlines():
        if "memory" in line.lower():
            return line.strip()
    return text.splitlines()[0].strip()


def required_bytes(message: str) -> tuple[int, bool] | None:
    """What an out-of-memory message says the program needs, in bytes, and whether that is the
    whole program (True) or only its temporaries (False); XLA:TPU words it either way:
    "the total memory required for HLO temporaries (51.83G) exceeds available HBM (15.75G)",
    or "Used 15.76G of 15.75G hbm"."""
    temporaries = re.search(r"required for [^(]*temporaries \(([\d.]+)([KMGT]?)\)", message)
    total = re.search(r"Used ([\d.]+)([KMGT]?) of [\d.]+[KMGT]? hbm", message)
    found = total or temporaries
    if not found:
        return None
    return int(float(found.group(1)) * _UNITS[found.group(2)]), found is total


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """Hold back what native code writes to stderr meanwhile (libtpu's TPU-VM warnings)."""
    saved = os.dup(2)
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
