"""The interface layer: the one front door of the CLI, the TUI, the bench and the tests.

    deployment = load_deployment(profile_arg, overrides)   # load + resolve once (+ plan on demand)
    model = load_model(deployment)                         # weights, tokenizer, template, engine
    session = ChatSession(model, deployment.loaded)        # a conversation over one KV cache
    done = run_turn(lambda cancel: session.send("Hi", cancel=cancel), print)

Artifacts are obtained here (a bundle's, or built into the cache) before an engine opens: the
runtime below never compiles.

Modules: `deployment` (load + resolve; light, no onnxruntime), `engines` (obtain artifacts, open
an engine), `session` (models and conversations), `turns` (drive a turn), `batch` (the JSONL
batch format). Import from them: this package's own import stays light for the CLI's start-up.
"""
