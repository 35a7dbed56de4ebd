"""The host estimate against a real `bench` run in the same session (issue 18: within +-25%).

Costs ~8 s on 2 loaded cores (one bench of the default profile at 64 and 256 tokens, two repeats,
in a worker process, and the estimate's own attention timing), so it is not marked slow. Robust to a shared machine's noise: the prediction must lie within
25% of some run of the measured spread ([0.75 x slowest, 1.25 x fastest]); the attention kernel the
estimate times and the bench both run under the same load. Out-of-order (the default policy) at
short prompts is what this band holds; docs/estimate.md has the full error table, misses included.
"""

from __future__ import annotations

import json

from mllm_deploy.cli import main
from mllm_deploy.errors import ExitCode

LENGTHS = "64,256"


def test_host_estimate_agrees_with_bench_within_25_percent(capsys) -> None:
    assert main(["bench", "--prompt-tokens", LENGTHS, "--repeat", "2", "--warmup", "1", "--gen-tokens", "8",
                 "--json"]) == ExitCode.OK  # fmt: skip
    measured = {r["prompt_tokens"]: r for r in json.loads(capsys.readouterr().out)}
    assert main(["estimate", "--prompt-tokens", LENGTHS, "--json"]) == ExitCode.OK
    predicted = {r["prompt_tokens"]: r for r in json.loads(capsys.readouterr().out)}
    assert set(predicted) == set(measured) == {64, 256}
    for n, row in predicted.items():
        spread = measured[n]["prefill_tokens_per_s_spread"]
        low, high = 0.75 * spread["min"], 1.25 * spread["max"]
        assert low <= row["prefill_tokens_per_s"] <= high, (n, row["prefill_tokens_per_s"], spread)
        decode = measured[n]["decode_tokens_per_s"]
        assert 0.75 * decode <= row["decode_tokens_per_s"] <= 1.25 * decode, (n, row["decode_tokens_per_s"], decode)
        assert row["device"] == "host" and "measured" in row["calibration"]
