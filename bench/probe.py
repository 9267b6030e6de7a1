"""Probe latency: what the "try your own text" box and `featureatlas probe` cost per request, once the model is
loaded — p50 and p95 over repeated requests, through the live server's own handler code over real HTTP.

    python bench/probe.py [--model smollm2-135m] [--tokens 64] [--requests 40] [--layers 0,12,29]

For each layer it sends `--requests` POSTs of a 64-token text to a `featureatlas serve` server on a loopback
port (one MLP neuron of that layer each time; the forward pass stops at that layer), and prints the p50 and p95
of the request times, then the same for `--top 10`. The model load is timed separately (it is paid once per
server start; see docs/embedded-model.md, "Model cache").
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

from featureatlas.harvest.probe import load_prober
from featureatlas.load.corpus import embedded_corpus
from featureatlas.serve.server import make_server


def _text(tokenizer: object, n_tokens: int) -> str:
    """The first n_tokens tokens of the embedded corpus, as text."""
    pattern = Path(str(embedded_corpus()))  # a glob: the folder of Gutenberg texts
    words = sorted(pattern.parent.glob(pattern.name))[0].read_text()[:20_000]
    ids = tokenizer(words, add_special_tokens=False)["input_ids"][:n_tokens]  # type: ignore[operator]
    return tokenizer.decode(ids)  # type: ignore[attr-defined]


def _percentiles(seconds: list[float]) -> str:
    ordered = sorted(seconds)
    p95 = ordered[min(len(ordered) - 1, int(round(0.95 * (len(ordered) - 1))))]
    return f"p50 {1000 * statistics.median(ordered):6.0f} ms   p95 {1000 * p95:6.0f} ms"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--requests", type=int, default=40)
    ap.add_argument("--layers", default="0,12,29")
    ap.add_argument("--dtype", default="auto")
    args = ap.parse_args()

    started = time.perf_counter()
    prober = load_prober(args.model, device="cpu", dtype=args.dtype)
    load = time.perf_counter() - started
    text = _text(prober.tokenizer, args.tokens)
    with tempfile.TemporaryDirectory() as site:
        (Path(site) / "index.html").write_text("<!doctype html><title>bench</title>")
        server = make_server(Path(site), port=0, prober=prober)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        url = f"http://127.0.0.1:{server.server_address[1]}/api/probe"

        def ask(body: dict) -> float:
            request = urllib.request.Request(url, data=json.dumps(body).encode(),
                                             headers={"Content-Type": "application/json"})
            t0 = time.perf_counter()
            with urllib.request.urlopen(request, timeout=60) as response:
                answer = json.loads(response.read())
            if "error" in answer:
                raise SystemExit(answer["error"])
            return time.perf_counter() - t0

        print(f"machine: {platform.processor() or platform.machine()}, model {prober.model_name} "
              f"({str(prober.model.dtype).removeprefix('torch.')}), loaded in {load:.1f} s; "
              f"text of {len(prober.token_ids(text)) - int(prober.has_bos)} tokens")
        for layer in (int(x) for x in args.layers.split(",")):
            ask({"text": text, "source": "mlp", "layer": layer, "unit": 0})  # warm up
            unit = [ask({"text": text, "source": "mlp", "layer": layer, "unit": i % 1536})
                    for i in range(args.requests)]
            top = [ask({"text": text, "source": "mlp", "layer": layer, "top": 10}) for _ in range(args.requests // 4)]
            print(f"layer {layer:2d}   unit: {_percentiles(unit)}   top 10: {_percentiles(top)}")
        server.shutdown()
        server.server_close()


if __name__ == "__main__":
    main()
