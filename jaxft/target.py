"""Which platform a program is being compiled for, asked while it is traced.

The dry run compiles the train step for a TPU slice on a CPU host, so `jax.default_backend()`
answers the wrong question for every choice that depends on the hardware (the attention kernel,
the cross-entropy chunk, whether splash runs natively or interpreted). `jaxft.train_step` traces
its steps under their mesh (`sharding.traced_under`), whose devices are the target's; outside
any mesh (generation on one device, a plain model call) the target is the default backend.
"""

from __future__ import annotations

import jax


def platform() -> str:
    """'tpu', 'gpu' or 'cpu': the ambient mesh's devices, else the default backend."""
    mesh = jax.sharding.get_abstract_mesh()
    if not mesh.empty:
        name = mesh.abstract_device.platform
        return "gpu" if name in ("cuda", "rocm") else name
    return jax.default_backend()
