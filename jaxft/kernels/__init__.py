"""Custom-VJP kernels of the train step, each beside a test against JAX's own or autodiff's result.

- `attention`: softmax attention whose backward recomputes probabilities from each row's
  logsumexp, as flash attention does;
- `swiglu`: silu(gate) · up, keeping only gate and up for the backward;
- `cross_entropy`: the output head and the cross-entropy fused, a chunk of positions at a time,
  never holding the float32 [B, T, V] logits.
"""
