"""Shared-prefix reuse and token-budget batches of the hf backend (issue 12, items 3 and 4).

Every scenario and user prompt starts with the same preamble; the backend runs the longest token prefix that texts
of a call share once and reuses its KV cache. The vectors must equal those of a plain full forward of each text
(cosine >= 0.9999, mean and last pooling) and greedy answers must be the same text, with the tiny test model and
with the embedded SmolLM2 in float32. Texts without the prefix (item texts) take the plain path.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from fixtures_llm import tiny_model  # noqa: F401  (fixture)

from offline.data.split import make_split
from offline.knowledge import prompts as P
from offline.knowledge.backends import BackendConfig, make_backend
from offline.knowledge.backends.base import cut_token_ids, model_texts
from offline.knowledge.backends.hf import MIN_PREFIX_TOKENS, plan_batches, shared_prefix_groups
from shared.dataset.folder import read_dataset
from shared.errors import UserFacingError

# ----------------------------------------------------------------------------------------------- helpers


def _prompts(data_dir: Path, users: int) -> tuple[str, list[str], list[str], list[str]]:
    """(preamble, scenario prompts, the first `users` user prompts, item texts) of a dataset folder."""
    ds = read_dataset(data_dir)
    user_prompts = list(P.user_prompts(ds, make_split(ds)).values())[:users]
    return P.preamble(ds), list(P.scenario_prompts(ds).values()), user_prompts, list(P.item_texts(ds).values())


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def _full_forward(hf, texts: list[str]) -> dict[str, np.ndarray]:
    """The reference: each text alone through the base model (no batch, no padding, no cache), pooled both ways."""
    import torch

    ids = cut_token_ids(hf.tokenizer, texts, "embed", hf.config.max_length)
    mean, last = [], []
    with torch.inference_mode():
        for seq in ids:
            hidden = hf.base(input_ids=torch.tensor([seq])).last_hidden_state[0].float()
            mean.append(hidden.mean(0).numpy())
            last.append(hidden[-1].numpy())
    return {"mean": np.stack(mean), "last": np.stack(last)}


def _full_generate(hf, prompts: list[str]) -> list[str]:
    """The reference answers: each prompt alone through transformers' greedy generate (no padding, no cache)."""
    import torch

    texts = model_texts(hf.tokenizer, prompts, "generate", True)
    out = []
    with torch.inference_mode():
        for seq in cut_token_ids(hf.tokenizer, texts, "generate", hf.config.max_length):
            x = torch.tensor([seq])
            gen = hf.lm.generate(
                input_ids=x,
                attention_mask=torch.ones_like(x),
                max_new_tokens=hf.config.max_new_tokens,
                do_sample=False,
                pad_token_id=hf.tokenizer.pad_token_id,
            )
            out.append(hf.tokenizer.decode(gen[0, len(seq) :], skip_special_tokens=True).strip())
    return out


def _assert_prefix_parity(hf, prompts: list[str], items: list[str], gen_prompts: list[str], preamble_tokens: int):
    """The backend's vectors (prefix reuse on, prompts and items in one call) against each text's full forward."""
    texts = prompts + items
    ref = _full_forward(hf, texts)
    for pooling in ("mean", "last"):
        before = dict(hf.token_stats)
        got = hf.embed(texts, pooling)
        reused = hf.token_stats["reused"] - before["reused"]
        # The prompts shared at least the preamble, run once for all of them; the items took the plain path.
        assert reused >= (len(prompts) - 1) * preamble_tokens, (reused, preamble_tokens)
        cos = _cosines(got, ref[pooling])
        # The relative error as well: the tiny random model attends almost uniformly, so a wrong position (or a
        # missing prefix token) moves its cosine by only ~1e-6, but its vectors by ~1e-3.
        rel = np.linalg.norm(got - ref[pooling], axis=1) / np.linalg.norm(ref[pooling], axis=1)
        print(
            f"prefix reuse vs full forward, {pooling} pooling: min cosine {cos.min():.7f}, max rel. error {rel.max():.1e}"
        )
        assert cos.min() >= 0.9999, (pooling, cos)
        assert rel.max() < 1e-4, (pooling, rel)
    want = _full_generate(hf, gen_prompts)
    got = hf.generate(gen_prompts)
    assert got == want
    assert any(got), "greedy decoding wrote nothing: the comparison would be vacuous"


# ----------------------------------------------------------------------------------------------- the prompts


def _templated_head(tokenizer, preamble: str) -> str:
    """What precedes every generation prompt's own part: the chat template's opening and the preamble."""
    marker = "\x00"
    return model_texts(tokenizer, [marker], "generate", True)[0].split(marker)[0] + preamble


@pytest.mark.parametrize("model", ["tiny", "smollm2"])
def test_every_prompt_starts_with_the_preamble_tokens(model, tiny_model, synth_dir):  # noqa: F811
    """The token ids (not only the text) of every scenario and user prompt, as embedded and as chat-templated for
    generation, start with the preamble's ids, so one shared prefix covers them all."""
    from transformers import AutoTokenizer

    from offline.knowledge.models import resolve_model

    path = tiny_model if model == "tiny" else resolve_model(None)[0]
    tok = AutoTokenizer.from_pretrained(str(path))
    preamble, scenario, users, _ = _prompts(synth_dir, 20)
    prompts = scenario + users
    for op, head in (("embed", preamble), ("generate", _templated_head(tok, preamble))):
        head_ids = tok(head, add_special_tokens=op == "embed")["input_ids"]
        ids = cut_token_ids(tok, model_texts(tok, prompts, op, True), op, 2048)
        assert all(seq[: len(head_ids)] == head_ids for seq in ids), op
        groups = shared_prefix_groups(ids)
        assert len(groups) == 1 and sorted(groups[0][1]) == list(range(len(prompts))), op
        assert groups[0][0] >= len(head_ids) >= MIN_PREFIX_TOKENS, (op, groups[0][0], len(head_ids))


# ----------------------------------------------------------------------------------------------- planning


def test_shared_prefix_groups():
    a = list(range(100, 140))  # a 40-token shared head
    b = list(range(500, 530))
    ids = [
        a + [1, 2, 3],  # 0
        a + [1, 2, 4, 5],  # 1: shares a + [1, 2] with 0
        [7, 8, 9],  # 2: an item text, too short to share
        a + [9],  # 3
        b + [1],  # 4: another family, alone: plain
        list(range(100, 110)) + [0] * 20,  # 5: shares only 10 tokens (< MIN_PREFIX_TOKENS) with the a-family
    ]
    groups = dict((tuple(rows), n) for n, rows in shared_prefix_groups(ids, min_tokens=16))
    assert groups == {(0, 1, 3): 40, (2, 4, 5): 0}
    # Identical texts keep one token of their own (to pool, or to predict from).
    assert shared_prefix_groups([a, a, a], min_tokens=16) == [(39, [0, 1, 2])]
    # Two texts whose common part extends past the head share all of it.
    assert shared_prefix_groups([a + [1, 2, 3], a + [1, 2, 4]], min_tokens=16) == [(42, [0, 1])]
    assert shared_prefix_groups([], min_tokens=16) == []


@pytest.mark.parametrize(
    ("lengths", "budget", "count", "extra", "expected"),
    [
        # Token budget: 10 short texts of 10 tokens fill 50-token batches by five; long texts go alone or in pairs.
        ([10] * 10, 50, 16, 0, [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]),
        ([25, 10, 25, 10, 10], 50, 16, 0, [[0, 2], [1, 3, 4]]),
        # Padding stays within 10% of a batch's input tokens: the 5-token text would pad 15 of 40.
        ([10, 10, 9, 5], 100, 16, 0, [[0, 1, 2], [3]]),
        # A text longer than the budget is never dropped: it goes alone.
        ([80, 10, 10], 50, 16, 0, [[0], [1, 2]]),
        # Generation reserves room for the new tokens.
        ([10] * 4, 60, 16, 5, [[0, 1, 2, 3]]),
        ([10] * 4, 40, 16, 10, [[0, 1], [2, 3]]),
        # Budget 0: fixed batches of `count` texts, longest first.
        ([3, 9, 5, 7], 0, 2, 0, [[1, 3], [2, 0]]),
    ],
)
def test_plan_batches(lengths, budget, count, extra, expected):
    batches = plan_batches(lengths, range(len(lengths)), budget, count, extra)
    assert batches == expected
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))


def test_bad_batch_settings_fail_with_one_line_naming_the_flag():
    with pytest.raises(UserFacingError, match=r"^--batch-tokens must be 0 .* got -1$"):
        BackendConfig(batch_tokens=-1)
    with pytest.raises(UserFacingError, match=r"^--batch-size must be positive, got 0$"):
        BackendConfig(batch_size=0)


def test_token_budget_puts_short_texts_in_large_batches(tiny_model, synth_dir):  # noqa: F811
    """With a budget, item texts go many to a batch and prompts few, and every vector equals the fixed-count one."""
    _, _, users, items = _prompts(synth_dir, 6)
    texts = users + items[:60]
    sizes: dict[str, list[int]] = {"tokens": [], "count": []}
    vectors = {}
    for name, batch_tokens in (("tokens", 1024), ("count", 0)):
        cfg = BackendConfig(
            model=str(tiny_model), dtype="float32", batch_size=4, batch_tokens=batch_tokens, prefix_reuse=False
        )
        with make_backend(cfg) as hf:
            vectors[name] = hf.embed(texts, "mean", progress=sizes[name].append)
            lengths = [len(s) for s in cut_token_ids(hf.tokenizer, texts, "embed", cfg.max_length)]
    assert sizes["count"] == [4] * (len(texts) // 4) + ([len(texts) % 4] if len(texts) % 4 else [])
    plan = plan_batches(lengths, range(len(texts)), 1024, 4)
    assert sizes["tokens"] == [len(b) for b in plan]  # the backend ran exactly the planned batches
    for batch in plan:
        longest = max(lengths[i] for i in batch)
        assert len(batch) * longest <= 1024 or len(batch) == 1
        assert sum(lengths[i] for i in batch) >= 0.9 * len(batch) * longest  # padding <= 10%
    # Longest first: the prompts come first, fewer than 4 to a batch; the items go many to a batch.
    prompt_batches = [b for b in plan if set(b) <= set(range(len(users)))]
    item_batches = [b for b in plan if not set(b) & set(range(len(users)))]
    assert plan[0][0] < len(users) and max(map(len, prompt_batches)) < 4 < min(map(len, item_batches[:-1]))
    assert max(map(len, item_batches)) >= 16
    assert _cosines(vectors["tokens"], vectors["count"]).min() >= 0.9999


# ----------------------------------------------------------------------------------------------- parity


def test_prefix_reuse_equals_full_forward_tiny(tiny_model, synth_dir):  # noqa: F811
    preamble, scenario, users, items = _prompts(synth_dir, 6)
    cfg = BackendConfig(model=str(tiny_model), dtype="float32", max_new_tokens=12, batch_tokens=2048)
    with make_backend(cfg) as hf:
        assert hf.prefix_reuse
        n = len(hf.tokenizer(preamble)["input_ids"])
        _assert_prefix_parity(hf, scenario + users, items[:8], scenario[:1] + users[:3], n)


def test_prefix_reuse_off_runs_every_text_in_full(tiny_model, synth_dir):  # noqa: F811
    _, scenario, users, _ = _prompts(synth_dir, 3)
    with make_backend(BackendConfig(model=str(tiny_model), dtype="float32", prefix_reuse=False)) as hf:
        hf.embed(scenario + users, "mean")
        assert hf.token_stats["reused"] == 0 and hf.token_stats["tokens"] > 0


@pytest.mark.slow
def test_prefix_reuse_equals_full_forward_smollm2(synth_dir):
    """The embedded SmolLM2 in float32: mean and last pooling, and greedy answers, as the full forward gives them."""
    preamble, scenario, users, items = _prompts(synth_dir, 2)
    with make_backend(BackendConfig(dtype="float32", max_new_tokens=12)) as hf:
        assert hf.prefix_reuse
        n = len(hf.tokenizer(preamble)["input_ids"])
        _assert_prefix_parity(hf, scenario[:1] + users, items[:2], scenario[:1] + users[:1], n)
