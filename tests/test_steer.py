"""Steering checked against hooks written here, independently of harvest/steer.py: the same logits, the same
continuations."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers

from featureatlas.errors import UsageError
from featureatlas.harvest.sources import dictionary_sources, mlp_sources, resid_sources
from featureatlas.harvest.steer import continue_text, steer, steering
from featureatlas.load.dictionaries import load_dictionaries

from helpers.tiny_models import HIDDEN, saelens_sae, save_tiny_model, tiny_tokenizer

pytestmark = pytest.mark.model

PROMPT = [1, 5, 9, 14, 3, 22, 7]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[transformers.PreTrainedModel, Path]:
    root = tmp_path_factory.mktemp("steer")
    model = transformers.AutoModelForCausalLM.from_pretrained(save_tiny_model("llama", root / "model")).eval()
    return model, saelens_sae(root / "sae", HIDDEN, "blocks.1.hook_resid_post")


def logits(model: transformers.PreTrainedModel) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([PROMPT])).logits[0]


def with_hook(model: transformers.PreTrainedModel, module: torch.nn.Module, hook, pre: bool = False) -> torch.Tensor:
    handle = module.register_forward_pre_hook(hook) if pre else module.register_forward_hook(hook)
    try:
        return logits(model)
    finally:
        handle.remove()


def test_a_neuron_pushed_is_its_activation_raised(tiny) -> None:
    model, _ = tiny
    (source,) = mlp_sources(model.base_model, "llama", [1])
    down = model.model.layers[1].mlp.down_proj

    def raise_neuron(module, args):  # noqa: ANN001 - the neuron's activation is down_proj's input
        x = args[0].clone()
        x[..., 6] += 2.5
        return (x,)
    expected = with_hook(model, down, raise_neuron, pre=True)
    with steering(model, source, 6, 2.5):
        got = logits(model)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got, logits(model))  # it changed something, and nothing is left hooked after


def test_a_residual_dimension_pushed_is_its_basis_vector_added(tiny) -> None:
    model, _ = tiny
    (source,) = resid_sources(model.base_model, "llama", [2], HIDDEN)

    def add(module, args, out):  # noqa: ANN001
        hidden = (out[0] if isinstance(out, tuple) else out).clone()
        hidden[..., 11] -= 4.0
        return (hidden, *out[1:]) if isinstance(out, tuple) else hidden
    expected = with_hook(model, model.model.layers[2], add)
    with steering(model, source, 11, -4.0):
        got = logits(model)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_a_feature_is_pushed_along_its_decoder_row_and_clamped_by_its_own_encoder(tiny) -> None:
    model, sae = tiny
    (source,) = dictionary_sources([("res1", d) for d in load_dictionaries(sae)], model.base_model, "llama",
                                   torch.device("cpu"))
    w_dec = source.dictionary.decoder
    w_enc, b_enc, b_dec = (source.dictionary.tensors[k] for k in ("W_enc", "b_enc", "b_dec"))

    def pushed(module, args, out):  # noqa: ANN001
        return (out[0] + 3.0 * w_dec[5], *out[1:]) if isinstance(out, tuple) else out + 3.0 * w_dec[5]
    expected = with_hook(model, model.model.layers[1], pushed)
    with steering(model, source, 5, 3.0):
        torch.testing.assert_close(logits(model), expected, rtol=1e-5, atol=1e-5)

    def clamped(module, args, out):  # noqa: ANN001 - a top-4 SAE by hand: encode, set feature 5 to 7, decode
        x = out[0] if isinstance(out, tuple) else out
        pre = torch.relu((x - b_dec) @ w_enc + b_enc)
        acts = torch.zeros_like(pre).scatter(-1, pre.topk(4, dim=-1).indices, pre.topk(4, dim=-1).values)
        edited = acts.clone()
        edited[..., 5] = 7.0
        y = x + (edited @ w_dec + b_dec) - (acts @ w_dec + b_dec)  # the reconstruction error is kept
        return (y, *out[1:]) if isinstance(out, tuple) else y
    expected = with_hook(model, model.model.layers[1], clamped)
    with steering(model, source, 5, 7.0, mode="clamp"):
        torch.testing.assert_close(logits(model), expected, rtol=1e-4, atol=1e-4)


def test_continuations_unsteered_and_steered(tiny) -> None:
    model, _ = tiny
    tokenizer = tiny_tokenizer()
    (source,) = resid_sources(model.base_model, "llama", [2], HIDDEN)
    zero = steer(model, tokenizer, source, 0, PROMPT, "p", 0.0, max_new_tokens=8)
    assert zero.steered == zero.unsteered and zero.unsteered  # no push, no change; greedy is deterministic
    big = steer(model, tokenizer, source, 0, PROMPT, "p", 200.0, max_new_tokens=8)
    assert big.unsteered == zero.unsteered and big.steered != big.unsteered
    sampled = [continue_text(model, tokenizer, PROMPT, 8, seed=3) for _ in range(2)]
    assert sampled[0] == sampled[1]  # sampling with a seed repeats


def test_bad_requests_get_one_line(tiny) -> None:
    model, _ = tiny
    (source,) = mlp_sources(model.base_model, "llama", [0])
    with pytest.raises(UsageError, match="units 0-47"), steering(model, source, 48, 1.0):
        pass
    with pytest.raises(UsageError, match="no encoder"), steering(model, source, 1, 1.0, mode="clamp"):
        pass
    with pytest.raises(UsageError, match="max_new_tokens"):
        continue_text(model, tiny_tokenizer(), PROMPT, 0, None)


def test_the_command_prints_both_continuations(tmp_path: Path, capsys) -> None:
    from featureatlas.cli import main

    model = save_tiny_model("llama", tmp_path / "model")
    argv = ["steer", "--model", str(model), "--device", "cpu", "--unit", "resid/1/0", "--max-new-tokens", "6"]
    assert main([*argv, "--strength", "300", "the cat sat"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "prompt:    the cat sat" and lines[1].startswith("unsteered: ")
    assert lines[2].startswith("steered (resid/1/0 +300): ") and lines[2].split(": ", 1)[1] != lines[1][11:]
    assert main([*argv, "the cat"]) == 2
    assert "pass one of --strength S or --clamp VALUE" in capsys.readouterr().err
    assert main([*argv, "--clamp", "2", "the cat"]) == 2
    assert "no encoder to edit" in capsys.readouterr().err
