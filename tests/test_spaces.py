"""The search-space registry: a space added by one registration is built, saved and rebuilt by the same
code paths as the shipped ones, and nothing outside spaces/ branches on a space's name."""

import json
import re
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch import nn

import robustnas
from robustnas.nets.arch import build_arch, model_from_spec
from robustnas.data.datasets import load_dataset
from robustnas.core.errors import UserError
from robustnas.nets.genotypes import build_network, genotype_from_dict, load_genotype
from robustnas.nets.spaces import SPACES, Space, get_space, register


@dataclass(frozen=True)
class ChainGenotype:
    """A toy space: a chain of `depth` conv layers whose width is C."""
    depth: int
    space: str = "chain"

    def to_dict(self):
        return {"space": self.space, "depth": self.depth}

    @classmethod
    def from_dict(cls, data):
        return cls(depth=int(data["depth"]))


def chain_network(g, C, layers, num_classes, in_shape, mean, std, **kw):
    convs = [nn.Conv2d(in_shape[0] if i == 0 else C, C, 3, padding=1) for i in range(g.depth)]
    return nn.Sequential(*convs, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(C, num_classes))


@pytest.fixture
def chain_space():
    space = register(Space("chain", ChainGenotype.from_dict, chain_network, ("conv3",)))
    yield space
    del SPACES["chain"]


def test_shipped_spaces_are_registered():
    assert {"darts", "arnas", "tiny"} <= set(SPACES)
    assert get_space("tiny").sizes_itself and not get_space("tiny").cells
    assert get_space("arnas").cells and "none" not in get_space("arnas").primitives
    with pytest.raises(UserError, match="unknown search space"):
        get_space("nope")


def test_a_registered_space_builds_saves_and_rebuilds_through_the_common_paths(chain_space, tmp_path):
    meta = load_dataset("digits", subset=50, seed=0).meta
    path = tmp_path / "chain.json"
    path.write_text(json.dumps({"space": "chain", "depth": 2}))
    assert load_genotype(path) == ChainGenotype(2) == genotype_from_dict({"space": "chain", "depth": 2})
    model, spec = build_arch(str(path), meta, C=6, layers=2)
    rebuilt = model_from_spec(json.loads(json.dumps(spec)))
    rebuilt.load_state_dict(model.state_dict())
    x = torch.rand(3, *meta.shape)
    assert torch.equal(model(x), rebuilt(x))
    assert isinstance(build_network(ChainGenotype(1), 4, 1, 10, meta.shape, meta.mean, meta.std), nn.Sequential)
    with pytest.raises(ValueError, match="twice"):
        register(chain_space)


def test_no_module_outside_spaces_branches_on_a_space_name():
    root = Path(robustnas.__file__).parent
    pattern = re.compile(r"""(==|!=)\s*["'](darts|arnas|tiny)["']|["'](darts|arnas|tiny)["']\s*(==|!=)""")
    offenders = [f"{p.relative_to(root)}:{i}" for p in root.rglob("*.py") if "spaces" not in p.parts
                 for i, line in enumerate(p.read_text().splitlines(), 1) if pattern.search(line)]
    assert not offenders, offenders
