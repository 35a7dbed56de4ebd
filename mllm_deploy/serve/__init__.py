"""`serve`: the deployment as a local OpenAI-compatible HTTP server (a front end beside cli/ and tui/).

Starlette (a small, well-kept ASGI core: routing, requests, streaming responses; our own strict
pydantic schemas and OpenAI-style errors rather than a framework's) on uvicorn. Requests go
through the interface layer's `ChatSession` on one engine worker thread, as `run` and `chat` do.

Modules: `schemas` (request models, error object, body decoding), `queue` (the fair queue),
`worker` (the engine's thread: KV slots, busy time), `metrics` (Prometheus), `sse` (response
objects and server-sent events), `app` (the endpoints), `server` (uvicorn, loading, signals).
"""
