"""Hugging Face transformers backend: the embedded default and the test backend (CPU or GPU).

Embedding runs the base model (not the LM head, whose 49k-way logits at every position cost ~6x). Three things keep
the model busy with useful tokens only:

- Batches by token budget (`batch_tokens`): texts in length order, as many per batch as fit the budget of padded
  tokens (and keep padding under MAX_PADDING), so short item texts go in large batches and long prompts in small
  ones.
- Shared-prefix reuse (`prefix_reuse`): every scenario and user prompt starts with the same scenario preamble (and,
  generating, the chat template's system turn). The longest token prefix that texts of a call share is run once;
  its KV cache, expanded to the batch, serves every text, which then runs only its own suffix. Mean pooling adds
  the prefix's hidden states (the same for all texts: attention is causal), so the vectors equal the full forward's.
- Texts without such a prefix (item texts) take the plain path.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import numpy as np

from offline.knowledge.backends.base import (
    POOLINGS,
    Backend,
    BackendConfig,
    Progress,
    cut_token_ids,
    model_texts,
    resolve_dtype,
    resolve_threads,
)
from offline.knowledge.models import resolve_model
from offline.knowledge.tokens import auto_tokenizer_counter
from shared.errors import UserFacingError

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

# A shared prefix shorter than this is not worth its own forward pass and the cache copies.
MIN_PREFIX_TOKENS = 16
# Token-budget batches stop growing before padding exceeds this share of their input tokens: one batch of 180
# synthetic item texts (13-19 tokens) padded to the longest ran 0.88x the items/s of length-sorted batches of 16.
MAX_PADDING = 0.1


def _torch_dtype(name: str):
    import torch

    dtypes = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}
    if name not in dtypes:
        raise UserFacingError(f"unknown dtype {name!r}; expected one of {sorted(dtypes)}")
    return dtypes[name]


# ----------------------------------------------------------------------------------------------- planning


def plan_batches(
    lengths: Sequence[int],
    rows: Sequence[int],
    batch_tokens: int,
    batch_size: int,
    extra: int = 0,
    max_padding: float = MAX_PADDING,
) -> list[list[int]]:
    """`rows` in length order (longest first, so a memory problem shows at once) cut into batches.

    batch_tokens > 0: a text joins the batch while its padded tokens (texts x (longest + extra), extra being the
    tokens a generation appends) fit batch_tokens and its padding stays at most max_padding of its padded input
    tokens; a text longer than the budget goes alone. batch_tokens == 0: batch_size texts.
    """
    order = sorted(rows, key=lambda i: (-lengths[i], i))
    batches: list[list[int]] = []
    real = 0  # input tokens of the last batch
    for i in order:
        if batches:
            batch = batches[-1]
            longest = lengths[batch[0]]  # length order: the first is the longest
            if batch_tokens > 0:
                count = len(batch) + 1
                fits = (
                    count * (longest + extra) <= batch_tokens
                    and real + lengths[i] >= (1 - max_padding) * count * longest
                )
            else:
                fits = len(batch) < batch_size
            if fits:
                batch.append(i)
                real += lengths[i]
                continue
        batches.append([i])
        real = lengths[i]
    return batches


def _common_prefix(seqs: Sequence[Sequence[int]]) -> int:
    first = seqs[0]
    n = min(len(s) for s in seqs)
    for k in range(n):
        t = first[k]
        if any(s[k] != t for s in seqs):
            return k
    return n


def shared_prefix_groups(ids: Sequence[Sequence[int]], min_tokens: int = MIN_PREFIX_TOKENS) -> list[tuple[int, list]]:
    """[(shared prefix length, rows)]: texts grouped by their first min_tokens tokens; a group of two or more shares
    its longest common token prefix, kept one token short of its shortest text (each text needs a token of its own
    to pool or to predict from). Prefix length 0: the rows take the plain path."""
    keyed: dict[tuple[int, ...], list[int]] = {}
    plain: list[int] = []
    for i, seq in enumerate(ids):
        if len(seq) > min_tokens:
            keyed.setdefault(tuple(seq[:min_tokens]), []).append(i)
        else:
            plain.append(i)
    groups: list[tuple[int, list]] = []
    for rows in keyed.values():
        members = [ids[i] for i in rows]
        n = min(_common_prefix(members), min(len(s) for s in members) - 1) if len(rows) > 1 else 0
        if n >= min_tokens:
            groups.append((n, rows))
        else:
            plain.extend(rows)
    if plain:
        groups.append((0, sorted(plain)))
    return groups


def pad_ids(seqs: Sequence[Sequence[int]], pad_id: int, left: bool, device):
    """(input ids, attention mask) of token lists padded to the longest, as the tokenizer pads them."""
    import torch

    width = max(len(s) for s in seqs)
    x = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for r, s in enumerate(seqs):
        if s:
            span = slice(width - len(s), width) if left else slice(0, len(s))
            x[r, span] = torch.tensor(s, dtype=torch.long)
            mask[r, span] = 1
    return x.to(device), mask.to(device)


def _full_attention_only(config) -> bool:
    """Whether every layer attends to the whole context (a sliding-window layer's cache is another kind)."""
    types = getattr(config, "layer_types", None)
    if types is not None:
        return all(t == "full_attention" for t in types)
    return getattr(config, "sliding_window", None) is None or getattr(config, "use_sliding_window", True) is False


@dataclass
class _Prefix:
    """A shared prefix run once: its ids, per-layer keys/values (batch 1) and the sum of its final hidden states."""

    ids: list[int]
    kv: list[tuple[torch.Tensor, torch.Tensor]]
    hidden_sum: torch.Tensor  # [hidden], float32

    def cache(self, batch: int, config):
        """A fresh cache of the prefix for `batch` texts (the forward appends to it, so one per batch)."""
        from transformers import DynamicCache

        return DynamicCache(
            [(k.expand(batch, -1, -1, -1), v.expand(batch, -1, -1, -1)) for k, v in self.kv], config=config
        )


# ----------------------------------------------------------------------------------------------- the backend


class HFBackend(Backend):
    def __init__(self, config: BackendConfig):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if config.dtype == "auto":  # the build resolves it first; direct users (bench, tests) get it here
            choice = resolve_dtype(config.dtype, config.device)
            log.info("dtype %s: %s", choice.dtype, choice.reason)
            config = replace(config, dtype=choice.dtype)
        self.config = config
        self.threads = resolve_threads(config.threads)
        torch.set_num_threads(self.threads)
        path, self.model_name = resolve_model(config.model)
        self.tokenizer = AutoTokenizer.from_pretrained(str(path))
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.dtype = _torch_dtype(config.dtype)
        self.device = torch.device(config.device)
        self.lm = AutoModelForCausalLM.from_pretrained(str(path), dtype=self.dtype).to(self.device).eval()
        self.base = self.lm.base_model
        self.hidden_size = int(self.lm.config.hidden_size)
        # transformers 5 calls the KV cache argument `cache`, earlier releases `past_key_values`.
        params = inspect.signature(self.base.forward).parameters
        self._cache_arg = "cache" if "cache" in params else "past_key_values"
        self.prefix_reuse = config.prefix_reuse and self._prefix_supported()
        # Tokens of all texts processed, and how many of them a reused prefix spared the model (for the bench/logs).
        self.token_stats = {"tokens": 0, "reused": 0}
        log.info(
            "hf backend: %s (%s, %s, %d threads, hidden %d, %s, prefix reuse %s)",
            self.model_name,
            config.dtype,
            config.device,
            self.threads,
            self.hidden_size,
            f"batches of {config.batch_tokens} tokens" if config.batch_tokens else f"batches of {config.batch_size}",
            "on" if self.prefix_reuse else "off",
        )

    def _prefix_supported(self) -> bool:
        import transformers.cache_utils

        cfg = self.lm.config
        if getattr(cfg, "is_encoder_decoder", False) or not _full_attention_only(cfg):
            log.info("prefix reuse off: %s is not a decoder with full attention in every layer", self.model_name)
            return False
        if not hasattr(transformers.cache_utils, "DynamicLayer"):  # the per-layer cache API (transformers >= 4.56)
            log.info("prefix reuse off: this transformers release has no per-layer KV cache API")
            return False
        return True

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        return auto_tokenizer_counter(self.tokenizer)(texts)

    def _plan(self, ids: list[list[int]], op: str) -> list[tuple[int, list[list[int]]]]:
        """[(shared prefix length, batches of rows)]; batches are planned on full lengths, so that they are the same
        with and without prefix reuse."""
        groups = shared_prefix_groups(ids) if self.prefix_reuse else [(0, list(range(len(ids))))]
        lengths = [len(s) for s in ids]
        self.token_stats["tokens"] += sum(lengths)
        self.token_stats["reused"] += sum(n * (len(rows) - 1) for n, rows in groups)
        extra = self.config.max_new_tokens if op == "generate" else 0
        cfg = self.config
        return [(n, plan_batches(lengths, rows, cfg.batch_tokens, cfg.batch_size, extra)) for n, rows in groups]

    def _run_prefix(self, ids: list[int]) -> _Prefix:
        import torch

        x = torch.tensor([ids], dtype=torch.long, device=self.device)
        out = self.base(input_ids=x, use_cache=True)
        cache = getattr(out, self._cache_arg)
        kv = [(layer.keys, layer.values) for layer in cache.layers]
        return _Prefix(ids=list(ids), kv=kv, hidden_sum=out.last_hidden_state[0].float().sum(0))

    def embed(self, texts: Sequence[str], pooling: str, progress: Progress | None = None) -> np.ndarray:
        import torch

        if pooling not in POOLINGS:
            raise UserFacingError(f"unknown pooling {pooling!r}; expected one of {POOLINGS}")
        out = np.zeros((len(texts), self.hidden_size), dtype=np.float32)
        if not texts:
            return out
        ids = cut_token_ids(self.tokenizer, texts, "embed", self.config.max_length)
        pad_id = self.tokenizer.pad_token_id
        with torch.inference_mode():
            for n, batches in self._plan(ids, "embed"):
                prefix = self._run_prefix(ids[batches[0][0]][:n]) if n else None
                for idx in batches:
                    x, mask = pad_ids([ids[i][n:] for i in idx], pad_id, left=False, device=self.device)
                    kwargs: dict = {"input_ids": x, "attention_mask": mask}
                    if prefix is not None:
                        b, width = x.shape
                        kwargs["attention_mask"] = torch.cat([mask.new_ones(b, n), mask], 1)
                        # Right padding: every row's suffix starts at position n (one row of positions serves all).
                        kwargs["position_ids"] = torch.arange(n, n + width, device=self.device).unsqueeze(0)
                        kwargs[self._cache_arg] = prefix.cache(b, self.lm.config)
                        kwargs["use_cache"] = True
                    hidden = self.base(**kwargs).last_hidden_state.float()
                    if pooling == "mean":
                        m = mask.unsqueeze(-1).to(hidden.dtype)
                        total, count = (hidden * m).sum(1), mask.sum(1, keepdim=True).to(hidden.dtype)
                        if prefix is not None:  # the prefix's tokens belong to every text's mean
                            total, count = total + prefix.hidden_sum, count + n
                        pooled = total / count.clamp(min=1.0)
                    else:
                        last = mask.sum(1) - 1
                        pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
                    out[idx] = pooled.cpu().numpy()
                    if progress is not None:
                        progress(len(idx))
        return out

    def generate(self, prompts: Sequence[str], progress: Progress | None = None) -> list[str]:
        import torch

        answers = [""] * len(prompts)
        if not prompts:
            return answers
        texts = model_texts(self.tokenizer, prompts, "generate", self.config.chat_template)
        ids = cut_token_ids(self.tokenizer, texts, "generate", self.config.max_length)
        pad_id = self.tokenizer.pad_token_id
        with torch.inference_mode():
            for n, batches in self._plan(ids, "generate"):
                prefix = self._run_prefix(ids[batches[0][0]][:n]) if n else None
                for idx in batches:
                    # Left padding: [prefix][pads][suffix]; generate numbers positions from the attention mask, so
                    # each suffix continues at the prefix length and the pads are skipped.
                    x, mask = pad_ids([ids[i][n:] for i in idx], pad_id, left=True, device=self.device)
                    kwargs: dict = {}
                    if prefix is not None:
                        b = x.shape[0]
                        head = torch.tensor(prefix.ids, dtype=torch.long, device=self.device).expand(b, n)
                        x = torch.cat([head, x], 1)
                        mask = torch.cat([mask.new_ones(b, n), mask], 1)
                        kwargs[self._cache_arg] = prefix.cache(b, self.lm.config)
                    gen = self.lm.generate(
                        input_ids=x,
                        attention_mask=mask,
                        max_new_tokens=self.config.max_new_tokens,
                        do_sample=False,
                        pad_token_id=pad_id,
                        **kwargs,
                    )
                    new = gen[:, x.shape[1] :]
                    for j, i in enumerate(idx):
                        answers[i] = self.tokenizer.decode(new[j], skip_special_tokens=True).strip()
                    if progress is not None:
                        progress(len(idx))
        return answers
