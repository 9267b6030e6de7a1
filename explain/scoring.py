"""Detection and fuzzing scores of an explanation, as EleutherAI's delphi defines them, as balanced accuracy.

- Detection: the held-out activating excerpts (across the unit's quantiles) and as many non-activating ones,
  shuffled, in batches; the scorer says of each whether it holds what the explanation describes.
- Fuzzing: each held-out activating excerpt twice, once with the tokens where the unit activates marked and once
  with as many tokens where it does not marked instead; the scorer says of each whether the marked tokens are
  what the explanation describes.

Balanced accuracy is the mean of the share of positives called positive and the share of negatives called
negative: 1.0 is perfect and 0.5 is chance, whatever the mix. An answer the reader cannot parse counts as "no"
for each excerpt of its batch (so a scorer that never answers scores 0.5), and is counted.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from featureatlas.explain.client import ChatModel
from featureatlas.explain.examples import UnitExamples
from featureatlas.explain.prompts import parse_predictions, render, score_messages

KINDS = ("detection", "fuzzing")


@dataclass(frozen=True)
class Trial:
    """One excerpt as the scorer sees it, and the right answer."""

    line: str
    truth: bool


@dataclass(frozen=True)
class Score:
    """A score of one kind: None when a class had no excerpts (nothing to balance)."""

    kind: str
    balanced_accuracy: float | None
    positives: int
    negatives: int
    unread: int  # excerpts whose batch's answer could not be read


def trials(kind: str, examples: UnitExamples, rng: np.random.Generator) -> list[Trial]:
    """The excerpts a score is computed on, as the module says, in shuffled order."""
    found: list[Trial] = []
    if kind == "detection":
        found += [Trial(render(e), True) for e in examples.activating]
        found += [Trial(render(e), False) for e in examples.non_activating]
    else:
        for excerpt in examples.activating:
            firing = excerpt.firing(examples.threshold)
            quiet = np.setdiff1d(np.arange(len(excerpt.tokens)), firing)
            found.append(Trial(render(excerpt, firing), True))
            if len(quiet):
                found.append(Trial(render(excerpt, rng.choice(quiet, min(len(firing), len(quiet)), replace=False)),
                                   False))
    return [found[i] for i in rng.permutation(len(found))]


def balanced_accuracy(truth: Sequence[bool], predicted: Sequence[bool]) -> float | None:
    """Mean of the true-positive and true-negative rates; None without both classes."""
    truth_a, predicted_a = np.asarray(truth, bool), np.asarray(predicted, bool)
    positives, negatives = truth_a.sum(), (~truth_a).sum()
    if positives == 0 or negatives == 0:
        return None
    return float(((truth_a & predicted_a).sum() / positives + (~truth_a & ~predicted_a).sum() / negatives) / 2)


def score(model: ChatModel, kind: str, explanation: str, found: Sequence[Trial], batch: int) -> Score:
    """Ask `model` about `found` in batches of `batch`, and score its answers."""
    predicted: list[bool] = []
    unread = 0
    for start in range(0, len(found), batch):
        chunk = found[start:start + batch]
        answer = model.complete(score_messages(kind, explanation, [t.line for t in chunk]),
                                max_tokens=16 + 4 * len(chunk))
        parsed = parse_predictions(answer, len(chunk))
        if parsed is None:
            unread += len(chunk)
            parsed = [False] * len(chunk)
        predicted += parsed
    truth = [t.truth for t in found]
    return Score(kind, balanced_accuracy(truth, predicted), sum(truth), len(truth) - sum(truth), unread)
