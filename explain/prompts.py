"""The prompts that ask for an explanation and for the two scores, and the readers of their answers.

The tasks are delphi's (EleutherAI): the explainer sees excerpts with the activating tokens wrapped in << >> and
ends with an `[EXPLANATION]:` line; detection asks, for each excerpt of a batch, whether the text holds what the
explanation describes; fuzzing asks whether the marked tokens are the ones it describes; both answer a list of 0/1,
one per excerpt. The wording is ours. Answers are untrusted: what cannot be read is None, never an exception.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from featureatlas.explain.client import Message
from featureatlas.explain.examples import Excerpt

MAX_EXPLANATION = 500  # characters kept of an explanation: delphi's are a phrase
OPEN, CLOSE = "<<", ">>"

EXPLAIN_SYSTEM = """\
You are a careful interpretability researcher studying one unit of a language model (a neuron or a learned \
feature). You will see excerpts of text on which the unit activates strongly. In each excerpt, the tokens on \
which it activates are wrapped in << and >>; \\n stands for a line break.

Find what the marked tokens have in common, taking into account the words just before them: which tokens, words, \
topics or grammatical roles. Be concrete and brief. Do not repeat the excerpts or mention the markers.

Finish with one line of this form:
[EXPLANATION]: <a short phrase saying what the unit responds to>"""

DETECTION_SYSTEM = """\
You are checking an explanation of one unit of a language model (a neuron or a learned feature) against text. \
You will get the explanation and numbered excerpts; \\n stands for a line break. The unit activates on some of \
the excerpts and not on the others.

For each excerpt, in order, answer 1 if it contains what the explanation describes (so the unit would activate \
on it) and 0 if it does not. Reply with the list of digits only, e.g. [1, 0, 0, 1, 0]."""

FUZZING_SYSTEM = """\
You are checking an explanation of one unit of a language model (a neuron or a learned feature) against text. \
You will get the explanation and numbered excerpts in which some tokens are wrapped in << and >>; \\n stands for \
a line break. In some excerpts the marked tokens are the ones on which the unit activates; in the others they \
were marked at random.

For each excerpt, in order, answer 1 if the marked tokens are what the explanation describes and 0 if they are \
not. Reply with the list of digits only, e.g. [1, 0, 0, 1, 0]."""


def render(excerpt: Excerpt, marked: Sequence[int] = ()) -> str:
    """An excerpt as one line, each run of marked positions wrapped in << >>."""
    chosen = set(int(p) for p in marked)
    parts = []
    for i, token in enumerate(excerpt.tokens):
        shown = token.replace("\r", "\\r").replace("\n", "\\n")
        if i in chosen and i - 1 not in chosen:
            shown = OPEN + shown
        if i in chosen and i + 1 not in chosen:
            shown += CLOSE
        parts.append(shown)
    return "".join(parts)


def explain_messages(excerpts: Sequence[Excerpt], threshold: float) -> list[Message]:
    """The explainer's prompt: the shown excerpts with their activating tokens marked."""
    lines = [f"Example {i}: {render(e, e.firing(threshold))}" for i, e in enumerate(excerpts, 1)]
    return [{"role": "system", "content": EXPLAIN_SYSTEM},
            {"role": "user", "content": "Excerpts:\n\n" + "\n".join(lines)}]


def score_messages(kind: str, explanation: str, lines: Sequence[str]) -> list[Message]:
    """A detection or fuzzing prompt for one batch of rendered excerpts."""
    numbered = "\n".join(f"Example {i}: {line}" for i, line in enumerate(lines, 1))
    return [{"role": "system", "content": DETECTION_SYSTEM if kind == "detection" else FUZZING_SYSTEM},
            {"role": "user", "content": f"Explanation: {explanation}\n\nExcerpts:\n{numbered}\n\n"
                                        f"Answer with a list of {len(lines)} digits."}]


_THINKING = re.compile(r"<think>.*?</think>", re.DOTALL | re.IGNORECASE)
_MARKER = re.compile(r"\[?\s*explanation\s*\]?\s*:", re.IGNORECASE)
_LIST = re.compile(r"\[([^\[\]]*)\]")
_WORDS = {"1": True, "0": False, "true": True, "false": False, "yes": True, "no": False}
_NUMBERED = re.compile(r"example\s*\d+\s*[:=-]\s*(1|0|true|false|yes|no)\b", re.IGNORECASE)
_DIGIT = re.compile(r"(?<![\w.])[01](?![\w.])")


def parse_explanation(answer: str) -> str | None:
    """The phrase after the last `[EXPLANATION]:`, else the answer's last line; None when nothing is left."""
    answer = _THINKING.sub("", answer)
    markers = list(_MARKER.finditer(answer))
    rest = answer[markers[-1].end():] if markers else answer
    lines = [line.strip() for line in rest.splitlines() if line.strip()]
    if not lines:
        return None
    text = (lines[0] if markers else lines[-1]).strip(" \t*_`\"'")
    text = " ".join(text.split())[:MAX_EXPLANATION]
    return text or None


def parse_predictions(answer: str, n: int) -> list[bool] | None:
    """n yes/no predictions: the first [..] list of n 0/1 (or true/false, yes/no), else n `Example i: 0/1` lines,
    else exactly n lone 0/1 digits; None when the answer holds none of these."""
    answer = _THINKING.sub("", answer)
    for match in _LIST.finditer(answer):
        items = [item.strip(" '\"").lower() for item in re.split(r"[,\s]+", match.group(1).strip()) if item.strip()]
        if len(items) == n and all(item in _WORDS for item in items):
            return [_WORDS[item] for item in items]
    numbered = _NUMBERED.findall(answer)
    if len(numbered) == n:
        return [_WORDS[v.lower()] for v in numbered]
    digits = _DIGIT.findall(answer)
    return [d == "1" for d in digits] if len(digits) == n else None
