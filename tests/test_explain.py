"""`featureatlas explain` against a real OpenAI-compatible server on a loopback port and a real tiny transformers
model: explanations and scores land in the store's `explanations` view, a perfect scorer gets 1.0 and a constant
one 0.5, the cache makes a re-run free, rate limits and server errors are retried, bad answers and bad inputs
get one line, and the key is sent only as the Authorization header and is found nowhere else.

The store is made here: features that fire exactly on one word each, so the fake explainer (which names the word
marked most often) is right and the fake scorer (which answers from whether a text, or its marked tokens, hold
that word) is perfect.
"""

from __future__ import annotations

import argparse
import io
import json
import re
import shutil
import socket
import threading
from collections import Counter
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import duckdb
import numpy as np
import pytest

from featureatlas.commands import explain as explain_command
from featureatlas.commands.options import flags_of
from featureatlas.errors import FeatureAtlasError, UsageError
from featureatlas.explain.client import REDACTED, EndpointClient, ExplainerError
from featureatlas.explain.prompts import parse_explanation, parse_predictions
from featureatlas.explain.run import ExplainConfig, explain_store
from featureatlas.explain.scoring import balanced_accuracy
from featureatlas.store.writer import StoreWriter

MODEL = "toy-lm"
BOS = "<s>"
FILLERS = [" the", " a", " of", " and", " to", " in", " is", " it", " was", " on", ",", "."]
WORDS = [" apple", " river", " seven"]  # feature u (and MLP neuron 0, for apple) fires on WORDS[u]
N_CONTEXTS, LENGTH = 60, 16
KEY = "sk-test-5f1e2d3c4b5a69788796a5b4"


# ---- the store -----------------------------------------------------------------------------------------------

def _add_layer(store: StoreWriter, source: str, kind: str, acts: np.ndarray, rng: np.random.Generator) -> None:
    """acts [units, contexts, LENGTH]: the units' activations; their top 5 and 3 per quantile interval examples as
    a harvest keeps them, and every context where they fire as a random example (so that no context outside a
    unit's examples holds its word: the non-activating ones drawn from other contexts are truly so)."""
    n_units = acts.shape[0]
    hook_name = "blocks.0.hook_resid_post" if kind == "sae" else "blocks.0.mlp.hook_post"
    store.add_source(MODEL, source, 0, n_units, "model.layers.0:output", kind=kind, hook_name=hook_name, signed=False)
    text = acts[:, :, 1:]
    maxima = text.max(axis=2)
    store.add_units(MODEL, source, 0, max_activation=text.max(axis=(1, 2)), min_activation=text.min(axis=(1, 2)),
                    n_tokens=np.full(n_units, text[0].size), n_firing=(text > 0).sum(axis=(1, 2)),
                    sum_activation=text.sum(axis=(1, 2)), sum_squares=(text ** 2).sum(axis=(1, 2)),
                    n_examples=np.minimum((maxima > 0).sum(axis=1), 5))
    for kind_name in ("top", "quantile", "random"):
        units, contexts, ranks, lows, highs = [], [], [], [], []
        for u in range(n_units):
            firing = np.flatnonzero(maxima[u] > 0)
            if kind_name == "top":
                chosen = firing[np.argsort(-maxima[u, firing], kind="stable")][:5]
                bounds = [(np.nan, np.nan)] * len(chosen)
            elif kind_name == "random":
                chosen = rng.permutation(firing)
                bounds = [(np.nan, np.nan)] * len(chosen)
            else:
                edges = np.arange(0, 9, 2.0)
                chosen, bounds = [], []
                for lo, hi in zip(edges[:-1], edges[1:], strict=True):
                    inside = rng.permutation(np.flatnonzero((maxima[u] >= lo) & (maxima[u] < hi) & (maxima[u] > 0)))
                    chosen += list(inside[:3])
                    bounds += [(lo, hi)] * len(inside[:3])
            units += [u] * len(chosen)
            contexts += list(chosen)
            ranks += list(range(1, len(chosen) + 1))
            lows += [b[0] for b in bounds]
            highs += [b[1] for b in bounds]
        if not units:
            continue
        units_a, contexts_a = np.array(units), np.array(contexts)
        example_acts = acts[units_a, contexts_a]
        positions = example_acts[:, 1:].argmax(axis=1) + 1
        store.add_examples(MODEL, source, 0, kind_name, units=units_a, ranks=np.array(ranks),
                           context_ids=contexts_a, positions=positions,
                           values=example_acts[np.arange(len(units)), positions], activations=example_acts,
                           context_lengths=np.full(len(units), LENGTH),
                           **({"interval_lo": np.array(lows), "interval_hi": np.array(highs)}
                              if kind_name == "quantile" else {}))


def make_word_store(path: Path) -> Path:
    """60 contexts of filler words; context i holds WORDS[i % 4] twice (i % 4 == 3: none). sae:toy features 0-2
    fire on their word only (feature 3 never fires); MLP neuron 0 fires on ' apple' and weakly everywhere."""
    rng = np.random.default_rng(0)
    tokens = []
    for i in range(N_CONTEXTS):
        row = [FILLERS[j] for j in rng.integers(0, len(FILLERS), LENGTH - 1)]
        if i % 4 < 3:
            for p in rng.choice(np.arange(1, LENGTH - 1), 2, replace=False):
                row[p] = WORDS[i % 4]
        tokens.append([BOS] + row)
    words = np.array(tokens)
    strength = rng.uniform(0.5, 7.5, N_CONTEXTS).astype(np.float32)[:, None]
    features = np.stack([np.where(words == w, strength, 0.0) for w in WORDS] + [np.zeros(words.shape)])
    neuron = (np.where(words == WORDS[0], strength, 0.0) + rng.uniform(0.05, 0.4, words.shape))[None]
    with StoreWriter(path) as store:
        store.add_run(run_id=1, model=MODEL, model_ref="toy", model_type="llama", corpus="toy.txt", n_documents=1,
                      n_contexts=N_CONTEXTS, n_tokens=N_CONTEXTS * (LENGTH - 1), context_length=LENGTH, top_k=5,
                      layers=[0], batch_size=8, dtype="float32", device="cpu", bos_token=BOS, bos_excluded=True,
                      seed=0, settings={}, versions={}, started_at=datetime(2025, 1, 1),
                      finished_at=datetime(2025, 1, 1, 0, 1), tokens_per_second=1e3)
        store.add_documents(np.array([0]), ["toy.txt"], np.array([N_CONTEXTS * (LENGTH - 1)]))
        store.add_contexts(np.arange(N_CONTEXTS), np.zeros(N_CONTEXTS), np.arange(N_CONTEXTS) * (LENGTH - 1),
                           [[1] * LENGTH] * N_CONTEXTS, tokens)
        _add_layer(store, "sae:toy", "sae", features.astype(np.float32), rng)
        _add_layer(store, "mlp", "mlp", neuron.astype(np.float32), rng)
    return path


@pytest.fixture(scope="module")
def word_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_word_store(tmp_path_factory.mktemp("words") / "store.duckdb")


@pytest.fixture
def store(word_store: Path, tmp_path: Path) -> Path:
    return Path(shutil.copy(word_store, tmp_path / "store.duckdb"))


@pytest.fixture(autouse=True)
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("FEATUREATLAS_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    return tmp_path / "cache"


def explanations(store: Path) -> list[tuple]:
    con = duckdb.connect(str(store), read_only=True)
    try:
        return con.execute("SELECT source, layer, unit, text, score, score_kind, author, file FROM explanations "
                           "ORDER BY source, unit, score_kind").fetchall()
    finally:
        con.close()


# ---- the server ----------------------------------------------------------------------------------------------

class FakeEndpoint:
    """An OpenAI-compatible chat server on a loopback port, in a thread, answering from the prompt by the model
    asked for: `perfect` explains (names the word marked most often) and scores right, `constant` says yes to
    every excerpt, `garbage` answers what no reader can parse, `echo` puts the Authorization header it got into
    its explanation. `fail` holds (status, body) answers to give the next chat requests first; `special` makes
    every chat answer oversize, not JSON, or a redirect."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, str, dict[str, str], bytes]] = []
        self.fail: list[tuple[int, str]] = []
        self.special: str | None = None
        self.models = ["perfect"]
        endpoint = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                endpoint.requests.append(("GET", self.path, dict(self.headers), b""))
                if self.path == "/v1/models":
                    self._send(200, json.dumps({"object": "list", "data": [{"id": m} for m in endpoint.models]}))
                else:
                    self._send(404, "{}")

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                endpoint.requests.append(("POST", self.path, dict(self.headers), body))
                if self.path != "/v1/chat/completions":
                    return self._send(404, '{"error": {"message": "no such route"}}')
                if endpoint.fail:
                    status, text = endpoint.fail.pop(0)
                    return self._send(status, text, {"Retry-After": "0"})
                if endpoint.special == "oversize":
                    return self._send(200, '{"choices": "' + "x" * (5 * 2**20) + '"}')
                if endpoint.special == "not-json":
                    return self._send(200, "<html>Welcome to nginx!</html>")
                if endpoint.special == "redirect":
                    return self._send(302, "", {"Location": "http://127.0.0.1:9/v1/chat/completions"})
                request = json.loads(body)
                content = answer(request["model"], request["messages"], self.headers.get("Authorization", ""))
                self._send(200, json.dumps({"id": "x", "object": "chat.completion", "choices": [
                    {"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}]}))

            def _send(self, status: int, text: str, headers: dict[str, str] | None = None) -> None:
                data = text.encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for name, value in (headers or {}).items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        # a short poll: shutdown() waits for the loop to look, half a second per server by default
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.02},
                                       daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def chats(self) -> list[dict]:
        return [json.loads(body) for method, path, _, body in self.requests if path.endswith("/chat/completions")]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def answer(model: str, messages: list[dict], authorization: str) -> str:
    system, user = messages[0]["content"], messages[1]["content"]
    if "[EXPLANATION]" in system:
        marked = Counter(m.strip() for m in re.findall(r"<<(.*?)>>", user))
        word = marked.most_common(1)[0][0] if marked else "nothing"
        if model == "echo":
            return f"[EXPLANATION]: the word {word} ({authorization})"
        return f"The marked tokens are all one word.\n[EXPLANATION]: the word {word}"
    lines = re.findall(r"^Example \d+: (.*)$", user, re.MULTILINE)
    if model == "garbage":
        return "I cannot tell."
    if model == "constant":
        return json.dumps([1] * len(lines))
    word = re.search(r"^Explanation: the word (\S+)", user, re.MULTILINE)[1]
    if "marked at random" in system:  # fuzzing: are the marked tokens the word?
        verdicts = [int(all(re.fullmatch(rf"( {word})+", s) for s in re.findall(r"<<(.*?)>>", line)))
                    for line in lines]
    else:
        verdicts = [int(re.search(rf"\b{word}\b", line) is not None) for line in lines]
    return str(verdicts)


@pytest.fixture
def endpoint() -> FakeEndpoint:
    server = FakeEndpoint()
    yield server
    server.close()


def config(store: Path, endpoint: FakeEndpoint, **given: object) -> ExplainConfig:
    values = dict(store=store, explainer=endpoint.url, retry_delay=0.0, concurrency=2)
    return ExplainConfig(**(values | given))


# ---- explaining and scoring ----------------------------------------------------------------------------------

def test_a_perfect_scorer_scores_one_and_the_rows_land_in_the_view(store: Path, endpoint: FakeEndpoint,
                                                                   cache: Path) -> None:
    out = io.StringIO()
    summary = explain_store(config(store, endpoint, source="sae:toy"), out=out)
    # features 0-2 fire (3 never does: not asked about); the explainer's name comes from GET /models
    rows = explanations(store)
    assert [(r[2], r[3], r[4], r[5], r[6], r[7]) for r in rows] == [
        (u, f"the word {w.strip()}", 1.0, f"{kind} balanced accuracy", "perfect", "featureatlas explain")
        for u, w in enumerate(WORDS) for kind in ("detection", "fuzzing")]
    assert (summary.units, summary.explained, summary.written.added) == (3, 3, 6)
    assert sorted(out.getvalue().splitlines()) == [
        f"sae:toy/0/{u}  detection 1.00  fuzzing 1.00  the word {w.strip()}" for u, w in enumerate(WORDS)]
    assert summary.line().startswith(f"explained 3 of 3 units with perfect; added 6 rows to {store}; perfect: ")
    # delphi's split: held-out quantile examples only (none shown to the explainer), as many non-activating ones
    result = summary.results[0]
    assert result.negatives > 0 and result.measured_negatives == 0  # features: every own example fires
    chats = endpoint.chats()
    explain_prompts = [c for c in chats if "[EXPLANATION]" in c["messages"][0]["content"]]
    assert len(explain_prompts) == 3 and all(c["temperature"] == 0 for c in chats)
    # re-run: every answer from the cache, nothing new in the store
    endpoint.requests.clear()
    again = explain_store(config(store, endpoint, source="sae:toy", explainer_model="perfect"), out=io.StringIO())
    assert endpoint.requests == [] and (again.written.added, again.written.duplicates) == (0, 6)
    assert again.requests["perfect"][:2] == (0, len(chats))
    assert len(list(cache.rglob("*.json"))) == len(chats)


def test_a_constant_scorer_scores_chance_and_an_unreadable_one_too(store: Path, endpoint: FakeEndpoint) -> None:
    endpoint.models = ["perfect", "constant", "garbage"]
    for scorer, unread in (("constant", False), ("garbage", True)):
        summary = explain_store(config(store, endpoint, units=["sae:toy/1", "mlp/0/0"], explainer_model="perfect",
                                       scorer=endpoint.url, scorer_model=scorer), out=io.StringIO())
        assert [s.balanced_accuracy for r in summary.results for s in r.scores] == [0.5] * 4
        assert (summary.unread_predictions > 0) == unread
    rows = explanations(store)
    assert {r[5] for r in rows} == {f"{k} balanced accuracy, scored by {s}" for k in ("detection", "fuzzing")
                                    for s in ("constant", "garbage")}
    assert {(r[0], r[2], r[3]) for r in rows} == {("sae:toy", 1, "the word river"), ("mlp", 0, "the word apple")}


def test_a_dense_unit_is_tested_on_its_own_quiet_examples(store: Path, endpoint: FakeEndpoint) -> None:
    summary = explain_store(config(store, endpoint, units=["mlp/0/0"]), out=io.StringIO())
    (result,) = summary.results
    assert result.text == "the word apple"  # marked: tokens above 0.2 x its max, i.e. the apples only
    assert result.measured_negatives > 0 and [s.balanced_accuracy for s in result.scores] == [1.0, 1.0]


def test_score_off_writes_unscored_explanations(store: Path, endpoint: FakeEndpoint) -> None:
    summary = explain_store(config(store, endpoint, units=["sae:toy/2,sae:toy/0"], score=False), out=io.StringIO())
    assert summary.scorer is None and len(endpoint.chats()) == 2
    assert [(r[2], r[3], r[4], r[5]) for r in explanations(store)] == [
        (0, "the word apple", None, None), (2, "the word seven", None, None)]


def test_a_unit_without_examples_is_skipped_and_counted(store: Path, endpoint: FakeEndpoint) -> None:
    summary = explain_store(config(store, endpoint, units=["sae:toy/3", "sae:toy/0"], score=False),
                            out=io.StringIO())
    assert (summary.explained, summary.no_examples) == (1, 1) and "skipped 1 without examples" in summary.line()


# ---- retries, bad answers, the key ---------------------------------------------------------------------------

def test_rate_limits_and_server_errors_are_retried(store: Path, endpoint: FakeEndpoint) -> None:
    endpoint.fail = [(429, '{"error": {"message": "slow down"}}'), (500, "oops"), (503, "")]
    summary = explain_store(config(store, endpoint, units=["sae:toy/0"], explainer_model="perfect", concurrency=1),
                            out=io.StringIO())
    assert summary.requests["perfect"][2] == 3 and summary.results[0].scores[0].balanced_accuracy == 1.0
    # retries run out: one line, and nothing is written
    endpoint.fail = [(500, "down")] * 3
    with pytest.raises(ExplainerError) as err:
        explain_store(config(store, endpoint, units=["sae:toy/1"], explainer_model="perfect", retries=2,
                             cache=False), out=io.StringIO())
    assert str(err.value) == (f"{endpoint.url}/chat/completions: HTTP 500: down, 3 times; check the server, or "
                              "raise retries or timeout (answers received so far are cached)")
    assert err.value.naming({"retries": "--retries", "timeout": "--timeout"}.get).endswith(
        "raise --retries or --timeout (answers received so far are cached)")
    assert len(explanations(store)) == 2  # those of the first run only


@pytest.mark.parametrize("special, message", [
    ("oversize", r"/v1/chat/completions: answered more than 4 MiB, which is not a chat completion; check that "
                 r"explainer is an OpenAI-compatible endpoint"),
    ("not-json", r"/v1/chat/completions: answered something other than JSON \('<html>Welcome to nginx!</html>'\); "
                 r"check that explainer is the base URL"),
    ("redirect", r"/v1/chat/completions: refused with HTTP 302; pass the address it redirects to as explainer"),
])
def test_a_bad_answer_gets_one_line_and_nothing_is_written(store: Path, endpoint: FakeEndpoint, special: str,
                                                           message: str) -> None:
    endpoint.special = special
    with pytest.raises(ExplainerError, match=message) as err:
        explain_store(config(store, endpoint, units=["sae:toy/0"], explainer_model="perfect"), out=io.StringIO())
    assert "\n" not in str(err.value) and explanations(store) == []
    assert len(endpoint.chats()) == 1  # none of these is retried (the redirect is not followed)


def test_the_key_goes_only_into_the_authorization_header(store: Path, endpoint: FakeEndpoint, cache: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ATLAS_KEY", KEY)
    endpoint.models = ["echo"]
    out = io.StringIO()
    summary = explain_store(config(store, endpoint, units=["sae:toy/0"], api_key_env="ATLAS_KEY"), out=out)
    assert {r[2]["Authorization"] for r in endpoint.requests} == {f"Bearer {KEY}"}
    assert all(KEY.encode() not in r[3] for r in endpoint.requests)  # not in any body
    text = summary.results[0].text
    assert text == f"the word apple (Bearer {REDACTED})"  # the server echoed it: taken out
    everything = out.getvalue() + summary.line() + repr(explanations(store)) + "".join(
        p.read_text() for p in cache.rglob("*") if p.is_file())
    assert KEY not in everything and KEY[:12] not in everything
    # a server's error that quotes the key, or a piece of it at the end of what is shown: taken out too
    endpoint.fail = [(401, json.dumps({"error": {"message": f"bad key {KEY}"}}))]
    with pytest.raises(ExplainerError) as err:
        explain_store(config(store, endpoint, units=["sae:toy/1"], api_key_env="ATLAS_KEY"), out=io.StringIO())
    assert str(err.value) == (f"{endpoint.url}/chat/completions: refused with HTTP 401 (bad key {REDACTED}); check "
                              "the key in $ATLAS_KEY")
    client = EndpointClient(endpoint.url, "echo", api_key_env="ATLAS_KEY")
    assert client._safe("x" * 10 + KEY[:20], 25) == "x" * 10 + REDACTED + "…"


def test_no_key_and_a_refusal_say_where_to_put_it(store: Path, endpoint: FakeEndpoint) -> None:
    endpoint.fail = [(401, '{"error": "missing key"}')]
    with pytest.raises(ExplainerError, match=r"refused with HTTP 401 \(missing key\); set the endpoint's key in "
                                             r"\$OPENAI_API_KEY \(or name another variable with api_key_env\)$"):
        explain_store(config(store, endpoint, units=["sae:toy/0"], explainer_model="perfect"), out=io.StringIO())
    assert "Authorization" not in endpoint.requests[-1][2]


def test_an_unreachable_endpoint_and_bad_options_get_one_line(store: Path, endpoint: FakeEndpoint) -> None:
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}/v1"
    with pytest.raises(ExplainerError, match=rf"^{closed}/models: cannot connect \(.*\); start the server or check "
                                             r"explainer$"):
        explain_store(config(store, endpoint, units=["sae:toy/0"], explainer=closed), out=io.StringIO())
    endpoint.models = ["a", "b"]
    with pytest.raises(UsageError, match=r"serves 2 models \('a', 'b'\); say which with explainer_model NAME"):
        explain_store(config(store, endpoint, units=["sae:toy/0"]), out=io.StringIO())
    bad = [({"units": ["sae:toy/9"]}, r"units: unit address 'sae:toy/9': no unit 9 in sae:toy layer 0"),
           ({"units": ["bogus/1/2"]}, r"units: unit address 'bogus/1/2' cannot be read"),
           ({"source": "sae:nope"}, r"source 'sae:nope': the store has no such source; it has mlp \(layer 0\), "
                                    r"sae:toy \(layer 0\)"),
           ({"units": ["sae:toy/0"], "layer": 0}, r"layer and limit go with source"),
           ({"units": ["sae:toy/0"], "explainer": "ftp://x/v1"}, r"explainer 'ftp://x/v1': only http:// and https:// "),
           ({"units": ["sae:toy/0"], "explainer": "http://"}, r"explainer 'http://': not an http\(s\) URL"),
           ({"units": ["sae:toy/0"], "explainer": "./nowhere"}, r"explainer: ./nowhere: no such file or folder"),
           ({"units": ["sae:toy/0"], "examples": 0}, r"examples 0: give at least 1"),
           ({"units": ["sae:toy/0"], "score": False, "scorer": "x"}, r"scorer names a scorer but score is off")]
    for given, message in bad:
        with pytest.raises(FeatureAtlasError, match=message) as err:
            explain_store(config(store, endpoint, **given), out=io.StringIO())
        assert "\n" not in str(err.value)
    assert explanations(store) == []


def test_the_command_line(store: Path, endpoint: FakeEndpoint, capsys: pytest.CaptureFixture) -> None:
    top = argparse.ArgumentParser(prog="featureatlas")
    parser = explain_command.add_parser(top.add_subparsers(dest="command"))
    explain_command.add_options(parser)
    args = top.parse_args(["explain", str(store), "--units", "sae:toy/2", "--explainer", endpoint.url,
                           "--explainer-model", "perfect", "--test-examples", "4", "--cache", "off"])
    assert (args.test_examples, args.cache, args.score) == (4, False, True)
    assert explain_command.run(args) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "sae:toy/0/2  detection 1.00  fuzzing 1.00  the word seven"
    assert lines[1].startswith("explained 1 of 1 unit with perfect; added 2 rows")
    with pytest.raises(UsageError) as err:
        explain_command.run(top.parse_args(["explain", str(store), "--source", "mlp", "--limit", "0"]))
    assert err.value.naming(flags_of(parser).get) == "--limit 0: give at least 1"


# ---- the readers ---------------------------------------------------------------------------------------------

def test_answers_are_read_leniently_and_never_raise() -> None:
    assert parse_explanation("Thinking...\n[EXPLANATION]: **Dates in May**\n") == "Dates in May"
    assert parse_explanation("<think>[EXPLANATION]: no</think>Explanation:\n  the word cat") == "the word cat"
    assert parse_explanation("just a phrase") == "just a phrase" and parse_explanation(" \n") is None
    assert parse_predictions("Sure: [1, 0, 1]", 3) == [True, False, True]
    assert parse_predictions("[true, no, YES]", 3) == [True, False, True]
    assert parse_predictions("Example 1: 1\nExample 2: 0", 2) == [True, False]
    assert parse_predictions("[1, 0]", 3) is None and parse_predictions("[[[" * 10_000, 2) is None


def test_balanced_accuracy_against_its_definition() -> None:
    rng = np.random.default_rng(0)
    for _ in range(50):
        truth, predicted = rng.random(9) < 0.4, rng.random(9) < 0.5
        positives, negatives = truth.sum(), (~truth).sum()
        expected = None if not positives or not negatives else (
            (truth & predicted).sum() / positives + (~truth & ~predicted).sum() / negatives) / 2
        assert balanced_accuracy(truth, predicted) == expected
    assert balanced_accuracy([True, False], [True, True]) == 0.5


# ---- a local transformers explainer --------------------------------------------------------------------------

@pytest.mark.model
def test_a_local_transformers_model_explains_and_scores(store: Path, tmp_path: Path) -> None:
    import torch
    import transformers

    from featureatlas.explain.run import EMBEDDED_MODEL
    from featureatlas.load.models import EMBEDDED_MODEL as LOADED_NAME

    from helpers.tiny_models import tiny_config, tiny_tokenizer

    assert ExplainConfig.explainer == EMBEDDED_MODEL == LOADED_NAME  # the default is the embedded model

    torch.manual_seed(0)
    tiny = tiny_config("llama")
    tiny.max_position_embeddings = 8192  # rotary: longer prompts cost no weights
    folder = tmp_path / "tiny-explainer"
    transformers.AutoModelForCausalLM.from_config(tiny).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    summary = explain_store(ExplainConfig(store=store, units=["sae:toy/0"], explainer=str(folder), examples=3,
                                          test_examples=2, max_tokens=24, device="cpu", dtype="float32"),
                            out=io.StringIO())
    (result,) = summary.results  # its text is noise, but it is the model's, and scored
    assert result.text and [s.kind for s in result.scores] == ["detection", "fuzzing"]
    rows = explanations(store)
    assert [(r[2], r[3], r[6]) for r in rows] == [(0, result.text, "tiny-explainer")] * 2
    assert summary.requests["tiny-explainer"][0] == 1 + 2 * 1  # one prompt, one batch per score
