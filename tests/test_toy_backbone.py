"""Adding a backbone is one class plus its registration: a toy registered here is trained with LLM4MSR, evaluated
and compared through the `llm4msr` CLI, with no other edit anywhere."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
import torch
from fixtures_models import write_planted_snapshot
from torch import nn

import llm4msr_cli
from offline.data.split import SplitConfig, make_split
from shared.artifact import load_artifact
from shared.dataset.folder import read_dataset
from shared.models.backbones import backbone_names, register_backbone, unregister_backbone
from shared.models.backbones.base import Backbone, BackboneConfig, mlp


class ToyConfig(BackboneConfig):
    hidden: int = 8


class Toy(Backbone):
    """One shared hidden layer and a learned bias per scenario."""

    config_class = ToyConfig

    def __init__(self, config: ToyConfig, input_dim: int, n_scenarios: int):
        super().__init__(config, input_dim, n_scenarios)
        self.body = mlp([input_dim, config.hidden, 1], last_act=False)
        self.scenario_bias = nn.Embedding(n_scenarios, 1)

    def forward(self, x: torch.Tensor, scenario: torch.Tensor) -> torch.Tensor:
        return (self.body(x) + self.scenario_bias(scenario)).squeeze(-1)


@pytest.fixture(scope="module")
def toy() -> Iterator[str]:
    register_backbone("toy", Toy)
    yield "toy"
    unregister_backbone("toy")


@pytest.fixture(scope="module")
def knowledge(synth_dir, tmp_path_factory):
    dataset = read_dataset(synth_dir)
    return write_planted_snapshot(dataset, make_split(dataset, SplitConfig()), tmp_path_factory.mktemp("kn") / "kn")


FAST = ["--epochs", "2", "--batch-size", "512", "--threads", "1", "--embed-dim", "8"]


def test_a_registered_backbone_trains_evaluates_and_compares(toy, synth_dir, knowledge, tmp_path, capsys):
    assert backbone_names()[-1] == toy
    model_dir = tmp_path / "toy-model"
    args = ["train", "--data", str(synth_dir), "--knowledge", str(knowledge), "--backbone", toy, "--json"]
    args += [
        "--levels",
        "scenario,user",
    ]  # not auto: 2 epochs may keep the plain backbone, and this is about the wrapper
    assert llm4msr_cli.main([*args, *FAST, "--out", str(model_dir)]) == 0
    trained = json.loads(capsys.readouterr().out)
    artifact = load_artifact(model_dir)
    assert artifact.config.backbone == toy and artifact.config.llm4msr
    assert isinstance(artifact.model.backbone, Toy) and artifact.model.wrapper is not None

    args = ["evaluate", str(model_dir), "--data", str(synth_dir), "--knowledge", str(knowledge), "--json"]
    assert llm4msr_cli.main(args) == 0
    evaluated = json.loads(capsys.readouterr().out)["metrics"]
    assert evaluated["test"]["overall"]["auc"] == pytest.approx(trained["test"]["overall"]["auc"], abs=1e-6)

    out = tmp_path / "report"
    args = ["compare", "--data", str(synth_dir), "--knowledge", str(knowledge), "--seeds", "1"]
    args += ["--backbones", f"star,{toy}", "--variants", "plain,llm_su", *FAST, "--out", str(out)]
    assert llm4msr_cli.main(args) == 0
    assert {f.name for f in (out / "runs").glob(f"{toy}__*.json")} == {
        f"{toy}__plain__s0.json",
        f"{toy}__llm_su__s0.json",
    }
    report = (out / "report.md").read_text()
    assert f"| {toy} | plain | 1 |" in report and f"| {toy} | +LLM4MSR (scenario,user) | 1 |" in report
    # Registered backbones keep the registry's order in the report: the built-in star before the toy.
    assert report.index("| star | plain |") < report.index(f"| {toy} | plain |")


def test_compare_runs_every_registered_backbone_by_default(toy):
    args = llm4msr_cli.build_parser().parse_args(["compare", "--data", "d", "--knowledge", "k", "--out", "o"])
    assert args.backbones == backbone_names() and toy in args.backbones
