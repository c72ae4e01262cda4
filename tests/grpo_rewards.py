"""Reward functions the GRPO tests name by import path (`tests.grpo_rewards:<name>`), as users
name theirs."""

from __future__ import annotations

LOW_IDS = 64  # the tiny vocabulary's first tokens


def low_id_share(prompts, completions, completion_ids, **columns):
    """The share of a completion's tokens among the vocabulary's first LOW_IDS: a reward that
    varies within every group from the start and that a tiny random model learns in steps."""
    return [sum(t < LOW_IDS for t in ids) / max(len(ids), 1) for ids in completion_ids]


def wrong_length(prompts, completions, completion_ids, **columns):
    return [1.0] * (len(completions) - 1)


def raises(prompts, completions, completion_ids, **columns):
    raise KeyError("no such column")
