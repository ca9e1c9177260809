"""LLM fixtures for the knowledge tests: a tiny randomly initialised Llama with a tokenizer trained in the test.

It has the exact code path of a real model (transformers loading, chat template, generate, base-model pooling)
at a size that runs in milliseconds, and it is built offline.
"""

from __future__ import annotations

from pathlib import Path

import pytest

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_tiny_model(out: Path, corpus: list[str], seed: int = 0) -> Path:
    """A 2-layer Llama (hidden 32) and a BPE tokenizer trained on corpus, saved as a Hugging Face folder."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<unk>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
    )
    fast.chat_template = CHAT_TEMPLATE
    out.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(out)

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(fast),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        bos_token_id=fast.bos_token_id,
        eos_token_id=fast.eos_token_id,
        pad_token_id=fast.pad_token_id,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        # Zero the output rows of special and whitespace-only tokens: their logit is then 0 while the best other
        # token's is positive, so greedy decoding of this random model writes visible text instead of stopping.
        for tid in range(len(fast)):
            if tid in fast.all_special_ids or not fast.decode([tid]).strip():
                model.lm_head.weight[tid].zero_()
    model.save_pretrained(out, safe_serialization=True)
    return out


def corpus_for(data_dir: Path) -> list[str]:
    """Template text and the dataset's titles/categories, so that the tokenizer covers what prompts contain."""
    import pandas as pd

    from offline.knowledge import prompts as P

    items = pd.read_csv(data_dir / "items.csv", dtype=str, keep_default_na=False)
    scen = pd.read_csv(data_dir / "scenarios.csv", dtype=str, keep_default_na=False)
    return (
        list(P.TEMPLATES.values()) + items["title"].tolist() + items["category"].tolist() + scen["description"].tolist()
    )


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory, synth_dir) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-llm") / "model", corpus_for(synth_dir))


def knowledge_config(data, out, model, **kw):
    """A knowledge build of the tiny model on CPU in float32, no progress bars (short answers: 6 new tokens)."""
    from offline.knowledge.backends.base import BackendConfig
    from offline.knowledge.build import KnowledgeConfig

    backend = BackendConfig(model=str(model), dtype="float32", max_new_tokens=kw.pop("max_new_tokens", 6))
    return KnowledgeConfig(data=str(data), out=str(out), backend=backend, progress=False, **kw)


def counting_executor(backend_config, counts: dict):
    """The real in-process executor, counting the texts it is asked to process per operation into counts."""
    from offline.knowledge.local_executor import LocalExecutor

    class CountingExecutor(LocalExecutor):
        def map(self, op, shards, pooling, progress=None):
            counts[op] = counts.get(op, 0) + sum(len(s) for s in shards)
            yield from super().map(op, shards, pooling, progress)

    return CountingExecutor(backend_config)


def kill_build_after_shards(argv: list[str], out: Path, shard_glob: str, shards: int = 3) -> set[str]:
    """Runs `llm4msr <argv> --out OUT` in a subprocess and SIGKILLs it once `shards` files matching
    OUT/*/_work/<shard_glob> exist; asserts nothing became visible; returns the names of the finished shard files."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from shared.knowledge.snapshot import MANIFEST

    repo = Path(__file__).resolve().parents[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "llm4msr_cli", *argv, "--out", str(out)],
        cwd=repo,
        env=dict(os.environ, PYTHONPATH=str(repo)),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 240
    try:
        while time.time() < deadline and proc.poll() is None:
            if len(list(out.glob(f"*/_work/{shard_glob}"))) >= shards:
                break
            time.sleep(0.005)
        assert proc.poll() is None, "the build ended before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert not list(out.glob(f"*/{MANIFEST}")), "killed build must not be visible"
    return {p.name for p in out.glob("*/_work/*.parquet")}
