"""Serving: `plainlm serve`, an OpenAI-compatible server over one engine (docs/serving.md).

engine.py      the scheduler loop: queue, chunked prefill, batched decode, per-row sampling, release
kv_pool.py     the paged KV cache: one pool of fixed-size blocks, block tables, the prefix cache
adapters.py    many LoRA adapters over one base, each batch row applying only its own
structured.py  grammar-constrained sampling for response_format (JSON object / JSON schema)
app.py         FastAPI routes, OpenAI responses and errors, server-sent events, the uvicorn server
schemas.py     the OpenAI request bodies (pydantic), checked as OpenAI checks them
static/        the chat page served at /
The command itself, `plainlm serve`, is plainlm/cli.py's `serve`: it loads the model and runs app.py's server.
"""
