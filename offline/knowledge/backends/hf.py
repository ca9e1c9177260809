"""Hugging Face transformers backend: the embedded default and the test backend (CPU or GPU).

Embedding runs the base model (not the LM head, whose 49k-way logits at every position cost ~6x), on
length-sorted batches so that padding stays small.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np

from offline.knowledge.backends.base import POOLINGS, Backend, BackendConfig, Progress
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


def apply_chat_template(tokenizer, prompt: str) -> str:
    """The text an instruction-tuned model expects; the raw prompt when the tokenizer has no template."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
    return prompt


class HFBackend(Backend):
    def __init__(self, config: BackendConfig):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.config = config
        if config.threads > 0:
            torch.set_num_threads(config.threads)
        path, self.model_name = resolve_model(config.model)
        self.tokenizer = AutoTokenizer.from_pretrained(str(path))
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.dtype = _torch_dtype(config.dtype)
        self.device = torch.device(config.device)
        self.lm = AutoModelForCausalLM.from_pretrained(str(path), dtype=self.dtype).to(self.device).eval()
        self.base = self.lm.base_model
        self.hidden_size = int(self.lm.config.hidden_size)
        log.info("hf backend: %s (%s, %s, hidden %d)", self.model_name, config.dtype, config.device, self.hidden_size)

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        return auto_tokenizer_counter(self.tokenizer)(texts)

    def _batches(self, texts: Sequence[str]):
        """Index batches in length order (longest first, so a memory problem shows at once)."""
        lengths = self.count_tokens(texts)
        order = sorted(range(len(texts)), key=lambda i: (-lengths[i], i))
        bs = max(1, self.config.batch_size)
        for start in range(0, len(order), bs):
            yield order[start : start + bs]

    def _tokenize(self, batch: list[str], add_special_tokens: bool):
        """A padded, truncated batch on the model's device (padding side set by the caller)."""
        return self.tokenizer(
            batch,
            return_tensors="pt",
            padding=True,
            truncation=True,
            max_length=self.config.max_length,
            add_special_tokens=add_special_tokens,
        ).to(self.device)

    def embed(self, texts: Sequence[str], pooling: str, progress: Progress | None = None) -> np.ndarray:
        import torch

        if pooling not in POOLINGS:
            raise UserFacingError(f"unknown pooling {pooling!r}; expected one of {POOLINGS}")
        out = np.zeros((len(texts), self.hidden_size), dtype=np.float32)
        self.tokenizer.padding_side = "right"
        with torch.inference_mode():
            for idx in self._batches(texts):
                enc = self._tokenize([texts[i] for i in idx], add_special_tokens=True)
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

        texts = (
            [apply_chat_template(self.tokenizer, p) for p in prompts] if self.config.chat_template else list(prompts)
        )
        answers = [""] * len(texts)
        self.tokenizer.padding_side = "left"
        with torch.inference_mode():
            for idx in self._batches(texts):
                enc = self._tokenize([texts[i] for i in idx], add_special_tokens=False)  # prompts as written
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
