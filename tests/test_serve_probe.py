"""The live probe box: `featureatlas serve SITE --store STORE` answers the unit pages' "try your own text" box
over real HTTP on a loopback port; its answers equal a direct forward pass; bad requests get a clear JSON error;
nothing outside the site (or hidden in it) is served; in a browser, typed text comes back highlighted."""

from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import transformers

from featureatlas.build.site import build_site
from featureatlas.cli import main
from featureatlas.harvest.probe import load_prober
from featureatlas.serve.server import MAX_BODY, make_server

from helpers.tiny_models import save_tiny_model, write_corpus

pytestmark = pytest.mark.model

TEXT = "The quick brown fox jumps over the lazy dog."


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path, Path]]:
    root = tmp_path_factory.mktemp("serve")
    model, corpus = save_tiny_model("llama", root / "model"), write_corpus(root / "corpus")
    store = root / "store.duckdb"
    assert main(["harvest", "--model", str(model), "--corpus", str(corpus), "--out", str(store), "--device", "cpu",
                 "--dtype", "float32", "--layers", "0-1", "--resid", "1", "--context-length", "16", "--top-k", "3",
                 "--compile", "off", "--tokens", "400"]) == 0
    build_site(store, root / "site", workers=1, progress=False)
    server = make_server(root / "site", port=0, prober=load_prober(store=store, device="cpu"))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/", model, root / "site"
    server.shutdown()
    server.server_close()


def post(base: str, body: bytes | dict) -> tuple[int, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(base + "api/probe", data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def test_probe_equals_a_direct_forward_pass(served) -> None:
    base, model_dir, _ = served
    with urllib.request.urlopen(base + "api/probe", timeout=30) as response:
        status = json.loads(response.read())
    assert ["resid", 1] in status["sources"] and ["mlp", 0] in status["sources"]
    code, result = post(base, {"text": TEXT, "source": "resid", "layer": 1, "unit": 7})
    assert code == 200
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32)
    ids = [tokenizer.bos_token_id] + tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        hidden = model(torch.tensor([ids]), output_hidden_states=True).hidden_states
    # resid_post of layer 1 is the input of layer 2: hidden_states[2] (the last layer's is normed, not this one)
    expected = hidden[2][0, :, 7].tolist()
    assert result["activations"] == pytest.approx(expected, rel=1e-5, abs=1e-5)
    assert len(result["tokens"]) == len(ids) and result["first_counted"] == 1
    assert result["max_position"] == max(range(1, len(ids)), key=lambda i: (expected[i], -i))
    code, top = post(base, {"text": TEXT, "source": "resid", "layer": 1, "top": 5})
    peaks = [max(hidden[2][0, 1:, u].tolist()) for u in range(hidden[2].shape[-1])]
    assert code == 200 and [u["unit"] for u in top["units"]] == sorted(range(len(peaks)), key=lambda u: -peaks[u])[:5]


@pytest.mark.parametrize("body,status,message", [
    (b"not json", 400, "not JSON"),
    ({"text": "", "source": "mlp", "layer": 0, "unit": 1}, 400, "type some text"),
    ({"text": "hi", "source": "mlp", "layer": 9, "unit": 1}, 400, "no mlp layer 9"),
    ({"text": "hi", "source": "mlp", "layer": 0, "unit": 99999}, 400, ""),
    ({"text": "hi", "source": "mlp", "layer": 0, "top": 0}, 400, "top: a number"),
    ({"text": "x" * (MAX_BODY + 10), "source": "mlp", "layer": 0, "unit": 1}, 413, "probe a shorter text"),
])
def test_bad_requests_get_a_clear_json_error(served, body, status: int, message: str) -> None:
    base, _, _ = served
    code, answer = post(base, body)
    assert code == status and message in answer["error"] and "\n" not in answer["error"]


def test_nothing_outside_the_site_is_served(served) -> None:
    base, _, site = served
    secret = site.parent / "secret.txt"
    secret.write_text("private")
    (site / "linked.txt").symlink_to(secret)
    for path in ("../secret.txt", "..%2Fsecret.txt", "%2e%2e/secret.txt", "static/../../secret.txt", "linked.txt",
                 ".featureatlas-site", "static/"):
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(base + path, timeout=10)
        assert refused.value.code == 404 and b"private" not in refused.value.read(), path


@pytest.mark.browser
def test_typing_into_the_box_highlights_the_text(served, page) -> None:
    from helpers.browser import SHOTS, assert_clean, expect

    base, _, site = served
    folder = next(site.glob("*/resid/1")).relative_to(site).as_posix()
    page.goto(f"{base}{folder}/unit.html#7")
    page.locator("#probe-text").fill(TEXT)
    page.get_by_role("button", name="Run through dimension 7").click()
    line = page.locator("#probe-result")
    expect(line).to_be_visible()
    tokens = line.locator(":scope > b")
    assert tokens.count() > 5 and line.locator("b.m").count() == 1
    line.locator("b.m").hover()
    expect(page.locator("#tip")).to_contain_text("activation")
    page.get_by_role("button", name="Top units of this layer").click()
    expect(page.locator("#probe-top li")).to_have_count(10)
    SHOTS.mkdir(exist_ok=True)
    page.screenshot(path=str(SHOTS / "probe.png"), full_page=False)
    assert_clean(page)
