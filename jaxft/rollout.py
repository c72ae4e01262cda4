"""GRPO's rollouts: a step's prompts, answered by the policy as it is, scored, and laid out as
the train step's batch (`jaxft.grpo`).

Sampling runs `generate.decode` (prefill + a `while_loop` of one-token steps with a KV cache,
stopping when every row has emitted EOS) inside one jit over the train step's own
`trainable`, `frozen` and `dropout` arrays: the weights being trained are the weights that
sample, with no copy and nothing to synchronise. Shapes are static: prompts left-padded (and,
when longer, cut to their last tokens) to the prompt width P = data.max_len −
max_completion_length, completions C = max_completion_length, rows `rollout_batch_size` at a
time, so the sampler compiles once. The sampling key of step n is a pure function of the seed
and n, and the prompts of step n of the seed and the prompt order: a resumed run samples
exactly what an uninterrupted one does.

Completions are decoded on the host (special tokens skipped, as TRL decodes), passed to the
reward functions with the prompts and their data columns, and turned into advantages; the
metrics are TRL's (`reward`, `reward_std`, `rewards/<fn>/mean`, `frac_reward_zero_std`,
`completions/mean_length`, `completions/clipped_ratio`, …).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from jaxft import generate, grpo, rewards, sharding
from jaxft.data.prompts import Prompts

_SAMPLING_SALT = 0x6A5F  # sampling keys apart from the dropout keys of the same step


def make_sampler(graphdef: nnx.GraphDef, shardings: dict[str, Any], mesh: Mesh, *,
                 prompt_width: int, completion_len: int, greedy: bool = False,
                 filtered: bool = True):
    """The jitted sampler: `(trainable, frozen, dropout, ids [N, P], mask, eos_ids, pad_id,
    rng, temperature, top_k, top_p) -> tokens [N, C]`, over the train step's shardings (what
    the rollouts run, and what the dry run compiles to count the KV cache)."""

    def run(trainable, frozen, dropout, ids, mask, eos, pad, rng, temperature, top_k, top_p):
        model = nnx.merge(graphdef, trainable, frozen, dropout)
        return generate.decode(model, ids, mask, eos, pad, rng, temperature, top_k, top_p,
                               max_new_tokens=completion_len,
                               cache_length=prompt_width + completion_len, greedy=greedy,
                               filtered=filtered)

    return jax.jit(sharding.traced_under(mesh, run),
                   in_shardings=(shardings["trainable"], shardings["frozen"],
                                 shardings["dropout"], *([None] * 8)),
                   out_shardings=sharding.replicated(mesh))


def abstract_sampler_args(rows: int, prompt_width: int) -> tuple:
    """The sampler's arguments after the weights, as shapes (for the dry run)."""
    s = jax.ShapeDtypeStruct
    return (s((rows, prompt_width), jnp.int32), s((rows, prompt_width), jnp.int32),
            s((1,), jnp.int32), s((), jnp.int32), s((2,), jnp.uint32), s((), jnp.float32),
            s((), jnp.int32), s((), jnp.float32))


@dataclasses.dataclass
class Rollouts:
    """Rollouts of one run: its eval graphdef and shardings, tokenizer, GRPO settings, reward
    functions, widths and seed."""

    graphdef: nnx.GraphDef  # the model in eval mode
    shardings: dict[str, Any]
    mesh: Mesh
    tokenizer: Any
    cfg: grpo.GrpoConfig
    rewards: list[rewards.Reward]
    prompt_width: int
    rows_at_once: int
    seed: int
    eos_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        self.pad_id = (self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None
                       else self.eos_ids[0])
        self._samplers: dict[bool, Any] = {}
        self.weights = np.asarray([r.weight for r in self.rewards], np.float32)

    # -- sampling ------------------------------------------------------------------------------

    def _sampler(self, greedy: bool):
        if greedy not in self._samplers:
            self._samplers[greedy] = make_sampler(
                self.graphdef, self.shardings, self.mesh, prompt_width=self.prompt_width,
                completion_len=self.cfg.max_completion_length, greedy=greedy,
                filtered=self.cfg.filtered)
        return self._samplers[greedy]

    def encode(self, prompts: Sequence[Any]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Prompts (text, or conversations through the chat template) as left-padded ids and
        mask [N, P], and which were cut: a longer prompt keeps its last P tokens."""
        encoded = generate.encode_prompts(self.tokenizer, prompts, chat=False)
        ids = np.full((len(encoded), self.prompt_width), self.pad_id, np.int32)
        mask = np.zeros_like(ids)
        cut = np.asarray([len(tokens) > self.prompt_width for tokens in encoded])
        for row, tokens in enumerate(encoded):
            tokens = tokens[-self.prompt_width:]
            ids[row, self.prompt_width - len(tokens):] = tokens
            mask[row, self.prompt_width - len(tokens):] = 1
        return ids, mask, cut

    def sample(self, params: tuple, ids: np.ndarray, mask: np.ndarray, rng: jax.Array, *,
               greedy: bool = False) -> np.ndarray:
        """Completion tokens [N, C] for prompt rows, `rows_at_once` rows per call (a short last
        chunk is padded with copies of its first row, so every call has one shape)."""
        sampler, cfg = self._sampler(greedy), self.cfg
        out = []
        for k, start in enumerate(range(0, len(ids), self.rows_at_once)):
            chunk = slice(start, start + self.rows_at_once)
            part_ids, part_mask = ids[chunk], mask[chunk]
            short = self.rows_at_once - len(part_ids)
            if short:
                part_ids = np.concatenate([part_ids, np.repeat(part_ids[:1], short, 0)])
                part_mask = np.concatenate([part_mask, np.repeat(part_mask[:1], short, 0)])
            tokens = sampler(*params, part_ids, part_mask,
                             jnp.asarray(self.eos_ids, jnp.int32), jnp.int32(self.pad_id),
                             jax.random.fold_in(rng, k), jnp.float32(cfg.temperature),
                             jnp.int32(cfg.top_k), jnp.float32(cfg.top_p))
            # replicated: every process reads its own full copy, over one host or many
            out.append(np.asarray(tokens.addressable_data(0))[:len(ids[chunk])])
        return np.concatenate(out)

    def step_key(self, number: int) -> jax.Array:
        return jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(self.seed),
                                                     _SAMPLING_SALT), number)

    # -- completions, rewards, the batch -------------------------------------------------------

    def _completions(self, tokens: np.ndarray, prompts: list[Any]
                     ) -> tuple[np.ndarray, np.ndarray, list[list[int]], list[Any]]:
        """(completion mask [N, C] through the first EOS, truncated [N], each completion's ids,
        each completion as reward functions receive it)."""
        is_eos = np.isin(tokens, self.eos_ids)
        ends = np.where(is_eos.any(1), is_eos.argmax(1) + 1, tokens.shape[1])
        mask = (np.arange(tokens.shape[1])[None] < ends[:, None]).astype(np.int32)
        truncated = ~is_eos.any(1)
        ids = [row[:n].tolist() for row, n in zip(tokens, ends, strict=True)]
        texts = self.tokenizer.batch_decode(ids, skip_special_tokens=True)
        completions = [t if isinstance(p, str) else [{"role": "assistant", "content": t}]
                       for p, t in zip(prompts, texts, strict=True)]
        return mask, truncated, ids, completions

    def batch(self, params: tuple, prompts: list[Any], columns: dict[str, list], number: int
              ) -> tuple[dict[str, np.ndarray], dict[str, float], list[dict[str, Any]]]:
        """The train batch of step `number` from its prompts (each answered num_generations
        times), TRL's rollout metrics, and the step's (prompt, completion, reward) rows."""
        g = self.cfg.num_generations
        prompts = [p for p in prompts for _ in range(g)]
        columns = {k: [v for v in values for _ in range(g)] for k, values in columns.items()}
        ids, mask, cut = self.encode(prompts)
        tokens = self.sample(params, ids, mask, self.step_key(number))
        completion_mask, truncated, completion_ids, completions = self._completions(tokens,
                                                                                    prompts)
        per_func = rewards.score(self.rewards, prompts, completions, completion_ids, columns)
        advantage, stats = grpo.advantages(per_func, self.weights, g, self.cfg.scale_rewards)
        lengths = completion_mask.sum(1)
        if self.cfg.mask_truncated_completions:
            completion_mask = completion_mask * (~truncated)[:, None]
        segments = np.concatenate([mask, completion_mask], 1)
        batch = {"input_ids": np.concatenate([ids, tokens], 1).astype(np.int32),
                 "segment_ids": segments.astype(np.int32),
                 "positions": np.maximum(np.cumsum(segments, 1) - 1, 0).astype(np.int32),
                 "completion_mask": completion_mask.astype(np.int32),
                 "advantages": advantage}
        metrics = {**stats, **self._reward_metrics(per_func),
                   **completion_metrics(lengths, truncated),
                   "prompts/clipped_ratio": float(cut.mean())}  # prompts cut to their end
        texts = [rewards.completion_text(c) for c in completions]
        scored = np.nan_to_num(grpo.weighted_rewards(per_func, self.weights))  # unscored: 0
        shown = [{"prompt": rewards.completion_text(p) if not isinstance(p, str) else p,
                  "completion": t, "reward": float(r)}
                 for p, t, r in zip(prompts, texts, scored, strict=True)]
        return batch, metrics, shown

    def _reward_metrics(self, per_func: np.ndarray) -> dict[str, float]:
        out = {}
        with np.errstate(invalid="ignore"):
            for j, reward in enumerate(self.rewards):
                column = per_func[:, j]
                out[f"rewards/{reward.name}/mean"] = float(np.nanmean(column))
                out[f"rewards/{reward.name}/std"] = float(grpo.nanstd(column))
        return out

    def evaluate(self, params: tuple, held_out: Prompts, max_batches: int = 0
                 ) -> dict[str, float]:
        """Greedy completions of the held-out prompts (the first `max_batches` ×
        `rows_at_once` of them; 0: all), scored: the mean weighted reward (`reward`), each
        function's mean, and the completions' lengths."""
        per_func, lengths, truncated = [], [], []
        count = len(held_out) if not max_batches else min(len(held_out),
                                                          max_batches * self.rows_at_once)
        for start in range(0, count, self.rows_at_once):
            indices = range(start, min(start + self.rows_at_once, count))
            prompts, columns = held_out.take(indices)
            ids, mask, _ = self.encode(prompts)
            tokens = self.sample(params, ids, mask, self.step_key(0), greedy=True)
            completion_mask, cut, completion_ids, completions = self._completions(tokens,
                                                                                  prompts)
            per_func.append(rewards.score(self.rewards, prompts, completions, completion_ids,
                                          columns))
            lengths.append(completion_mask.sum(1))
            truncated.append(cut)
        scores = np.concatenate(per_func)
        with np.errstate(invalid="ignore"):
            total = grpo.weighted_rewards(scores, self.weights)
            out = {"reward": float(np.nanmean(total)),
                   **{f"rewards/{r.name}/mean": float(np.nanmean(scores[:, j]))
                      for j, r in enumerate(self.rewards)}}
        return {**out, **completion_metrics(np.concatenate(lengths), np.concatenate(truncated))}


def completion_metrics(lengths: np.ndarray, truncated: np.ndarray) -> dict[str, float]:
    """TRL's completion-length metrics: every completion's, and those that ended (EOS)."""
    ended = lengths[~truncated]
    out = {"completions/mean_length": float(lengths.mean()),
           "completions/min_length": float(lengths.min()),
           "completions/max_length": float(lengths.max()),
           "completions/clipped_ratio": float(truncated.mean())}
    if len(ended):
        out.update({"completions/mean_terminated_length": float(ended.mean()),
                    "completions/min_terminated_length": float(ended.min()),
                    "completions/max_terminated_length": float(ended.max())})
    return out
