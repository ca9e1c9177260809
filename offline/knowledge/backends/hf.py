"""Hugging Face transformers backend: the embedded default and the test backend (CPU or GPU).

Embedding runs the base model (not the LM head, whose 49k-way logits at every position cost ~6x), on
length-sorted batches so that padding stays small.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import replace

import numpy as np

from offline.knowledge.backends.base import (
    ADD_SPECIAL_TOKENS,
    POOLINGS,
    Backend,
    BackendConfig,
    Progress,
    model_texts,
    resolve_dtype,
    resolve_threads,
)
from offline.knowledge.models import resolve_model
from offline.knowledge.tokens import auto_tokenizer_counter
from shared.errors import UserFacingError

log = logging.getLogger(__name__)


def _torch_dtype(name: str):
    import torch

    dtypes = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}
    if name not in dtypes:
        raise UserFacingError(f"unknown dtype {name!r}; expected one of {sorted(dtypes)}")
    return dtypes[name]


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
        log.info(
            "hf backend: %s (%s, %s, %d threads, hidden %d)",
            self.model_name,
            config.dtype,
            config.device,
            self.threads,
            self.hidden_size,
        )

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        return auto_tokenizer_counter(self.tokenizer)(texts)

    def _batches(self, texts: Sequence[str]):
        """Index batches in length order (longest first, so a memory problem shows at once)."""
        lengths = self.count_tokens(texts)
        order = sorted(range(len(texts)), key=lambda i: (-lengths[i], i))
        bs = max(1, self.config.batch_size)
        for start in range(0, len(order), bs):
            yield order[start : start + bs]

    def _tokenize(self, batch: list[str], op: str):
        """A padded batch cut to max_length (the build counts the cut texts with base.over_length) on the model's
        device; the padding side is set by the caller."""
        return self.tokenizer(
            batch,
            return_tensors="pt",
            padding=True,
            truncation=True,
            max_length=self.config.max_length,
            add_special_tokens=ADD_SPECIAL_TOKENS[op],
        ).to(self.device)

    def embed(self, texts: Sequence[str], pooling: str, progress: Progress | None = None) -> np.ndarray:
        import torch

        if pooling not in POOLINGS:
            raise UserFacingError(f"unknown pooling {pooling!r}; expected one of {POOLINGS}")
        out = np.zeros((len(texts), self.hidden_size), dtype=np.float32)
        self.tokenizer.padding_side = "right"
        with torch.inference_mode():
            for idx in self._batches(texts):
                enc = self._tokenize([texts[i] for i in idx], "embed")
                hidden = self.base(**enc).last_hidden_state.float()
                mask = enc["attention_mask"].unsqueeze(-1).float()
                if pooling == "mean":
                    pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
                else:
                    last = enc["attention_mask"].sum(1) - 1
                    pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
                out[idx] = pooled.cpu().numpy()
                if progress is not None:
                    progress(len(idx))
        return out

    def generate(self, prompts: Sequence[str], progress: Progress | None = None) -> list[str]:
        import torch

        texts = model_texts(self.tokenizer, prompts, "generate", self.config.chat_template)
        answers = [""] * len(texts)
        self.tokenizer.padding_side = "left"
        with torch.inference_mode():
            for idx in self._batches(texts):
                enc = self._tokenize([texts[i] for i in idx], "generate")
                gen = self.lm.generate(
                    **enc,
                    max_new_tokens=self.config.max_new_tokens,
                    do_sample=False,
                    pad_token_id=self.tokenizer.pad_token_id,
                )
                new = gen[:, enc["input_ids"].shape[1] :]
                for j, i in enumerate(idx):
                    answers[i] = self.tokenizer.decode(new[j], skip_special_tokens=True).strip()
                if progress is not None:
                    progress(len(idx))
        self.tokenizer.padding_side = "right"
        return answers
