"""Comparing a jaxft model's LoRA gradients with PEFT's, factor by factor, by PEFT's names."""

from __future__ import annotations

import numpy as np

from jaxft import lora


def assert_lora_grads_equal(grads, want: dict[str, np.ndarray], *, rtol: float = 1e-4,
                            atol: float = 0.0, atol_of_largest: float = 0.0) -> int:
    """Each A and B gradient of `grads` (a model holding gradients in its adapters) equals
    PEFT's (`want`: `named_parameters` name -> gradient) within `rtol`, and an absolute `atol`
    or `atol_of_largest` × the tensor's largest entry (entries near cancellation differ by
    float32's rounding of the sums). Returns how many factors were compared."""
    compared = 0
    for path, linear in lora.linear_modules(grads):
        if linear.adapter is None:
            continue
        a, b = np.asarray(linear.adapter.lora_a[...]), np.asarray(linear.adapter.lora_b[...])
        for layer, hf_path in enumerate(lora.hf_paths(grads, path)):
            prefix = f"base_model.model.{hf_path}"
            for got, factor in ((a[layer].T, "A"), (b[layer].T, "B")):
                expected = want[f"{prefix}.lora_{factor}.default.weight"]
                np.testing.assert_allclose(
                    got, expected, rtol=rtol,
                    atol=max(atol, atol_of_largest * np.abs(expected).max()),
                    err_msg=f"{prefix} {factor}")
                compared += 1
    return compared
