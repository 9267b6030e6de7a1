"""Steering over HTTP: `featureatlas serve SITE --store STORE` answers POST /api/steer on a loopback port with what
harvest/steer.py's steer() gives for the same request on a model loaded here; every field of a bad request gets
a 400 with one line; another site's page gets 403; in a browser, the unit page's steering box shows both
continuations side by side, and has no serious accessibility problem."""

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
from featureatlas.harvest.probe import load_prober
from featureatlas.harvest.sources import dictionary_sources, mlp_sources, resid_sources
from featureatlas.harvest.steer import steer
from featureatlas.load.dictionaries import load_dictionaries
from featureatlas.serve.server import MAX_NEW_TOKENS, make_server

from helpers.tiny_models import HIDDEN, harvest_small_store, one_thread

pytestmark = pytest.mark.model

PROMPT = "The quick brown fox"


torch_on_one_thread = pytest.fixture(scope="module", autouse=True)(one_thread)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    root = tmp_path_factory.mktemp("steer-serve")
    store, model, sae = harvest_small_store(root)
    build_site(store, root / "site", workers=1, progress=False)
    server = make_server(root / "site", port=0, prober=load_prober(store=store, device="cpu"))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield {"base": f"http://127.0.0.1:{server.server_address[1]}/", "model": model, "sae": sae,
           "site": root / "site"}
    server.shutdown()
    server.server_close()


def post(base: str, body: dict | bytes, headers: dict | None = None) -> tuple[int, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(base + "api/steer", data=data,
                                     headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


@pytest.mark.parametrize("request_", [
    {"source": "mlp", "layer": 1, "unit": 7, "strength": 12.5, "mode": "add", "max_new_tokens": 8},
    {"source": "resid", "layer": 1, "unit": 3, "strength": -40, "max_new_tokens": 6, "seed": 5},
    {"source": "sae:res1", "layer": 1, "unit": 2, "strength": 30.0, "mode": "clamp", "max_new_tokens": 8},
], ids=["neuron", "dimension-sampled", "feature-clamped"])
def test_the_answer_is_steer_for_the_same_request(served, request_: dict) -> None:
    code, answer = post(served["base"], {**request_, "text": PROMPT})
    assert code == 200, answer
    model = transformers.AutoModelForCausalLM.from_pretrained(served["model"], dtype=torch.float32).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(served["model"])
    backbone = model.base_model
    built = {("mlp", 1): mlp_sources(backbone, "llama", [1])[0],
             ("resid", 1): resid_sources(backbone, "llama", [1], HIDDEN)[0],
             ("sae:res1", 1): dictionary_sources([("res1", d) for d in load_dictionaries(served["sae"])], backbone,
                                                 "llama", torch.device("cpu"))[0]}
    ids = [tokenizer.bos_token_id] + tokenizer(PROMPT, add_special_tokens=False)["input_ids"]
    expected = steer(model, tokenizer, built[(request_["source"], request_["layer"])], request_["unit"], ids, PROMPT,
                     float(request_["strength"]), request_.get("mode", "add"), request_["max_new_tokens"],
                     request_.get("seed"))
    assert (answer["unsteered"], answer["steered"]) == (expected.unsteered, expected.steered)
    assert answer["steered"] != answer["unsteered"]  # the push changed the continuation
    assert answer["prompt"] == PROMPT and answer["strength"] == request_["strength"]


GOOD = {"source": "mlp", "layer": 1, "unit": 7, "text": PROMPT, "strength": 5.0, "max_new_tokens": 4}


@pytest.mark.parametrize("change,message", [
    ({"strength": float("nan")}, "strength"),
    ({"strength": 1e9}, "strength: a number from"),
    ({"strength": "5"}, "strength"),
    ({"strength": True}, "strength"),
    ({"mode": "push"}, "mode"),
    ({"mode": ["add"]}, "mode"),
    ({"max_new_tokens": 0}, "max_new_tokens"),
    ({"max_new_tokens": MAX_NEW_TOKENS + 1}, "max_new_tokens"),
    ({"max_new_tokens": 2.5}, "max_new_tokens"),
    ({"seed": -1}, "seed"),
    ({"seed": "1"}, "seed"),
    ({"text": ""}, "text"),
    ({"text": 7}, "text"),
    ({"text": "x" * 2001}, "at most 2,000"),
    ({"text": "a" * 126}, "continuation"),  # BOS + 126 tokens fit the tiny model's 128 positions, 4 more do not
    ({"unit": 10**6}, "units 0-47"),
    ({"unit": -1}, "unit"),
    ({"layer": 9}, "no mlp layer 9"),
    ({"source": None}, "source"),
    ({"mode": "clamp"}, "no encoder"),  # a neuron has none
], ids=lambda v: json.dumps(v)[:40] if isinstance(v, dict) else None)
def test_bad_requests_get_400_and_one_line(served, change: dict, message: str) -> None:
    code, answer = post(served["base"], {**GOOD, **change})
    assert code == 400 and message in answer["error"] and "\n" not in answer["error"], answer


def test_not_an_object_and_not_json(served) -> None:
    for body in (b"[1, 2]", b"not json"):
        code, answer = post(served["base"], body)
        assert code == 400 and "\n" not in answer["error"]


def test_another_sites_page_gets_403(served) -> None:
    code, answer = post(served["base"], GOOD, {"Origin": "http://evil.example", "Sec-Fetch-Site": "cross-site"})
    assert code == 403 and "steered" not in answer


def serious_violations(page: object) -> list[str]:
    """axe-core's serious and critical findings on the page (its bundled copy: no network)."""
    from axe_playwright_python.sync_playwright import Axe

    found = Axe().run(page).response["violations"]
    return [f"{v['id']}: {v['nodes'][0]['target']}" for v in found if v["impact"] in ("serious", "critical")]


@pytest.mark.browser
def test_the_steering_box_shows_both_continuations(served, page) -> None:
    from helpers.browser import SHOTS, assert_clean, expect

    site: Path = served["site"]
    neurons = next(site.glob("*/mlp/1")).relative_to(site).as_posix()
    features = next(site.glob("*/sae-res1/1")).relative_to(site).as_posix()
    page.goto(f"{served['base']}{neurons}/unit.html#7")
    expect(page.locator("#steer")).to_be_visible()
    expect(page.locator("nav.toc [data-target=steer]")).to_have_count(1)
    assert page.locator("#steer-clamp").count() == 0  # neurons are only pushed
    page.get_by_label("Prompt").fill("<b>The quick</b> brown fox")  # shown as text, never parsed
    slider = page.get_by_label("Strength")
    assert 0 < float(slider.input_value()) < float(slider.get_attribute("max"))  # a push of a few times the max
    slider.fill(str(float(slider.get_attribute("max")) / 2))
    strength = float(slider.input_value())
    page.get_by_label("New tokens").fill("8")
    expect(page.locator("#steer output")).to_contain_text(f"+{strength:g}")
    page.get_by_role("button", name="Steer neuron 7").click()
    expect(page.locator("#steer-steered")).to_be_visible()
    unsteered, steered = page.locator("#steer-unsteered").inner_text(), page.locator("#steer-steered").inner_text()
    assert unsteered.startswith("<b>The quick</b> brown fox") and steered.startswith("<b>The quick</b>")
    assert page.locator("#steer-out b, .steer-out b").count() == 0 and unsteered != steered
    box = page.locator("#steer-unsteered").bounding_box(), page.locator("#steer-steered").bounding_box()
    assert box[1]["x"] > box[0]["x"] + box[0]["width"] - 1 and abs(box[1]["y"] - box[0]["y"]) < 2  # side by side
    expect(page.locator("#steer figcaption").nth(1)).to_contain_text(f"strength +{strength:g}")
    assert serious_violations(page) == []  # with the box drawn and answered
    SHOTS.mkdir(exist_ok=True)
    page.locator("#steer").screenshot(path=str(SHOTS / "steer.png"))
    page.goto(f"{served['base']}{features}/unit.html#2")
    expect(page.locator("#steer-clamp")).to_be_visible()
    page.get_by_label("Prompt").fill(PROMPT)  # another layer's page: a new page
    page.get_by_label("Clamp", exact=False).check()
    page.get_by_role("button", name="Steer feature 2").click()
    expect(page.locator("#steer-steered")).to_be_visible()
    expect(page.locator("#steer figcaption").nth(1)).to_contain_text("clamped to")
    assert_clean(page)
