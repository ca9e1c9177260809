"""The CLI takes its choices from the registries and its training flags from the config classes: an entry
registered here appears in a freshly built parser, every default comes from the config class, and an unknown name
is one clear line."""

from __future__ import annotations

import argparse
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

import llm4msr_cli
from offline.common import ConfigFlags, build_config, config_fields
from offline.data.importers import ImporterSpec, importer_names, importer_spec, register_importer, unregister_importer
from offline.refresh.cli import TRAIN_FLAGS
from offline.training.cli import RUN_FLAGS, TRAINING_FLAGS, levels_values, train_config_from_args
from offline.training.config import TrainConfig
from shared.dataset.folder import Dataset, read_dataset
from shared.errors import UserFacingError
from shared.models.backbones import backbone_names, build_backbone, register_backbone, unregister_backbone

# The flat training config written into artifacts and compare records: the keys every earlier version wrote (kept, so
# old artifacts stay retrainable by refresh and old compare runs reusable) plus those added since, which older
# records lack and which then read as the old behaviour (gate none, full-history user knowledge, fixed levels, raw
# uncalibrated scores, the earlier embedding init, auto without its second-init item candidate, the knowledge
# pathway at the backbone's learning rate, one validation check per epoch, STAR's running statistics as trained).
STORED_TRAIN_KEYS = {
    "backbone", "backbone_params", "llm4msr", "knowledge_source", "levels", "placement", "embed_dim", "reduce_dim",
    "proj_dim", "meta_dim", "rank", "hyper_hidden", "lr", "weight_decay", "batch_size", "epochs", "patience", "seed",
    "threads", "eval_batch_size", "progress",
    "gate", "gate_decay", "knowledge_dropout", "user_knowledge", "early_rows", "levels_auto", "calibrate",
    "embed_init_std", "auto_item_init_std", "knowledge_lr_scale", "checks_per_epoch", "norm_stats_batches",
}  # fmt: skip


def _subparser(parser: argparse.ArgumentParser, *path: str) -> argparse.ArgumentParser:
    for name in path:
        action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        parser = action.choices[name]
    return parser


def _option(parser: argparse.ArgumentParser, flag: str) -> argparse.Action:
    return next(a for a in parser._actions if flag in a.option_strings)


def test_cli_choices_are_the_registries():
    parser = llm4msr_cli.build_parser()
    for command in ("train", "refresh"):
        assert _option(_subparser(parser, command), "--backbone").choices == backbone_names()
    assert _option(_subparser(parser, "compare"), "--backbones").default == backbone_names()
    assert backbone_names()[:4] == ["shared_bottom", "mmoe", "ple", "star"]
    sources = _subparser(parser, "data", "import")._actions[-1].choices
    assert list(sources) == importer_names() == ["movielens", "amazon", "kuaisar", "folder"]


def test_a_backbone_registered_later_appears_in_a_new_parser():
    from shared.models.backbones.star import STAR

    register_backbone("star_copy", STAR)
    try:
        parser = llm4msr_cli.build_parser()
        assert "star_copy" in _option(_subparser(parser, "train"), "--backbone").choices
        assert "star_copy" in _option(_subparser(parser, "refresh"), "--backbone").choices
        assert build_backbone("star_copy", {"hidden": [8]}, 6, 2).layers[0].w_shared.shape == (6, 8)
        with pytest.raises(ValueError, match="already registered"):
            register_backbone("star_copy", "somewhere.else:Other")
    finally:
        unregister_backbone("star_copy")
    assert "star_copy" not in _option(_subparser(llm4msr_cli.build_parser(), "train"), "--backbone").choices


@dataclass(frozen=True)
class CountedOptions:
    """A toy source: a file holding a seed, and how many users to make."""

    path: str = field(metadata={"positional": True, "help": "file with the seed"})
    users: int = field(default=5, metadata={"help": "users to generate"})


def _load_counted(options: CountedOptions) -> Dataset:
    from offline.data.synth import SynthConfig, generate

    return generate(SynthConfig(users=options.users, seed=int(Path(options.path).read_text())))


@pytest.fixture
def counted_importer() -> Iterator[str]:
    register_importer(ImporterSpec("counted", "a toy source for this test", CountedOptions, _load_counted))
    yield "counted"
    unregister_importer("counted")


def test_a_registered_importer_gets_its_subcommand_and_flags(counted_importer, tmp_path, capsys):
    seed = tmp_path / "seed.txt"
    seed.write_text("3")
    with pytest.raises(SystemExit):
        llm4msr_cli.main(["data", "import", counted_importer, "--help"])
    assert re.search(r"--users USERS\s+users to generate", capsys.readouterr().out)
    out = tmp_path / "ds"
    assert llm4msr_cli.main(["data", "import", counted_importer, str(seed), "--users", "7", "--out", str(out)]) == 0
    assert read_dataset(out).interactions["user_id"].nunique() == 7


def test_unknown_names_are_one_clear_line(capsys):
    with pytest.raises(
        UserFacingError, match=r"^unknown backbone 'nope'; choose one of shared_bottom, mmoe, ple, star"
    ):
        build_backbone("nope", {}, 4, 2)
    with pytest.raises(UserFacingError, match=r"^unknown importer 'nope'; choose one of movielens, amazon"):
        importer_spec("nope")
    with pytest.raises(SystemExit):
        llm4msr_cli.main(["train", "--data", "d", "--out", "o", "--backbone", "nope"])
    assert "argument --backbone: invalid choice: 'nope'" in capsys.readouterr().err
    assert llm4msr_cli.main(["train", "--data", "d", "--out", "o", "--no-llm4msr", "--levels", "items"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "error: unknown knowledge level(s) ['items']; choose from scenario, user, item"


def test_every_training_default_comes_from_the_config_classes():
    parser = llm4msr_cli.build_parser()
    args = parser.parse_args(["train", "--data", "d", "--out", "o"])
    train = train_config_from_args(args, (RUN_FLAGS, TRAINING_FLAGS), **levels_values(args))
    assert train == TrainConfig(progress=train.progress, levels_auto=True)  # --levels auto: the CLI's default
    args = parser.parse_args(["refresh", "--data", "d", "--knowledge-root", "k", "--artifact-dir", "a"])
    assert TRAIN_FLAGS.build(args, **levels_values(args)) == TrainConfig(levels_auto=True)
    # train and compare expose every TrainConfig field that has a command-line form
    on_cli = {name for name, f in config_fields(TrainConfig).items() if f.meta.get("cli", True)}
    # --levels has its own parser: it also takes "auto" (which sets levels_auto)
    assert on_cli - {"levels"} == set(RUN_FLAGS.fields) | set(TRAINING_FLAGS.fields)


def test_flags_parse_into_the_nested_config():
    parser = llm4msr_cli.build_parser()
    argv = [
        "train",
        "--data",
        "d",
        "--out",
        "o",
        "--levels",
        "user,item",
        "--rank",
        "4",
        "--no-progress",
        "--lr",
        "0.01",
    ]
    args = parser.parse_args(argv)
    cfg = train_config_from_args(args, (RUN_FLAGS, TRAINING_FLAGS), **levels_values(args))
    assert cfg.wrapper.levels == ["user", "item"] and cfg.wrapper.rank == 4 and cfg.lr == 0.01 and not cfg.progress
    args = parser.parse_args(["refresh", "--data", "d", "--knowledge-root", "k", "--artifact-dir", "a"] + [
        "--train-epochs", "3", "--train-batch-size", "64", "--batch-size", "4", "--threads", "2", "--train-threads", "1"
    ])  # fmt: skip
    cfg = TRAIN_FLAGS.build(args)
    assert (cfg.epochs, cfg.batch_size, cfg.threads) == (3, 64, 1)
    assert (args.batch_size, args.threads) == (4, 2)  # the knowledge build's own options, untouched


def test_the_flat_form_keeps_the_stored_keys_and_round_trips():
    cfg = TrainConfig.from_flat({"backbone": "ple", "levels": ["item", "user"], "knowledge_source": "id", "epochs": 3})
    flat = cfg.to_dict()
    assert set(flat) == STORED_TRAIN_KEYS
    assert flat["levels"] == ["user", "item"] and flat["knowledge_source"] == "id" and flat["epochs"] == 3
    assert TrainConfig.from_flat(flat) == cfg
    assert cfg.with_values(seed=5, llm4msr=False) == TrainConfig.from_flat({**flat, "seed": 5, "llm4msr": False})
    with pytest.raises(TypeError, match="no_such_field"):
        TrainConfig.from_flat({"no_such_field": 1})


def test_a_field_without_a_command_line_form_is_refused_when_the_flags_are_built():
    @dataclass(frozen=True)
    class Odd:
        table: dict = field(default_factory=dict)

    with pytest.raises(TypeError, match="field 'table'"):
        ConfigFlags(Odd).add_to(argparse.ArgumentParser())
    assert build_config(Odd, {"table": {"a": 1}}) == Odd({"a": 1})
