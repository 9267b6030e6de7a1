"""The models that write and score explanations: any OpenAI-compatible chat endpoint (vLLM, llama.cpp's server,
Ollama, a hosted API) over plain HTTP, or a local transformers causal LM.

An endpoint's answers are untrusted: a response is read only up to MAX_RESPONSE_BYTES, must be the chat-completions
JSON, and every failure is one line naming the endpoint and the fix. Rate limits (429), server errors (5xx),
timeouts and dropped connections are retried with exponential backoff (Retry-After honoured up to MAX_BACKOFF);
other refusals (a bad key, an unknown model) are not. Redirects are refused, so the key goes only to the URL given.
The key is read from an environment variable, sent only as the Authorization header, and never printed, cached or
stored: any answer or error text that echoes it has it replaced by REDACTED.

Answers are cached on disk (cache_root()/explain), keyed by a hash of the endpoint's model name, the messages and
the generation settings (not the URL or the key), so a re-run sends no request it has sent before. Entries are
written to a temporary file and renamed, so a crash leaves a whole entry or none; an unreadable entry is a miss.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from http.client import HTTPException
from pathlib import Path
from typing import Protocol

from featureatlas.cachedir import cache_root
from featureatlas.errors import FeatureAtlasError, ModelLoadError, UsageError, setting_name
from featureatlas.net import is_loopback

MAX_RESPONSE_BYTES = 4 * 2**20  # a chat completion is a few KB; more is not an answer
MAX_CACHE_BYTES = 4 * 2**20
MAX_BACKOFF = 60.0  # seconds: the longest wait before a retry, whatever Retry-After asks
MAX_MODELS_SHOWN = 5
REDACTED = "[redacted]"
CACHE_VERSION = 1  # part of every cache key: bump when what an entry means changes


class ExplainerError(FeatureAtlasError):
    """An explainer or scorer that cannot be used or failed: which one, why, and what to do."""


Message = dict[str, str]


class ChatModel(Protocol):
    """What writes and scores explanations: a name (the explanations' author) and one chat turn at a time."""

    name: str

    def complete(self, messages: Sequence[Message], max_tokens: int) -> str:
        """The assistant's answer to `messages`, at most `max_tokens` tokens of it."""
        ...


@dataclass
class Counts:
    """Requests an endpoint client sent and answers it took from the cache, for the summary (thread-safe)."""

    sent: int = 0
    cached: int = 0
    retried: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, name: str) -> None:
        with self.lock:
            setattr(self, name, getattr(self, name) + 1)


def is_url(spec: str) -> bool:
    """An --explainer or --scorer value that names an endpoint rather than a model."""
    return spec.lower().startswith(("http://", "https://"))


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, req, fp, code, msg, headers, newurl):  # noqa: ANN001, ANN201 - urllib's signature
        return None  # the 3xx becomes an HTTPError: the key is never sent on to another address


class EndpointClient:
    """An OpenAI-compatible chat-completions endpoint: POST {base}/chat/completions."""

    def __init__(self, base_url: str, model: str | None = None, *, api_key_env: str = "OPENAI_API_KEY",
                 timeout: float = 120.0, retries: int = 4, retry_delay: float = 1.0, cache: bool = True,
                 cache_dir: Path | None = None, option: str = "explainer") -> None:
        self.flag, self.model_flag = setting_name(option), setting_name(option + "_model")
        parsed = urllib.parse.urlsplit(base_url)
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            raise UsageError(f"{self.flag} {_cut(base_url)!r}: not an http(s) URL; pass the endpoint's base URL, "
                             "e.g. http://localhost:8000/v1")
        if parsed.query or parsed.fragment:
            raise UsageError(f"{self.flag} {_cut(base_url)!r}: give the base URL without ?query or #fragment, "
                             "e.g. http://localhost:8000/v1")
        if timeout <= 0 or retries < 0 or retry_delay < 0:
            raise UsageError(f"{setting_name('timeout')} must be positive and {setting_name('retries')} at least 0")
        self.base = base_url.rstrip("/")
        self.option = option
        self.api_key_env = api_key_env
        self._key = os.environ.get(api_key_env) or None
        if self._key is not None and not self._key.isprintable():
            raise UsageError(f"${api_key_env}: the key holds a line break or control character; set it to the key "
                             "alone")
        self.timeout, self.retries, self.retry_delay = timeout, retries, retry_delay
        self.cache_dir = (cache_dir or cache_root() / "explain") if cache else None
        self.counts = Counts()
        handlers: list[urllib.request.BaseHandler] = [_NoRedirect()]
        if is_loopback(parsed.hostname):
            handlers.append(urllib.request.ProxyHandler({}))  # a local server is never reached through a proxy
        self._opener = urllib.request.build_opener(*handlers)
        self.model = model if model is not None else self._only_model()
        if not self.model.strip() or len(self.model) > 200:
            raise UsageError(f"{self.model_flag} {_cut(self.model)!r}: give the endpoint's model name (1 to 200 "
                             "characters)")
        self.name = self.model

    # -- the protocol ------------------------------------------------------------------------------------------

    def complete(self, messages: Sequence[Message], max_tokens: int) -> str:
        body = {"model": self.model, "messages": list(messages), "max_tokens": max_tokens, "temperature": 0}
        key = hashlib.sha256(json.dumps([CACHE_VERSION, body], sort_keys=True).encode()).hexdigest()
        cached = self._cache_read(key)
        if cached is not None:
            self.counts.add("cached")
            return cached
        reply = self._request("/chat/completions", json.dumps(body).encode())
        content = self._content(reply)
        self._cache_write(key, content)
        return content

    # -- HTTP --------------------------------------------------------------------------------------------------

    def _only_model(self) -> str:
        """The endpoint's one model (GET {base}/models), when --explainer-model is not given."""
        reply = self._request("/models", None)
        data = reply.get("data") if isinstance(reply, dict) else None
        ids = [m.get("id") for m in data if isinstance(m, dict)] if isinstance(data, list) else []
        ids = [self._safe(i) for i in ids if isinstance(i, str) and i.strip()]  # a name becomes the author
        if len(ids) != 1:
            shown = ", ".join(repr(_cut(i, 60)) for i in ids[:MAX_MODELS_SHOWN]) + (", ..." if len(ids) > 5 else "")
            raise UsageError(f"{self.base}: the endpoint serves {len(ids)} models{' (' + shown + ')' if ids else ''}"
                             f"; say which with {self.model_flag} NAME")
        return ids[0]

    def _request(self, path: str, data: bytes | None) -> object:
        """The parsed JSON answer to a GET (data None) or POST, retried as the module says."""
        url = self.base + path
        attempt = 0
        while True:
            request = urllib.request.Request(url, data=data, method="GET" if data is None else "POST")
            request.add_header("Accept", "application/json")
            if data is not None:
                request.add_header("Content-Type", "application/json")
            if self._key is not None:
                request.add_unredirected_header("Authorization", f"Bearer {self._key}")
            wait = None
            try:
                self.counts.add("sent")
                with self._opener.open(request, timeout=self.timeout) as response:
                    return self._parse(url, self._read(url, response))
            except urllib.error.HTTPError as err:
                body = _read_some(err, self._safe)
                err.close()
                if err.code == 429 or err.code >= 500:
                    wait = _retry_after(err.headers.get("Retry-After"))
                    problem = f"HTTP {err.code}{': ' + body if body else ''}"
                else:
                    raise ExplainerError(self._refusal(url, err.code, body)) from None
            except urllib.error.URLError as err:
                reason = err.reason
                if isinstance(reason, TimeoutError):
                    problem = f"no answer within {self.timeout:g} s"
                elif isinstance(reason, (ConnectionResetError, ConnectionAbortedError, BrokenPipeError)):
                    problem = f"connection lost ({type(reason).__name__})"
                else:  # refused, no such host, TLS failure: retrying does not help
                    raise ExplainerError(f"{url}: cannot connect ({self._safe(str(reason))}); start the server or "
                                         f"check {self.flag}") from None
            except TimeoutError:
                problem = f"no answer within {self.timeout:g} s"
            except (HTTPException, ConnectionError) as err:  # dropped mid-answer
                problem = f"connection lost ({type(err).__name__})"
            attempt += 1
            if attempt > self.retries:
                raise ExplainerError(f"{url}: {problem}, {self.retries + 1} times; check the server, or raise "
                                     f"{setting_name('retries')} or {setting_name('timeout')} (answers received so "
                                     "far are cached)")
            self.counts.add("retried")
            backoff = self.retry_delay * 2 ** (attempt - 1) * (1 + random.random() / 4)
            time.sleep(min(MAX_BACKOFF, max(backoff, wait or 0.0)))

    def _read(self, url: str, response: object) -> bytes:
        length = response.headers.get("Content-Length")  # type: ignore[attr-defined]
        if length is not None and length.strip().isdigit() and int(length) > MAX_RESPONSE_BYTES:
            raise ExplainerError(self._oversize(url))
        deadline = time.monotonic() + self.timeout  # the socket's timeout is per read: a trickle could last forever
        chunks, size = [], 0
        while chunk := response.read1(65536):  # type: ignore[attr-defined]
            chunks.append(chunk)
            size += len(chunk)
            if size > MAX_RESPONSE_BYTES:
                raise ExplainerError(self._oversize(url))
            if time.monotonic() > deadline:
                raise TimeoutError
        return b"".join(chunks)

    def _oversize(self, url: str) -> str:
        return (f"{url}: answered more than {MAX_RESPONSE_BYTES // 2**20} MiB, which is not a chat completion; check "
                f"that {self.flag} is an OpenAI-compatible endpoint")

    def _parse(self, url: str, body: bytes) -> object:
        try:
            return json.loads(body.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError):
            start = self._safe(body.decode("utf-8", "replace"), 80)
            raise ExplainerError(f"{url}: answered something other than JSON ({start!r}); "
                                 f"check that {self.flag} is the base URL of an OpenAI-compatible endpoint "
                                 "(it usually ends in /v1)") from None

    def _content(self, reply: object) -> str:
        """The first choice's message text; a reply without one is one line."""
        try:
            content = reply["choices"][0]["message"]["content"]  # type: ignore[index]
        except (KeyError, IndexError, TypeError):
            content = False
        if content is None:  # some servers give None for an empty answer
            content = ""
        if not isinstance(content, str):
            raise ExplainerError(f"{self.base}/chat/completions: the answer has no choices[0].message.content text; "
                                 f"check that {self.flag} is an OpenAI-compatible chat endpoint")
        return self._safe(content)

    def _refusal(self, url: str, code: int, body: str) -> str:
        detail = f" ({body})" if body else ""
        if code in (401, 403):
            fix = (f"check the key in ${self.api_key_env}" if self._key is not None else
                   f"set the endpoint's key in ${self.api_key_env} (or name another variable with "
                   f"{setting_name('api_key_env')})")
        elif code == 404:
            fix = (f"check {self.flag} (the base URL, usually ending in /v1) and {self.model_flag} "
                   f"({_cut(getattr(self, 'model', '') or '?')!r})")
        elif 300 <= code < 400:
            fix = f"pass the address it redirects to as {self.flag}"
        else:
            fix = f"check {self.model_flag} and the server's log"
        return f"{url}: refused with HTTP {code}{detail}; {fix}"

    def _safe(self, text: str, limit: int | None = None) -> str:
        """Text from the server with the key taken out: whole, and, where the text was cut (by the server or by
        `limit`), a trailing piece of it."""
        key = self._key
        if key and key in text:
            text = text.replace(key, REDACTED)
        cut = limit is not None and len(text) > limit
        if cut:
            text = text[:limit]
        if key:
            for n in range(min(len(key) - 1, len(text)), 3, -1):
                if text.endswith(key[:n]):
                    text = text[:-n] + REDACTED
                    break
        return text + ("…" if cut else "")

    # -- cache -------------------------------------------------------------------------------------------------

    def _cache_path(self, key: str) -> Path | None:
        return None if self.cache_dir is None else self.cache_dir / key[:2] / f"{key}.json"

    def _cache_read(self, key: str) -> str | None:
        path = self._cache_path(key)
        if path is None:
            return None
        try:
            with open(path, "rb") as f:
                raw = f.read(MAX_CACHE_BYTES + 1)
            entry = json.loads(raw) if len(raw) <= MAX_CACHE_BYTES else None
        except (OSError, ValueError, RecursionError):
            return None
        content = entry.get("content") if isinstance(entry, dict) else None
        return self._safe(content) if isinstance(content, str) else None

    def _cache_write(self, key: str, content: str) -> None:
        path = self._cache_path(key)
        if path is None:
            return
        temp = None
        try:
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            fd, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".partial")
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump({"content": content}, f)
            os.replace(temp, path)
        except OSError:  # a cache that cannot be written only costs the next run a request
            if temp is not None:
                Path(temp).unlink(missing_ok=True)


class LocalClient:
    """A transformers causal LM on this machine, greedy: its chat template when the tokenizer has one, else the
    messages as `role: text` paragraphs. One generation at a time (a lock), whatever the concurrency."""

    def __init__(self, model: str, *, device: str = "auto", dtype: str = "auto", loaded: tuple | None = None) -> None:
        """loaded: (model, tokenizer, ref) already in memory (the demo explains with the model it harvested)."""
        from transformers.utils import logging as hf_logging

        from featureatlas.load.models import load_model, pick_device, pick_dtype, resolve_model
        if loaded is not None:
            self.model, self.tokenizer, ref = loaded
            self.device, self.name = self.model.device, ref.display_name
            self.counts, self._lock = Counts(), threading.Lock()
            return
        ref = resolve_model(model)
        torch_device = pick_device(device)
        progress = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()
        try:
            self.model, self.tokenizer = load_model(ref, torch_device, pick_dtype(dtype, torch_device))
        finally:
            if progress:
                hf_logging.enable_progress_bar()
        self.device = torch_device
        self.name = ref.display_name
        self.counts = Counts()
        self._lock = threading.Lock()

    def complete(self, messages: Sequence[Message], max_tokens: int) -> str:
        import torch

        from featureatlas.load.models import check_length
        if getattr(self.tokenizer, "chat_template", None):
            text = self.tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)
        else:
            text = "".join(f"{m['role']}: {m['content']}\n\n" for m in messages) + "assistant:"
        ids = self.tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
        check_length(self.model, ids.shape[1] + max_tokens, "a prompt with its answer", "pass fewer --examples, "
                     "a smaller --window or --batch, or an explainer that reads longer texts")
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else \
            self.tokenizer.eos_token_id
        with self._lock, torch.no_grad():
            self.counts.add("sent")
            out = self.model.generate(ids.to(self.device), attention_mask=torch.ones_like(ids).to(self.device),
                                      max_new_tokens=max_tokens, do_sample=False, temperature=None, top_p=None,
                                      top_k=None, pad_token_id=pad)
        return self.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def open_model(spec: str, model_name: str | None, *, option: str, api_key_env: str, timeout: float, retries: int,
               cache: bool, device: str, dtype: str, retry_delay: float = 1.0) -> ChatModel:
    """An endpoint client for a URL, else the local model `spec` names (folder, .gguf, hub id, smollm2-135m)."""
    if is_url(spec):
        return EndpointClient(spec, model_name, api_key_env=api_key_env, timeout=timeout, retries=retries,
                              retry_delay=retry_delay, cache=cache, option=option)
    if "://" in spec:
        raise UsageError(f"{setting_name(option)} {_cut(spec)!r}: only http:// and https:// endpoints are spoken to; "
                         "pass an endpoint's base URL such as http://localhost:8000/v1, or a local model")
    if model_name is not None:
        model_flag, flag = setting_name(option + "_model"), setting_name(option)
        raise UsageError(f"{model_flag} names an endpoint's model, but {flag} {_cut(spec)!r} is a local model; "
                         f"leave {model_flag} out, or pass an http(s) URL as {flag}")
    try:
        return LocalClient(spec, device=device, dtype=dtype)
    except ModelLoadError as err:
        raise ModelLoadError(f"{setting_name(option)}: {getattr(err, 'marked', err)}") from None


def _read_some(err: urllib.error.HTTPError, safe: Callable[[str, int | None], str]) -> str:
    """The start of an error answer (its OpenAI-style error message, if any), the key taken out by `safe`, as
    one printable line."""
    try:
        raw = err.read(2000)
    except (OSError, HTTPException):
        return ""
    text = safe(raw.decode("utf-8", "replace"), None)
    try:  # OpenAI-style {"error": {"message": ...}} or {"error": "..."}
        parsed = json.loads(text)
        error = parsed.get("error") if isinstance(parsed, dict) else None
        message = error.get("message") if isinstance(error, dict) else error
        if isinstance(message, str):
            text = message
    except (ValueError, RecursionError):
        pass
    return safe(" ".join(text.split()), 200).encode("unicode_escape").decode("ascii")


def _retry_after(value: str | None) -> float | None:
    try:
        return min(MAX_BACKOFF, max(0.0, float(value))) if value is not None else None
    except ValueError:
        return None


def _cut(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[:limit] + "…"
