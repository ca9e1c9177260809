"""The light token counter for prompt budgets: identical counts to transformers' AutoTokenizer (no special tokens
added) on the embedded SmolLM2 and on the tiny test tokenizer, and no transformers import once cached."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from fixtures_llm import tiny_model  # noqa: F401  (fixture)

from offline.data.split import make_split
from offline.knowledge import prompts as P
from offline.knowledge import tokens
from shared.dataset.folder import read_dataset

REPO = Path(__file__).resolve().parents[1]


def _texts(data_dir: Path, special: list[str]) -> list[str]:
    """What budgets and prompts contain (history lines inside whole prompts, item texts), and edge cases."""
    ds = read_dataset(data_dir)
    split = make_split(ds)
    texts = list(P.user_prompts(ds, split).values()) + list(P.item_texts(ds).values())
    texts += list(P.scenario_prompts(ds).values())
    lines = [line + "\n" for t in texts for line in t.split("\n")]
    edge = ["", " ", "  two  spaces ", "tab\there", "Ünïcödé — “q” 日本語 🎬", "x" * 3000, "\n\n\n"]
    edge += [f"a{t}b {t}{t} c {t}" for t in special]
    return texts + lines + edge


def _auto_counts(model_dir: Path, texts: list[str]) -> tuple[list[int], list[str]]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    special = [str(t) for t in tok.added_tokens_encoder] + [tok.eos_token, tok.pad_token]
    return [len(x) for x in tok(texts, add_special_tokens=False)["input_ids"]], special


def _check_identical(model_dir: Path, data_dir: Path, cache: Path, monkeypatch) -> None:
    monkeypatch.setenv("LLM4MSR_CACHE", str(cache))
    _, special = _auto_counts(model_dir, ["x"])
    texts = _texts(data_dir, special)
    expected, _ = _auto_counts(model_dir, texts)
    first = tokens.load_token_counter(model_dir)  # through transformers; writes the cache
    files = list(tokens.tokenizer_cache_dir().glob("*.json"))
    assert len(files) == 1 and files[0].stem == tokens.cache_key(model_dir)
    second = tokens.load_token_counter(model_dir)  # from the cache
    assert first(texts) == expected
    assert second(texts) == expected
    assert second([]) == []


def test_counts_identical_tiny_tokenizer(tiny_model, synth_dir, tmp_path, monkeypatch):  # noqa: F811
    _check_identical(tiny_model, synth_dir, tmp_path / "cache", monkeypatch)


def test_counts_identical_smollm2(synth_dir, tmp_path, monkeypatch):
    from offline.knowledge.models import resolve_model

    model_dir, _ = resolve_model(None)  # the real cache: the converted model lives there
    _check_identical(model_dir, synth_dir, tmp_path / "cache", monkeypatch)


def test_cached_counter_does_not_import_transformers(tiny_model, tmp_path):  # noqa: F811
    env = dict(os.environ, PYTHONPATH=str(REPO), LLM4MSR_CACHE=str(tmp_path / "cache"))
    code = (
        "import sys; from pathlib import Path; from offline.knowledge.tokens import load_token_counter; "
        f"c = load_token_counter(Path({str(tiny_model)!r})); print(c(['hello world'])[0], "
        "'transformers' in sys.modules)"
    )
    runs = [
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
        for _ in range(2)
    ]
    for r in runs:
        assert r.returncode == 0, r.stderr[-2000:]
    assert runs[0].stdout.split()[1] == "True"  # the first load goes through transformers
    assert runs[1].stdout.split() == [runs[0].stdout.split()[0], "False"]


def test_cache_key_follows_tokenizer_files_and_bad_cache_is_rebuilt(tiny_model, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.setenv("LLM4MSR_CACHE", str(tmp_path / "cache"))
    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    key = tokens.cache_key(model)
    (model / "model.safetensors").write_bytes(b"other weights")
    assert tokens.cache_key(model) == key  # weights do not matter
    cfg = json.loads((model / "tokenizer_config.json").read_text())
    cfg["split_special_tokens"] = True
    (model / "tokenizer_config.json").write_text(json.dumps(cfg))
    assert tokens.cache_key(model) != key  # tokenizer settings do

    from transformers import AutoTokenizer

    auto = AutoTokenizer.from_pretrained(str(model))
    text = ["a<|im_end|>b"]
    expected = [len(x) for x in auto(text, add_special_tokens=False)["input_ids"]]
    assert expected != [
        len(x) for x in AutoTokenizer.from_pretrained(str(tiny_model))(text, add_special_tokens=False)["input_ids"]
    ]
    assert tokens.load_token_counter(model)(text) == expected  # split_special_tokens carried into the cache
    assert tokens.load_token_counter(model)(text) == expected

    file = tokens.tokenizer_cache_dir() / f"{tokens.cache_key(model)}.json"
    file.write_text("{not json")
    assert tokens.load_token_counter(model)(text) == expected
    assert "tokenizer" in json.loads(file.read_text())  # rewritten


def test_unwritable_cache_still_counts(tiny_model, tmp_path, monkeypatch):  # noqa: F811
    cache = tmp_path / "cache"
    cache.write_text("a file where the cache folder should be")
    monkeypatch.setenv("LLM4MSR_CACHE", str(cache))
    from transformers import AutoTokenizer

    auto = AutoTokenizer.from_pretrained(str(tiny_model))
    text = ["Hello world", "- a title [Books]\n"]
    expected = [len(x) for x in auto(text, add_special_tokens=False)["input_ids"]]
    assert tokens.load_token_counter(tiny_model)(text) == expected


def test_source_hash_is_computed_once_per_path_size_and_mtime(tmp_path, monkeypatch):
    import hashlib

    from offline.knowledge import models

    monkeypatch.setenv("LLM4MSR_CACHE", str(tmp_path / "cache"))
    gguf = tmp_path / "a" / "model.gguf"
    gguf.parent.mkdir()
    gguf.write_bytes(b"weights v1" * 1000)
    real = hashlib.sha256(gguf.read_bytes()).hexdigest()
    assert models.file_sha256(gguf) == real
    index_file = models.cache_dir() / models.SOURCE_HASHES_FILE
    index = json.loads(index_file.read_text())
    assert index[str(gguf.resolve())]["sha256"] == real
    # The index answers while the file's size and mtime are unchanged (the file is not read again) ...
    index[str(gguf.resolve())]["sha256"] = "0" * 64
    index_file.write_text(json.dumps(index))
    assert models.file_sha256(gguf) == "0" * 64
    # ... and a rewritten file (same size, new mtime) is hashed again.
    stat = gguf.stat()
    gguf.write_bytes(b"weights v2" * 1000)
    os.utime(gguf, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    assert models.file_sha256(gguf) == hashlib.sha256(gguf.read_bytes()).hexdigest() != real
    index_file.write_text("{damaged")  # a damaged index is rebuilt, never trusted
    assert models.file_sha256(gguf) == hashlib.sha256(gguf.read_bytes()).hexdigest()

    # The converted folder is keyed by content: the same name with other bytes is another folder.
    other = tmp_path / "b" / "model.gguf"
    other.parent.mkdir()
    other.write_bytes(b"other weights")
    same = tmp_path / "c" / "model.gguf"
    same.parent.mkdir()
    same.write_bytes(gguf.read_bytes())
    dirs = {p: models.converted_dir(p, "Name") for p in (gguf, other, same)}
    assert dirs[gguf] == dirs[same] != dirs[other]
    assert dirs[gguf].parent == tmp_path / "cache" / "models"
    assert dirs[gguf].name == f"Name-{models.file_sha256(gguf)[: models.HASH_CHARS]}"


def test_embedded_model_folder_is_named_by_the_gguf_hash_and_home_stays_untouched(tmp_path):
    """With LLM4MSR_CACHE set (tests/conftest.py sets it for the whole session), nothing is written under $HOME."""
    from offline.knowledge import models

    model_dir, name = models.resolve_model(None)
    gguf = models.smollm2_gguf_path()
    assert name == models.SMOLLM2_MODEL_NAME and model_dir.parent == models.cache_dir()
    assert model_dir.name == f"{name}-{models.file_sha256(gguf)[: models.HASH_CHARS]}"
    assert (model_dir / "config.json").exists()

    home = tmp_path / "home"
    home.mkdir()
    env = dict(os.environ, HOME=str(home), PYTHONPATH=str(REPO), LLM4MSR_CACHE=str(models.cache_dir().parent))
    code = (
        "from offline.knowledge.models import resolve_model; from offline.knowledge.tokens import "
        "load_token_counter; p, _ = resolve_model(None); print(p); print(load_token_counter(p)(['hello'])[0])"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.split()[0] == str(model_dir)
    assert not any(home.iterdir()), list(home.rglob("*"))
