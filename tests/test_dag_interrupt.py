"""Ctrl-C on the NPU path: SIGINT during DAG prefill or decode stops cleanly with the partial
result, the cache holds exactly the committed tokens, exit code 130."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

CHILD = textwrap.dedent("""
    import json, os, signal, sys
    sys.path.insert(0, {tests!r})
    from mllm_deploy.model import load_weights, read_spec
    from mllm_deploy.plan import build_plan
    from mllm_deploy.profile import load_profile
    from mllm_deploy.resolve import resolve
    from mllm_deploy.runtime.dag_engine import DagEngine
    from mllm_deploy.runtime.engine import with_subgraph_events
    from mllm_deploy.runtime.dag_prefill import DagPrefill
    from mllm_deploy.events import SubgraphFinished, TokenEmitted
    from mllm_deploy.forward.float_engine import FloatEngine
    from mllm_deploy.runtime.generate import GenerationRequest, generate
    from mllm_deploy.interface.turns import run_turn
    from npu_doubles import FloatKernels
    from plan_fixtures import pinned_host

    mode, path = sys.argv[1], sys.argv[2]
    spec = read_spec(path)
    weights = load_weights(spec, use_cache=False)
    loaded = load_profile(None, [f"model.source={{path}}", "device.npu_backend=ort-cpu", "prefill.chunk_size=8",
                                 "prefill.max_context=256", "outliers.prune_fraction=1.0"])
    resolved = resolve(loaded, pinned_host(), spec)
    fe = FloatEngine(weights)
    prefill = DagPrefill(weights, fe.rope, FloatKernels(weights, 8), lambda n: build_plan(resolved, prompt_tokens=n),
                         chunk_tokens=8, policy="out-of-order", cpu_threads=1)
    engine = DagEngine(fe, prefill, None, npu_label="test double")
    cache = engine.new_cache(256)
    prompt = [3 + (i * 7) % 250 for i in range(80)]  # 10 chunks

    class Detok:
        def push(self, t): return f"<{{t}}>"
        def finish(self): return ""

    def on_event(event):
        if mode == "prefill" and isinstance(event, SubgraphFinished) and event.id == "c3.L0.attention":
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C in the middle of the DAG
        if mode == "decode-self" and isinstance(event, TokenEmitted) and event.index == 2:
            os.kill(os.getpid(), signal.SIGINT)

    def turn(cancel):
        engine.cancel = cancel
        request = GenerationRequest(max_new_tokens=200 if mode != "decode-wait" else 100000, chunk_size=8)
        return with_subgraph_events(generate(engine, cache, prompt, request, Detok(), cancel), engine)

    def on_text(text):
        sys.stdout.write(text); sys.stdout.flush()

    done = run_turn(turn, on_text, on_event)
    print()
    print(json.dumps({{"finish": done.finish_reason, "prefilled": done.prefilled_tokens, "generated": done.generated_tokens,
                      "cache": cache.length, "cache_ids_ok": cache.token_ids == (prompt + done.token_ids)[: cache.length]}}))
    engine.close()
    sys.exit(130 if done.finish_reason == "cancelled" else 0)
""")


def start(mode: str, tiny, tmp_path) -> subprocess.Popen:
    tests = str(Path(__file__).parent)
    script = tmp_path / "child.py"
    script.write_text(CHILD.format(tests=tests))
    env = {**os.environ, "MLLM_DEPLOY_CACHE": str(tmp_path / "cache")}
    return subprocess.Popen([sys.executable, str(script), mode, str(tiny)], stdout=subprocess.PIPE, text=True, env=env)


def result(proc: subprocess.Popen, timeout: float = 120) -> tuple[int, str, dict]:
    out, _ = proc.communicate(timeout=timeout)
    lines = out.strip().splitlines()
    return proc.returncode, "\n".join(lines[:-1]), json.loads(lines[-1])


def test_ctrl_c_during_dag_prefill_keeps_whole_chunks(tiny_gguf, tmp_path):
    code, text, info = result(start("prefill", tiny_gguf, tmp_path))
    assert code == 130 and info["finish"] == "cancelled"
    assert info["generated"] == 0 and text == ""
    assert 0 <= info["cache"] < 80 and info["cache"] % 8 == 0 and info["prefilled"] == info["cache"]
    assert info["cache_ids_ok"]


def test_ctrl_c_during_decode_returns_the_tokens_so_far(tiny_gguf, tmp_path):
    code, text, info = result(start("decode-self", tiny_gguf, tmp_path))
    assert code == 130 and info["finish"] == "cancelled"
    assert info["generated"] == 3 and text.count("<") == 3
    assert info["prefilled"] == 80 and info["cache"] == 80 + 2  # the last token is never fed back
    assert info["cache_ids_ok"]


def test_sigint_from_outside_stops_a_long_generation(tiny_gguf, tmp_path):
    proc = start("decode-wait", tiny_gguf, tmp_path)
    first = proc.stdout.read(1)  # the first token's text has started streaming
    assert first == "<"
    proc.send_signal(signal.SIGINT)
    code, _, info = result(proc)
    assert code == 130 and info["finish"] == "cancelled" and 1 <= info["generated"] < 100000
    assert info["cache"] == 80 + info["generated"] - 1 and info["cache_ids_ok"]
