"""The HTTP side of `plainlm serve`: OpenAI-compatible routes over one Engine, and the server that runs them.

    app = create_app(engine, served_model_name="SmolLM2")   # a FastAPI app; tests use it in-process
    run_server(app, bind("127.0.0.1", 8000))                 # uvicorn, until SIGINT or SIGTERM

The routes only translate. An OpenAI body becomes engine Requests (one per choice, or per prompt of a
batch); the engine calls each request's on_event from its own thread, and `Choices` hands those events
to this server's event loop through an asyncio.Queue, so a route only ever awaits. The events become
one JSON response or server-sent events (`data: {json}` chunks, then `data: [DONE]`). A client that
disconnects has its requests cancelled, which frees their blocks at once.

Bad input never reaches the engine as a crash: pydantic checks the body's types and ranges
(schemas.py), the routes check what needs the model (the prompt against the context, the model name),
and every refusal is OpenAI's error body, {"error": {"message", "type", "code"}}, with its status.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import math
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from functools import partial
from importlib import resources
from typing import TYPE_CHECKING, Any

import uvicorn
from fastapi import FastAPI
from fastapi import Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from plainlm.errors import CheckpointError, InvalidInput, MissingInput, NotFound, PlainlmError, QueueFull
from plainlm.sampling import SamplingParams
from plainlm.serve.engine import Event, Request, Result, TokenLogprob
from plainlm.serve.schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    LoadLoraRequest,
    SamplingFields,
    TokenizeRequest,
    UnloadLoraRequest,
)

if TYPE_CHECKING:  # only annotations: the app is handed an engine, it never builds one
    from plainlm.serve.engine import Engine

log = logging.getLogger("plainlm.serve")

MAX_BODY_BYTES = 16 * 1024**2  # a 128k-token prompt as JSON ids is about 1 MB: room for long ones, not for abuse
OPEN_PATHS = {"/", "/health"}  # answered without the API key: a load balancer's probe, the chat page itself
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
}


# --- errors: OpenAI's body, the right status ---
def error_response(status: int, message: str) -> JSONResponse:
    body = {"error": {"message": message, "type": ERROR_TYPES.get(status, "invalid_request_error"), "code": status}}
    return JSONResponse(body, status_code=status)


def status_of(error: PlainlmError) -> int:
    """The HTTP status of a plainlm error: 4xx for what the client sent, 500 for anything else."""
    if isinstance(error, NotFound):
        return 404
    if isinstance(error, QueueFull):
        return 429
    if isinstance(error, InvalidInput | CheckpointError | MissingInput):  # a bad body, or a bad adapter to load
        return 400
    return 500


def validation_message(error: RequestValidationError) -> str:
    """The first problem in a body, named by its field: `temperature: Input should be greater than or equal to 0`."""
    first = error.errors()[0]
    where = ".".join(str(part) for part in first["loc"] if part != "body")
    if first["type"] == "json_invalid":
        return f"the body is not valid JSON ({first['ctx']['error']} at character {first['loc'][-1]})"
    return f"{where}: {first['msg']}" if where else first["msg"]


class BodyTooLarge(HTTPException):
    def __init__(self, limit: int) -> None:
        super().__init__(413, f"the request body is over this server's limit of {limit} bytes")


class Gate:
    """What every request passes before a route: the API key, when the server has one, and the body size
    limit (the declared Content-Length first; a body sent without one is counted as it is read)."""

    def __init__(self, app: Callable, api_key: str | None, max_body_bytes: int) -> None:
        self.app, self.api_key, self.max_body_bytes = app, api_key, max_body_bytes

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        if self.api_key is not None and scope["path"] not in OPEN_PATHS and not self._authorized(headers):
            response = error_response(401, "a missing or wrong API key: send the header 'Authorization: Bearer KEY'")
            return await response(scope, receive, send)
        length = headers.get("content-length", "")
        if length.isdigit() and int(length) > self.max_body_bytes:
            return await error_response(413, BodyTooLarge(self.max_body_bytes).detail)(scope, receive, send)
        return await self.app(scope, self._counted(receive), send)

    def _authorized(self, headers: dict[str, str]) -> bool:
        scheme, _, key = headers.get("authorization", "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(key.strip().encode(), self.api_key.encode())

    def _counted(self, receive: Callable) -> Callable:
        received = 0

        async def counted_receive() -> dict:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_body_bytes:
                raise BodyTooLarge(self.max_body_bytes)  # FastAPI passes an HTTPException through as it is
            return message

        return counted_receive


# --- from the engine's thread to this event loop ---
class Choices:
    """The engine requests of one API call (one per choice) and the queue their events come back on.

    The engine calls on_event from its own thread; `call_soon_threadsafe` moves each event onto the event
    loop that made this object, so the routes only await a queue. Whatever ends a call early (a client
    gone, an error) calls `cancel`, which frees the blocks of the requests still running.
    """

    def __init__(self, engine: Engine, requests: list[Request]) -> None:
        self.engine = engine
        self.queue: asyncio.Queue[tuple[int, Event]] = asyncio.Queue()
        self.ids: list[int] = []
        self.running = set(range(len(requests)))
        loop = asyncio.get_running_loop()
        try:
            for index, request in enumerate(requests):
                request.on_event = partial(self._forward, loop, index)
                self.ids.append(engine.submit(request))
        except BaseException:
            self.cancel()  # the choices already submitted (the queue filled up on the third of four, say)
            raise

    def _forward(self, loop: asyncio.AbstractEventLoop, index: int, event: Event) -> None:
        # A RuntimeError: the event loop has closed (the server is shutting down) and nobody is listening.
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(self.queue.put_nowait, (index, event))

    async def events(self) -> AsyncIterator[tuple[int, Event]]:
        """(choice index, event) until every choice has finished."""
        while self.running:
            index, event = await self.queue.get()
            if event.finish_reason is not None:
                self.running.discard(index)
            yield index, event

    async def results(self, http: HTTPRequest) -> list[Result] | None:
        """Each choice's events joined into one Result; None when the client disconnects first."""
        events: list[list[Event]] = [[] for _ in self.ids]
        collecting = asyncio.ensure_future(self._collect(events))
        gone = asyncio.ensure_future(_disconnected(http))
        try:
            done, _ = await asyncio.wait({collecting, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
            collecting.cancel()
            self.cancel()
        return [Result.join(e) for e in events] if collecting in done else None

    async def _collect(self, events: list[list[Event]]) -> None:
        async for index, event in self.events():
            events[index].append(event)

    def cancel(self) -> None:
        for index in sorted(self.running):
            if index < len(self.ids):
                self.engine.cancel(self.ids[index])
        self.running.clear()


async def _disconnected(http: HTTPRequest) -> None:
    # Once the body is read, the next ASGI message is the client's disconnect (or the end of the response).
    while (await http.receive())["type"] != "http.disconnect":
        pass


class EventStream(StreamingResponse):
    """Server-sent events from `chunks`, whose engine requests are cancelled however the response ends:
    finished, or cut short because the client disconnected (Starlette then cancels the stream)."""

    def __init__(self, chunks: AsyncIterator[str], choices: Choices) -> None:
        super().__init__(chunks, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self.choices = choices

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.choices.cancel()  # frees the blocks of a client that left mid-stream


def sse(data: dict | str) -> str:
    """One server-sent event: `data: {json}` and a blank line."""
    text = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    return f"data: {text}\n\n"


# --- the app ---
def create_app(
    engine: Engine, *, served_model_name: str, api_key: str | None = None, max_body_bytes: int = MAX_BODY_BYTES
) -> FastAPI:
    """The routes over `engine`. The app's lifespan starts the engine's thread and stops it (running requests
    end with finish_reason "abort", so open streams end too)."""
    routes = Routes(engine, served_model_name)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine.start()
        yield
        routes.stop_engine()

    app = FastAPI(title="plainlm", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.routes = routes
    app.add_middleware(Gate, api_key=api_key, max_body_bytes=max_body_bytes)

    @app.exception_handler(RequestValidationError)
    async def bad_body(_: HTTPRequest, error: RequestValidationError) -> JSONResponse:
        return error_response(400, validation_message(error))  # OpenAI's status for a malformed body, not 422

    @app.exception_handler(PlainlmError)
    async def plainlm_error(_: HTTPRequest, error: PlainlmError) -> JSONResponse:
        return error_response(status_of(error), str(error))

    @app.exception_handler(HTTPException)
    async def http_error(_: HTTPRequest, error: HTTPException) -> JSONResponse:
        return error_response(error.status_code, str(error.detail))

    @app.exception_handler(Exception)
    async def bug(_: HTTPRequest, error: Exception) -> JSONResponse:
        log.exception("a request failed")  # the traceback goes to the log; the server goes on
        return error_response(500, f"internal error: {type(error).__name__}: {error}")

    app.get("/")(routes.chat_page)
    app.get("/health")(routes.health)
    app.get("/v1/models")(routes.models)
    app.post("/tokenize")(routes.tokenize)
    app.get("/tokenizer_info")(routes.tokenizer_info)
    app.post("/detokenize")(routes.detokenize)
    app.post("/v1/chat/completions")(routes.chat_completions)
    app.post("/v1/completions")(routes.completions)
    app.post("/v1/load_lora_adapter")(routes.load_lora_adapter)
    app.post("/v1/unload_lora_adapter")(routes.unload_lora_adapter)
    return app


class Routes:
    """The endpoints, each a method: what it reads from the body, what it asks the engine, what it answers."""

    def __init__(self, engine: Engine, served_model_name: str) -> None:
        self.engine, self.tokenizer = engine, engine.tokenizer
        self.served_model_name = served_model_name
        self.created = int(time.time())
        self._stop_lock, self._stopped = threading.Lock(), False

    def stop_engine(self) -> None:
        """Stop the engine once, whoever asks first (a signal handler or the app's shutdown)."""
        with self._stop_lock:
            if not self._stopped:
                self._stopped = True
                self.engine.stop()

    # --- information ---
    async def chat_page(self) -> HTMLResponse:
        page = resources.files("plainlm.serve").joinpath("static/chat.html")
        if not page.is_file():
            raise HTTPException(404, "this installation has no chat page (plainlm/serve/static/chat.html)")
        return HTMLResponse(page.read_text(encoding="utf-8"))

    async def health(self) -> dict:
        """200 while the server answers, with the KV pool's counters: blocks held by running requests, blocks
        kept in the prefix cache (free to reuse), and the pool's size; with a draft, how it has done so far."""
        pool = self.engine.pool
        health = {
            "status": "ok",
            "kv_blocks_used": pool.used_blocks,
            "kv_blocks_cached": pool.cached_blocks,
            "kv_blocks_total": pool.num_blocks,
        }
        if self.engine.draft is not None:
            stats = self.engine.speculation
            health["speculative"] = {
                "verifications": stats.verifications,
                "proposed_tokens": stats.proposed,
                "accepted_tokens": stats.accepted,
                "acceptance_rate": round(stats.acceptance_rate, 4),
                "tokens_per_verification": round(stats.tokens_per_verification, 3),
            }
        return health

    async def models(self) -> dict:
        base = self._model_card(self.served_model_name, parent=None)
        adapters = self.engine.adapters.names if self.engine.adapters is not None else []
        return {"object": "list", "data": [base, *(self._model_card(n, self.served_model_name) for n in adapters)]}

    def _model_card(self, name: str, parent: str | None) -> dict:
        return {
            "id": name,
            "object": "model",
            "created": self.created,
            "owned_by": "plainlm",
            "root": name,
            "parent": parent,
            "max_model_len": self.engine.max_seq_length,
        }

    def adapter_for(self, model: str | None) -> str | None:
        """The adapter a request's `model` names: None for the base model; NotFound (404) for an unknown name."""
        if model is None or model == self.served_model_name:
            return None
        if self.engine.adapters is not None and model in self.engine.adapters.names:
            return model
        adapters = list(self.engine.adapters.names) if self.engine.adapters is not None else []
        served = ", ".join(repr(n) for n in [self.served_model_name, *adapters])
        raise NotFound(f"the model {model!r} is not served here; this server serves {served} (GET /v1/models)")

    # --- tokens ---
    async def tokenize(self, body: TokenizeRequest) -> dict:
        self.adapter_for(body.model)
        if (body.prompt is None) == (body.messages is None):
            raise InvalidInput("send either 'prompt' (a text) or 'messages' (a conversation), not both or neither")
        if body.messages is not None:
            text = self._chat_prompt_text(body.messages, body.add_generation_prompt)
            tokens = self.tokenizer.encode(text, bos=False)  # the template writes its own BOS
        else:
            tokens = self.tokenizer.encode(body.prompt, bos=None if body.add_special_tokens else False)
        return {"count": len(tokens), "max_model_len": self.engine.max_seq_length, "tokens": tokens}

    async def tokenizer_info(self) -> dict:
        """vLLM's /tokenizer_info: what a client needs to tokenize as the server does (lm-eval's remote tokenizer)."""
        tokenizer = self.tokenizer
        return {
            "tokenizer_class": "plainlm.tokenizer.Tokenizer",
            "bos_token": tokenizer.bos_token,
            "eos_token": tokenizer.eos_token,
            "chat_template": tokenizer.chat_template,
            "model_max_length": self.engine.max_seq_length,
        }

    async def detokenize(self, body: DetokenizeRequest) -> dict:
        self.adapter_for(body.model)
        vocab_size = self.engine.llm.model.config.vocab_size
        if any(not 0 <= t < vocab_size for t in body.tokens):
            raise InvalidInput(f"token ids must be in [0, {vocab_size}), the model's vocabulary")
        return {"prompt": self.tokenizer.decode(body.tokens)}

    def _chat_prompt_text(self, messages: list, add_generation_prompt: bool = True) -> str:
        return self.tokenizer.apply_chat_template(
            [m.for_template() for m in messages], add_generation_prompt=add_generation_prompt
        )

    # --- adapters (vLLM's routes and bodies) ---
    def load_lora_adapter(self, body: LoadLoraRequest) -> PlainTextResponse:
        # A plain `def`: FastAPI runs it in a worker thread, so reading the weights does not block streams.
        # The engine swaps adapters between two of its steps (the model must not change during one).
        if body.lora_name == self.served_model_name:
            raise InvalidInput(f"the name {body.lora_name!r} is the base model's; pick another")
        self.engine.load_adapter(body.lora_name, body.lora_path)
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")

    def unload_lora_adapter(self, body: UnloadLoraRequest) -> PlainTextResponse:
        self.engine.unload_adapter(body.lora_name)
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")

    # --- generation ---
    async def chat_completions(self, body: ChatCompletionRequest, http: HTTPRequest) -> Any:
        if body.top_logprobs and not body.logprobs:
            raise InvalidInput("top_logprobs: set logprobs to true to ask for top_logprobs")
        prompt = self.tokenizer.encode(self._chat_prompt_text(body.messages), bos=False)
        max_tokens = body.max_completion_tokens or body.max_tokens
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        requests = self.requests(body, [prompt], max_tokens, logprobs=logprobs)
        call = self._call_info("chat.completion", body)
        choices = Choices(self.engine, requests)
        if body.stream:
            return EventStream(self._chat_chunks(choices, call, body, prompt_tokens=len(prompt)), choices)
        results = await self._collect(choices, http)
        if isinstance(results, Response):
            return results
        return {
            **call,
            "choices": [
                {
                    "index": i,
                    "message": {"role": "assistant", "content": r.text},
                    "logprobs": self._chat_logprobs(r.logprobs) if body.logprobs else None,
                    "finish_reason": r.finish_reason,
                }
                for i, r in enumerate(results)
            ],
            "usage": usage(results, prompts=[len(prompt)], drafted=self.engine.draft is not None),
        }

    async def completions(self, body: CompletionRequest, http: HTTPRequest) -> Any:
        prompts = self._completion_prompts(body.prompt)
        echo_logprobs = body.echo and body.logprobs is not None
        requests = self.requests(body, prompts, body.max_tokens, logprobs=body.logprobs, prompt_logprobs=echo_logprobs)
        call = self._call_info("text_completion", body)
        choices = Choices(self.engine, requests)
        if body.stream:
            return EventStream(self._completion_chunks(choices, call, body, prompts), choices)
        results = await self._collect(choices, http)
        if isinstance(results, Response):
            return results
        return {
            **call,
            "choices": [self._completion_choice(i, r, prompts[i // body.n], body) for i, r in enumerate(results)],
            "usage": usage(results, prompts=[len(p) for p in prompts], drafted=self.engine.draft is not None),
        }

    def _completion_prompts(self, prompt: str | list) -> list[list[int]]:
        """The token ids of each prompt: a text, token ids, or a batch of either."""
        if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
            prompt = [prompt]  # one prompt: a batch of one
        if not prompt:
            raise InvalidInput("prompt: the list is empty; send a text or token ids")
        vocab_size = self.engine.llm.model.config.vocab_size
        prompts = []
        for p in prompt:
            ids = self.tokenizer.encode(p) if isinstance(p, str) else p
            if any(not 0 <= t < vocab_size for t in ids):
                raise InvalidInput(f"prompt: token ids must be in [0, {vocab_size}), the model's vocabulary")
            prompts.append(ids)
        return prompts

    def requests(
        self,
        body: SamplingFields,
        prompts: list[list[int]],
        max_tokens: int | None,
        logprobs: int | None,
        prompt_logprobs: bool = False,
    ) -> list[Request]:
        """One engine Request per prompt and choice (prompt-major, as OpenAI numbers choices); checks what needs
        the model: the prompt and max_tokens against the context, the model name, the response format."""
        adapter = self.adapter_for(body.model)
        stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
        if any(not s for s in stop):
            raise InvalidInput("stop: a stop string must not be empty")
        requests = []
        for prompt in prompts:
            new_tokens = self._fit_max_tokens(len(prompt), max_tokens)
            for choice in range(body.n):
                params = SamplingParams(
                    max_new_tokens=new_tokens,
                    temperature=1.0 if body.temperature is None else body.temperature,
                    top_k=body.top_k if body.top_k and body.top_k > 0 else None,
                    top_p=body.top_p,
                    min_p=body.min_p,
                    seed=None if body.seed is None else body.seed + choice,  # n different draws, reproducibly
                )
                request = Request(
                    prompt=prompt,
                    params=params,
                    stop=stop,
                    adapter=adapter,
                    logprobs=logprobs,
                    prompt_logprobs=prompt_logprobs,
                    constraint=self._constraint(body.response_format),  # one each: a constraint has state
                )
                requests.append(request)
        return requests

    def _fit_max_tokens(self, prompt_tokens: int, max_tokens: int | None) -> int:
        """max_tokens, checked against the context; None: all the room the prompt leaves (vLLM's default)."""
        context = self.engine.max_seq_length
        if prompt_tokens == 0:
            raise InvalidInput("the prompt is empty: it needs at least one token")
        if prompt_tokens >= context:
            raise InvalidInput(
                f"the prompt is {prompt_tokens} tokens, but this model's context is {context} tokens "
                "(prompt and completion together): shorten the prompt"
            )
        room = context - prompt_tokens
        if max_tokens is not None and max_tokens > room:
            raise InvalidInput(
                f"max_tokens {max_tokens} is past the context: the prompt is {prompt_tokens} tokens and the "
                f"context {context}, so at most {room} new tokens fit"
            )
        return max_tokens if max_tokens is not None else room

    def _constraint(self, response_format: dict | None) -> Any:
        if response_format is None or response_format.get("type") == "text":
            return None
        if self.engine.structured is None:
            raise InvalidInput("response_format: this model's tokenizer cannot constrain outputs (see the log)")
        return self.engine.structured.constraint(response_format)

    def _call_info(self, kind: str, body: SamplingFields) -> dict:
        prefix = "chatcmpl" if kind == "chat.completion" else "cmpl"
        name = body.model or self.served_model_name
        return {"id": f"{prefix}-{uuid.uuid4().hex}", "object": kind, "created": int(time.time()), "model": name}

    @staticmethod
    async def _collect(choices: Choices, http: HTTPRequest) -> list[Result] | Response:
        """Every choice's Result, or the response to send instead: one nobody reads when the client has left,
        a 500 when the engine failed this request (it fails alone: the engine goes on with the others)."""
        results = await choices.results(http)
        if results is None:
            return Response(status_code=499)  # nginx's "client closed request"
        failed = next((r for r in results if r.finish_reason == "error"), None)
        if failed is not None:
            return error_response(500, f"the engine failed this request: {failed.error}")
        return results

    # --- streaming ---
    async def _chat_chunks(
        self, choices: Choices, call: dict, body: ChatCompletionRequest, prompt_tokens: int
    ) -> AsyncIterator[str]:
        call = {**call, "object": "chat.completion.chunk"}
        for index in range(len(choices.ids)):  # OpenAI's first chunk of each choice names the role
            delta = {"role": "assistant", "content": ""}
            yield sse({**call, "choices": [{"index": index, "delta": delta, "logprobs": None, "finish_reason": None}]})

        def choice(index: int, event: Event) -> dict | None:
            if not event.text and event.finish_reason is None:
                return None  # a prefill chunk, or text held back while it may start a stop string
            return {
                "index": index,
                "delta": {"content": event.text} if event.text else {},
                "logprobs": self._chat_logprobs(event.logprobs) if body.logprobs else None,
                "finish_reason": event.finish_reason,
            }

        async for chunk in stream_chunks(choices, call, choice, body, prompts=[prompt_tokens]):
            yield chunk

    async def _completion_chunks(
        self, choices: Choices, call: dict, body: CompletionRequest, prompts: list[list[int]]
    ) -> AsyncIterator[str]:
        # Where each choice's next piece's text_offset starts: with echo its text begins with the prompt,
        # without it the offsets still count from the prompt's end, as unstreamed.
        offsets: dict[int, int] = {}

        def choice(index: int, event: Event) -> dict | None:
            if not event.token_ids and event.finish_reason is None:
                return None
            prompt, first = prompts[index // body.n], index not in offsets
            if first:
                offsets[index] = 0 if body.echo else len(self.tokenizer.decode(prompt))
            # One event as a Result (its finish_reason None until the last); the engine sends the prompt's
            # logprobs with a request's first tokens, which is where echo puts the prompt.
            piece = self._completion_choice(
                index, Result.join([event]), prompt, body, echo=body.echo and first, text_offset=offsets[index]
            )
            if piece["logprobs"] is not None and piece["logprobs"]["tokens"]:  # on from this piece's last token
                offsets[index] = piece["logprobs"]["text_offset"][-1] + len(piece["logprobs"]["tokens"][-1])
            return piece

        async for chunk in stream_chunks(choices, call, choice, body, prompts=[len(p) for p in prompts]):
            yield chunk

    # --- logprobs, as each API writes them ---
    def _token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])

    def _chat_logprobs(self, logprobs: list[TokenLogprob] | None) -> dict:
        def entry(token_id: int, logprob: float) -> dict:
            text = self._token_text(token_id)
            return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

        content = [
            {**entry(t.token_id, t.logprob), "top_logprobs": [entry(i, lp) for i, lp in t.top]} for t in logprobs or []
        ]
        return {"content": content}

    def _completion_choice(
        self,
        index: int,
        result: Result,
        prompt: list[int],
        body: CompletionRequest,
        echo: bool | None = None,
        text_offset: int | None = None,
    ) -> dict:
        """A /v1/completions choice; with echo the text (and the logprobs) start with the prompt's. The first
        token's text_offset is text_offset (default: 0 with echo, else the prompt text's length)."""
        echo = body.echo if echo is None else echo
        prompt_text = self.tokenizer.decode(prompt) if echo else ""
        choice: dict[str, Any] = {"index": index, "text": prompt_text + result.text, "logprobs": None}
        if body.logprobs is not None:
            tokens = list(result.logprobs or [])
            if echo:
                tokens = list(result.prompt_logprobs or []) + tokens
            if text_offset is None:
                text_offset = 0 if echo else len(self.tokenizer.decode(prompt))
            choice["logprobs"] = self._legacy_logprobs(tokens, start=text_offset)
        choice["finish_reason"] = result.finish_reason
        return choice

    def _legacy_logprobs(self, tokens: list[TokenLogprob], start: int) -> dict:
        """OpenAI's legacy completions logprobs (what lm-eval's local-completions reads): per token its text,
        its logprob (None for the first prompt token, which has no context), a {text: logprob} dict of the
        top ones (the chosen token included, as vLLM does) and its character offset in the text."""
        texts = [self._token_text(t.token_id) for t in tokens]
        offsets = []
        for text in texts:
            offsets.append(start)
            start += len(text)
        token_logprobs, top_logprobs = [], []
        for t, text in zip(tokens, texts, strict=True):
            if math.isnan(t.logprob):
                token_logprobs.append(None)
                top_logprobs.append(None)
                continue
            token_logprobs.append(t.logprob)
            top = {self._token_text(i): lp for i, lp in t.top}
            top.setdefault(text, t.logprob)
            top_logprobs.append(top)
        return {"tokens": texts, "token_logprobs": token_logprobs, "top_logprobs": top_logprobs, "text_offset": offsets}


async def stream_chunks(
    choices: Choices,
    call: dict,
    choice: Callable[[int, Event], dict | None],
    body: SamplingFields,
    prompts: list[int],
) -> AsyncIterator[str]:
    """The server-sent events of a streamed call: each event as the chunk `choice(index, event)` writes (None:
    nothing to send yet), an error chunk for a choice the engine failed, the usage chunk when
    stream_options.include_usage asks for it, then [DONE]."""
    last: list[Event] = []  # each choice's last event, for the usage
    async for index, event in choices.events():
        if event.finish_reason is not None:
            last.append(event)
        if event.finish_reason == "error":
            yield sse({"error": {"message": event.error, "type": "server_error", "code": 500}})
            continue
        data = choice(index, event)
        if data is not None:
            yield sse({**call, "choices": [data]})
    if body.stream_options is not None and body.stream_options.include_usage:
        drafted = choices.engine.draft is not None
        yield sse({**call, "choices": [], "usage": usage(last, prompts=prompts, drafted=drafted)})
    yield sse("[DONE]")


def usage(results: list[Result] | list[Event], prompts: list[int], drafted: bool = False) -> dict:
    """OpenAI's usage: each prompt counted once (n choices share it), every choice's new tokens (from its
    Result, or its last Event). `drafted`: the server decodes speculatively; the draft's proposals kept and
    refused are reported under OpenAI's names for a prediction's tokens."""
    completion = sum(r.completion_tokens for r in results)
    cached = sum(r.cached_tokens for r in results)
    prompt = sum(prompts)
    counts = {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": cached},
    }
    if drafted:
        counts["completion_tokens_details"] = {
            "accepted_prediction_tokens": sum(r.accepted_draft_tokens for r in results),
            "rejected_prediction_tokens": sum(r.rejected_draft_tokens for r in results),
        }
    return counts


# --- the server ---
class Server(uvicorn.Server):
    """uvicorn's server, which also says when it is ready, and on SIGINT or SIGTERM stops the engine first:
    the running requests end with "abort", so open streams finish and uvicorn's graceful shutdown does not
    wait on them."""

    def __init__(self, config: uvicorn.Config, routes: Routes, ready_line: str) -> None:
        super().__init__(config)
        self.routes, self.ready_line = routes, ready_line

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=sockets)
        if not self.should_exit:
            print(self.ready_line, flush=True)

    def handle_exit(self, sig: int, frame: Any) -> None:
        # In a thread: this runs inside a signal handler, and stopping waits for the engine's current step.
        threading.Thread(target=self.routes.stop_engine, daemon=True).start()
        super().handle_exit(sig, frame)


def run_server(app: FastAPI, sock: socket.socket) -> None:
    """Serve `app` on `sock` (from `bind`) until SIGINT or SIGTERM; prints one line with the address once it
    answers. uvicorn's own log is kept to warnings: the address line and errors are what a user reads."""
    host, port = sock.getsockname()[:2]
    address = f"http://{host if ':' not in host else f'[{host}]'}:{port}"
    routes = app.state.routes
    ready = f"plainlm serve: {routes.served_model_name} at {address} (OpenAI API under {address}/v1, chat page at /)"
    config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5)
    Server(config, routes, ready).run(sockets=[sock])


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on host:port (port 0: a free one), or an InvalidInput that says what to change;
    bound before the model loads, so a port in use fails at once."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise InvalidInput(
            f"cannot listen on {host}:{port}: {e.strerror}; pick another --port (0: any free one) or --host"
        ) from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock
