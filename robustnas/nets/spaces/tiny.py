"""The TAM-NAS tiny-block space: a chain of searchable layers in stages, a weight-sharing supernet over
it, and standalone subnets extracted from the supernet with their inherited weights.

The space (all lists live here, in BLOCKS, STEM_CHANNELS and STAGES; `width_mult` scales every channel
count, the supernet width x1 / x2 of the paper's study):

    Normalize -> stem: conv3x3 (stride 1) -> STEM_CHANNELS, BN, ReLU
    stage 1: 2 layers, stride 2, widths 16 / 24 / 32
    stage 2: 3 layers, stride 2, widths 24 / 40 / 56
    stage 3: 3 layers, stride 2, widths 48 / 80 / 112
    stage 4: 3 layers, stride 1, widths 96 / 160 / 224
    -> global average pool -> linear classifier

Each of the 11 layers picks a block and an output width from its stage's widths. The stride of a stage
applies to its first layer; it is taken only while the map is at least 4 pixels wide (as in the
hand-crafted baselines), so 8x8 inputs work too. Blocks:

    mb{k}_e{e}  inverted residual (MBConv), k in {3, 5}, expansion e in {1, 3, 6}: 1x1 conv to e*C_in,
                BN, ReLU, kxk depthwise conv, BN, ReLU, 1x1 conv to C_out, BN. The 1x1 expansion is
                kept at e = 1 too, so that all six variants are slices of one block.
    sep3        depthwise-separable: 3x3 depthwise, BN, ReLU, 1x1 conv to C_out, BN
    conv3       plain 3x3 conv, pre-activated: ReLU, 3x3 conv to C_out, BN
    skip        identity; only where the shapes allow it, i.e. never on the first layer of a stage

Every block at stride 1 is a residual branch: its output is added to a shortcut of its input that keeps
the leading C_out channels (dropping the rest when the layer narrows, zero-padding when it widens), and
the branch's last BN starts at zero (so a fresh branch is the identity). Stride-2 layers have no
shortcut. Why: a one-shot supernet trains each block inside ever-changing subnets. Without a shortcut on
every stride-1 layer, whether a block is a residual branch would depend on the widths drawn, and blocks
trained as branches would break the subnets that use them as plain layers. On digits, uniform supernet
training reached 11% train accuracy after 100 steps with MobileNetV2-style shortcuts (only when
C_in == C_out) and 87% with this rule. The blocks end in BN, not ReLU (the linear bottleneck): a
branch ending in ReLU after a zero-initialised BN would get no gradient.

Integer encoding: two genes per layer, [block_0, width_0, block_1, width_1, ...], with block an index
into BLOCKS and width an index into the layer's stage widths. A skip layer keeps its input width, so
its width gene is redundant; the canonical encoding (`TinySpace.canonical`) sets it to the previous
layer's width gene, which makes canonical encodings and networks one-to-one. Parameter counts span
about 9k (`TinySpace.smallest`) to 2.1M (`TinySpace.largest`) at width x1 (x2: 31k to 8.0M); a
uniformly sampled subnet has a median of about 450k (about 22 MFLOPs on 28x28). Counts do not depend
on the image size (global pooling); only the stem sees the number of input channels.

Weight sharing: a supernet layer holds each block type once at its largest size (kernel 5, expansion 6,
the widest input and output); a subnet uses the leading channels and the centre of the kernel. Slices
are views, so subnets train the same storage. Every BatchNorm is shared the same way (leading channels),
which is why a subnet's statistics are recalibrated (`recalibrate_bn`) before it is scored.

`TinyNetwork` is the standalone network of one genotype: only Conv2d, BatchNorm2d, ReLU, pooling,
Flatten, Linear, `+` and, in shortcuts that change the width, a channel slice or zero-padding (F.pad);
it is torch.fx traceable and the bound propagation (robustnas/bounds) reads all of these.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Iterable, Iterator, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from robustnas.core.errors import UserError
from robustnas.nets.models.base import Normalize
from robustnas.nets.models.common import can_downsample, conv_out
from robustnas.nets.size import count_params
from robustnas.nets.spaces.registry import GenotypeJson, Space, register

# ------------------------------------------------------------------------------------------- the lists
KERNELS = (3, 5)
EXPANSIONS = (1, 3, 6)
BLOCKS: tuple[str, ...] = tuple(f"mb{k}_e{e}" for k in KERNELS for e in EXPANSIONS) + ("sep3", "conv3", "skip")
SKIP = BLOCKS.index("skip")
STEM_CHANNELS = 16
# (stride, layers, width choices) per stage, at width x1
STAGES: tuple[tuple[int, int, tuple[int, ...]], ...] = (
    (2, 2, (16, 24, 32)),
    (2, 3, (24, 40, 56)),
    (2, 3, (48, 80, 112)),
    (1, 3, (96, 160, 224)),
)
SMALLEST_BLOCK = "sep3"  # fewest parameters of the non-skip blocks (the sandwich rule's smallest subnet)
LARGEST_BLOCK = f"mb{max(KERNELS)}_e{max(EXPANSIONS)}"
SPACE_NAME = "tiny"


def block_kind(block: str) -> tuple[str, int, int]:
    """("mb", kernel, expansion) for an MBConv name; (name, 3, 1) / ("skip", 0, 0) for the others."""
    if block.startswith("mb"):
        k, e = block[2:].split("_e")
        return "mb", int(k), int(e)
    return (block, 0, 0) if block == "skip" else (block[:-1], int(block[-1]), 1)


# ------------------------------------------------------------------------------------------- the space
@dataclass(frozen=True)
class TinySpace:
    """The space at one width multiplier: layer layout, encoding bounds and the encoding's rules."""

    width_mult: int = 1
    stem: int = field(init=False)
    layer_stage: tuple[int, ...] = field(init=False)
    layer_widths: tuple[tuple[int, ...], ...] = field(init=False)
    first_in_stage: tuple[bool, ...] = field(init=False)

    def __post_init__(self) -> None:
        if isinstance(self.width_mult, bool) or not isinstance(self.width_mult, int) or not 1 <= self.width_mult <= 8:
            raise UserError(f"tiny space: width_mult must be an integer from 1 to 8, got {self.width_mult!r}")
        stage, widths, first = [], [], []
        for s, (_, n, ws) in enumerate(STAGES):
            for i in range(n):
                stage.append(s)
                widths.append(tuple(w * self.width_mult for w in ws))
                first.append(i == 0)
        object.__setattr__(self, "stem", STEM_CHANNELS * self.width_mult)
        object.__setattr__(self, "layer_stage", tuple(stage))
        object.__setattr__(self, "layer_widths", tuple(widths))
        object.__setattr__(self, "first_in_stage", tuple(first))

    @property
    def n_layers(self) -> int:
        return len(self.layer_stage)

    @property
    def n_var(self) -> int:
        return 2 * self.n_layers

    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        """Inclusive integer bounds (xl, xu) of every gene."""
        xu = []
        for widths in self.layer_widths:
            xu += [len(BLOCKS) - 1, len(widths) - 1]
        return np.zeros(self.n_var, dtype=int), np.array(xu, dtype=int)

    def allowed_blocks(self, layer: int) -> list[int]:
        """Block indices layer `layer` may take: no skip where the shape changes."""
        return [b for b in range(len(BLOCKS)) if not (b == SKIP and self.first_in_stage[layer])]

    # ------------------------------------------------------------------------ encoding rules
    def canonical(self, x: Sequence[int]) -> list[int]:
        """The canonical form of a valid encoding: each skip's width gene copies the previous layer's."""
        x = [int(v) for v in x]
        for i in range(self.n_layers):
            if x[2 * i] == SKIP:
                x[2 * i + 1] = x[2 * i - 1]
        return x

    def check(self, x: Sequence[int]) -> list[int]:
        """Validate an encoding from outside (UserError naming the gene) and return it canonical."""
        try:
            x = [int(v) for v in x]
        except (TypeError, ValueError):
            raise UserError(f"tiny encoding must be a list of integers, got {x!r}") from None
        if len(x) != self.n_var:
            raise UserError(f"tiny encoding needs {self.n_var} integers (block, width per layer), got {len(x)}")
        xl, xu = self.bounds()
        for g, v in enumerate(x):
            if not xl[g] <= v <= xu[g]:
                what = "block" if g % 2 == 0 else "width"
                raise UserError(f"tiny encoding gene {g} ({what} of layer {g // 2}) is {v}, "
                                f"outside 0..{xu[g]}")
        for i in range(self.n_layers):
            if x[2 * i] not in self.allowed_blocks(i):
                raise UserError(f"tiny encoding: layer {i} is the first of its stage and cannot be 'skip'")
        return self.canonical(x)

    def sample(self, rng: np.random.Generator) -> list[int]:
        """One canonical encoding, every gene uniform over its allowed values."""
        x = []
        for i in range(self.n_layers):
            allowed = self.allowed_blocks(i)
            x += [allowed[rng.integers(len(allowed))], int(rng.integers(len(self.layer_widths[i])))]
        return self.canonical(x)

    def shrink(self, x: Sequence[int], rng: np.random.Generator, num_classes: int = 10) -> list[int]:
        """One random step towards fewer parameters: one layer gets a narrower width or another block,
        drawn among the changes that lower the network's parameter count (skip included where allowed;
        a skip keeps its input width, so a local change is checked on the whole network). Repeated, it
        ends at a subnet no single change makes smaller; a constrained search repairs draws with it."""
        x = self.canonical(x)
        current = genotype_params(self.decode(x), num_classes, 1)
        moves = []
        for i in range(self.n_layers):
            if x[2 * i] != SKIP and x[2 * i + 1] > 0:
                moves.append(self.canonical(x[:2 * i + 1] + [x[2 * i + 1] - 1] + x[2 * i + 2:]))
            moves += [self.canonical(x[:2 * i] + [b] + x[2 * i + 1:]) for b in self.allowed_blocks(i) if b != x[2 * i]]
        smaller = [m for m in moves if genotype_params(self.decode(m), num_classes, 1) < current]
        return smaller[rng.integers(len(smaller))] if smaller else x

    def largest(self) -> list[int]:
        b = BLOCKS.index(LARGEST_BLOCK)
        return self.canonical([v for i in range(self.n_layers) for v in (b, len(self.layer_widths[i]) - 1)])

    def smallest(self) -> list[int]:
        b = BLOCKS.index(SMALLEST_BLOCK)
        return self.canonical([v for i in range(self.n_layers)
                               for v in ((b, 0) if self.first_in_stage[i] else (SKIP, 0))])

    # ------------------------------------------------------------------------ encoding <-> genotype
    def decode(self, x: Sequence[int]) -> "TinyGenotype":
        x = self.check(x)
        layers = []
        width = self.stem
        for i in range(self.n_layers):
            block = BLOCKS[x[2 * i]]
            if block != "skip":
                width = self.layer_widths[i][x[2 * i + 1]]
            layers.append((block, width))
        return TinyGenotype(layers=layers, width_mult=self.width_mult)

    def encode(self, genotype: "TinyGenotype") -> list[int]:
        if genotype.width_mult != self.width_mult:
            raise UserError(f"genotype is for width x{genotype.width_mult}, the space is x{self.width_mult}")
        x = []
        for i, (block, width) in enumerate(genotype.layers):
            x += [BLOCKS.index(block), self.layer_widths[i].index(width)]
        return self.canonical(x)

    def strides(self, in_shape: Sequence[int]) -> list[int]:
        """The stride each layer takes for inputs of shape (C, H, W)."""
        size = (int(in_shape[1]), int(in_shape[2]))
        out = []
        for i in range(self.n_layers):
            s = STAGES[self.layer_stage[i]][0] if self.first_in_stage[i] else 1
            s = s if s > 1 and can_downsample(size) else 1
            size = conv_out(size, s)
            out.append(s)
        return out


@dataclass
class TinyGenotype(GenotypeJson):
    """A tiny-block architecture: (block, output width) per layer, at a width multiplier. JSON:
    {"space": "tiny", "width_mult": 1, "layers": [["mb3_e3", 16], ...], "encoding": [...]}; the
    encoding is written for convenience and, when present on reading, must agree with the layers."""

    layers: list[tuple[str, int]]
    width_mult: int = 1
    source: Optional[str] = None
    space: str = SPACE_NAME

    def __post_init__(self) -> None:
        if self.space != SPACE_NAME:
            raise UserError(f"genotype field 'space': expected {SPACE_NAME!r}, got {self.space!r}")
        if isinstance(self.width_mult, bool) or not isinstance(self.width_mult, int) or self.width_mult < 1:
            raise UserError(f"genotype field 'width_mult': expected a positive integer, got {self.width_mult!r}")
        space = TinySpace(self.width_mult)
        if not isinstance(self.layers, (list, tuple)) or len(self.layers) != space.n_layers:
            raise UserError(f"genotype field 'layers': expected a list of {space.n_layers} [block, width] pairs")
        layers, width = [], space.stem
        for i, pair in enumerate(self.layers):
            if not isinstance(pair, (list, tuple)) or len(pair) != 2:
                raise UserError(f"genotype field 'layers[{i}]': expected a [block, width] pair, got {pair!r}")
            block, w = pair
            if block not in BLOCKS:
                raise UserError(f"genotype field 'layers[{i}]': unknown block {block!r}; "
                                f"use one of {', '.join(BLOCKS)}")
            if block == "skip":
                if space.first_in_stage[i]:
                    raise UserError(f"genotype field 'layers[{i}]': the first layer of a stage cannot be 'skip'")
                if w != width:
                    raise UserError(f"genotype field 'layers[{i}]': a skip keeps its input width {width}, got {w!r}")
            elif isinstance(w, bool) or w not in space.layer_widths[i]:
                raise UserError(f"genotype field 'layers[{i}]': width {w!r} is not one of "
                                f"{list(space.layer_widths[i])} for this layer")
            width = int(w)
            layers.append((str(block), width))
        self.layers = layers
        if self.source is not None and not isinstance(self.source, str):
            raise UserError(f"genotype field 'source': expected text, got {self.source!r}")

    @property
    def encoding(self) -> list[int]:
        return TinySpace(self.width_mult).encode(self)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"space": self.space, "width_mult": self.width_mult}
        if self.source is not None:
            out["source"] = self.source
        out["layers"] = [[b, w] for b, w in self.layers]
        out["encoding"] = self.encoding
        return out

    @classmethod
    def from_dict(cls, data: Any) -> "TinyGenotype":
        if not isinstance(data, dict):
            raise UserError(f"a tiny genotype must be a JSON object with fields space, width_mult, layers; "
                            f"got {type(data).__name__}")
        if data.get("space") != SPACE_NAME:
            raise UserError(f"genotype field 'space': expected {SPACE_NAME!r}, got {data.get('space')!r}")
        if "layers" not in data:
            raise UserError("genotype field 'layers' is missing")
        g = cls(layers=data["layers"], width_mult=data.get("width_mult", 1), source=data.get("source"))
        if "encoding" in data and TinySpace(g.width_mult).check(data["encoding"]) != g.encoding:
            raise UserError("genotype field 'encoding' disagrees with 'layers'; remove it or fix it")
        return g


# ------------------------------------------------------------------------------------------- standalone
def conv_bn(c_in: int, c_out: int, kernel: int, stride: int = 1, groups: int = 1,
            relu: bool = True) -> list[nn.Module]:
    layers: list[nn.Module] = [nn.Conv2d(c_in, c_out, kernel, stride, kernel // 2, groups=groups, bias=False),
                               nn.BatchNorm2d(c_out)]
    return layers + [nn.ReLU()] if relu else layers


def match_channels(x: Tensor, c_in: int, c_out: int) -> Tensor:
    """The shortcut of a stride-1 block: the leading c_out channels of x, zero-padded when c_out > c_in."""
    if c_in == c_out:
        return x
    if c_in > c_out:
        return x[:, :c_out]
    return F.pad(x, (0, 0, 0, 0, 0, c_out - c_in))


def block_body(block: str, c_in: int, c_out: int, stride: int) -> nn.Sequential:
    """The branch of a block as standard layers, in the order ChoiceLayer's sliced parts are copied."""
    kind, k, e = block_kind(block)
    if kind == "mb":
        hidden = c_in * e
        return nn.Sequential(*conv_bn(c_in, hidden, 1), *conv_bn(hidden, hidden, k, stride, hidden),
                             *conv_bn(hidden, c_out, 1, relu=False))
    if kind == "sep":
        return nn.Sequential(*conv_bn(c_in, c_in, 3, stride, c_in), *conv_bn(c_in, c_out, 1, relu=False))
    if kind == "conv":
        return nn.Sequential(nn.ReLU(), *conv_bn(c_in, c_out, 3, stride, relu=False))
    raise ValueError(f"{block!r} has no body")


class TinyBlock(nn.Module):
    """One searched layer: body(x), plus the channel-matched shortcut of x when the stride is 1."""

    def __init__(self, block: str, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.block, self.c_in, self.c_out = block, c_in, c_out
        self.shortcut = stride == 1
        self.body = block_body(block, c_in, c_out, stride)
        if self.shortcut:
            nn.init.zeros_(self.body[-1].weight)  # a fresh branch adds nothing

    def forward(self, x: Tensor) -> Tensor:
        out = self.body(x)
        return out + match_channels(x, self.c_in, self.c_out) if self.shortcut else out


def make_block(block: str, c_in: int, c_out: int, stride: int) -> nn.Module:
    return nn.Identity() if block == "skip" else TinyBlock(block, c_in, c_out, stride)


@lru_cache(maxsize=None)
def _block_params(block: str, c_in: int, c_out: int) -> int:
    return 0 if block == "skip" else count_params(block_body(block, c_in, c_out, 1))


def genotype_params(genotype: "TinyGenotype", num_classes: int, in_channels: int) -> int:
    """count_params(TinyNetwork(genotype, ...)) without building it (block counts are memoised; strides and
    the image size change no count): what a search under a parameter ceiling checks for every draw."""
    space = TinySpace(genotype.width_mult)
    total, c_in = in_channels * space.stem * 9 + 2 * space.stem, space.stem  # stem conv (no bias) + BN
    for block, c_out in genotype.layers:
        total += _block_params(block, c_in, c_out)
        c_in = c_out
    return total + c_in * num_classes + num_classes


class TinyNetwork(nn.Module):
    """The standalone network of one tiny genotype, for inputs of `in_shape` (C, H, W) in [0,1]."""

    def __init__(self, genotype: TinyGenotype | dict, num_classes: int, in_shape: Sequence[int],
                 mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        if isinstance(genotype, dict):
            genotype = TinyGenotype.from_dict(genotype)
        self.genotype = genotype
        space = TinySpace(genotype.width_mult)
        self.normalize = Normalize(mean, std)
        self.stem = nn.Sequential(*conv_bn(int(in_shape[0]), space.stem, 3))
        blocks, c_in = [], space.stem
        for (block, c_out), stride in zip(genotype.layers, space.strides(in_shape)):
            blocks.append(make_block(block, c_in, c_out, stride))
            c_in = c_out
        self.layers = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.classifier = nn.Linear(c_in, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.layers(self.stem(self.normalize(x)))
        return self.classifier(self.flatten(self.pool(x)))


def network_from_spec(spec: dict) -> TinyNetwork:
    """Rebuild a TinyNetwork from the model.json dict written by `model_spec`."""
    return TinyNetwork(spec["genotype"], spec["num_classes"], spec["in_shape"], spec["mean"], spec["std"])


def model_spec(genotype: TinyGenotype, num_classes: int, in_shape: Sequence[int], mean: Sequence[float],
               std: Sequence[float]) -> dict:
    return {"kind": "genotype", "genotype": genotype.to_dict(), "num_classes": int(num_classes),
            "in_shape": [int(s) for s in in_shape], "mean": [float(m) for m in mean], "std": [float(s) for s in std]}


# ------------------------------------------------------------------------------------------- supernet
class SlicedConv2d(nn.Conv2d):
    """A conv at its largest size whose forward uses the leading channels and the kernel's centre."""

    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int = 1, depthwise: bool = False):
        super().__init__(c_in, c_out, kernel, stride, kernel // 2, groups=c_in if depthwise else 1, bias=False)
        self.depthwise = depthwise

    def sliced_weight(self, c_in: int, c_out: int, kernel: int) -> Tensor:
        o = (self.kernel_size[0] - kernel) // 2
        if self.depthwise:
            return self.weight[:c_in, :, o:o + kernel, o:o + kernel]
        return self.weight[:c_out, :c_in, o:o + kernel, o:o + kernel]

    def forward(self, x: Tensor, c_out: Optional[int] = None, kernel: Optional[int] = None) -> Tensor:
        c_in = x.shape[1]
        kernel = kernel or self.kernel_size[0]
        w = self.sliced_weight(c_in, c_out or c_in, kernel)
        return F.conv2d(x, w, None, self.stride, kernel // 2, 1, c_in if self.depthwise else 1)

    @torch.no_grad()
    def copy_to(self, conv: nn.Conv2d) -> None:
        c_in = conv.in_channels
        conv.weight.copy_(self.sliced_weight(c_in, conv.out_channels, conv.kernel_size[0]))


class SlicedBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm at its largest width; a narrower input uses (and in training updates) the leading entries.

    While `fixed` holds (mean, var), those replace the batch statistics (see TinySuperNet.frozen_batch_stats);
    with `capture` set, the next forward stores its batch statistics there."""

    fixed: Optional[tuple[Tensor, Tensor]] = None
    capture: bool = False

    def forward(self, x: Tensor) -> Tensor:
        c = x.shape[1]
        w, b = self.weight[:c], self.bias[:c]
        if self.capture:
            self.fixed = (x.detach().mean((0, 2, 3)), x.detach().var((0, 2, 3), unbiased=False))
        if self.fixed is not None:
            return F.batch_norm(x, self.fixed[0], self.fixed[1], w, b, False, 0.0, self.eps)
        return F.batch_norm(x, self.running_mean[:c], self.running_var[:c], w, b, self.training, self.momentum,
                            self.eps)

    @torch.no_grad()
    def copy_to(self, bn: nn.BatchNorm2d) -> None:
        c = bn.num_features
        bn.weight.copy_(self.weight[:c])
        bn.bias.copy_(self.bias[:c])
        bn.running_mean.copy_(self.running_mean[:c])
        bn.running_var.copy_(self.running_var[:c])


class SlicedLinear(nn.Linear):
    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight[:, :x.shape[1]], self.bias)

    @torch.no_grad()
    def copy_to(self, lin: nn.Linear) -> None:
        lin.weight.copy_(self.weight[:, :lin.in_features])
        lin.bias.copy_(self.bias)


class ChoiceLayer(nn.Module):
    """One searchable layer: every block type once, at its largest size; forward runs the chosen one
    (with the channel-matched shortcut at stride 1, as TinyBlock)."""

    def __init__(self, max_in: int, max_out: int, stride: int):
        super().__init__()
        hidden = max(EXPANSIONS) * max_in
        self.stride = stride
        self.mb_expand = SlicedConv2d(max_in, hidden, 1)
        self.mb_bn1 = SlicedBatchNorm2d(hidden)
        self.mb_dw = SlicedConv2d(hidden, hidden, max(KERNELS), stride, depthwise=True)
        self.mb_bn2 = SlicedBatchNorm2d(hidden)
        self.mb_project = SlicedConv2d(hidden, max_out, 1)
        self.mb_bn3 = SlicedBatchNorm2d(max_out)
        self.sep_dw = SlicedConv2d(max_in, max_in, 3, stride, depthwise=True)
        self.sep_bn1 = SlicedBatchNorm2d(max_in)
        self.sep_pw = SlicedConv2d(max_in, max_out, 1)
        self.sep_bn2 = SlicedBatchNorm2d(max_out)
        self.conv = SlicedConv2d(max_in, max_out, 3, stride)
        self.conv_bn = SlicedBatchNorm2d(max_out)
        if stride == 1:  # every branch starts as nothing added to the shortcut
            for bn in (self.mb_bn3, self.sep_bn2, self.conv_bn):
                nn.init.zeros_(bn.weight)

    def _parts(self, kind: str) -> list[nn.Module]:
        """The sliced modules of a block in the order of the standalone block's conv/BN layers."""
        if kind == "mb":
            return [self.mb_expand, self.mb_bn1, self.mb_dw, self.mb_bn2, self.mb_project, self.mb_bn3]
        if kind == "sep":
            return [self.sep_dw, self.sep_bn1, self.sep_pw, self.sep_bn2]
        return [self.conv, self.conv_bn]

    def forward(self, x: Tensor, block: str, c_out: int) -> Tensor:
        kind, k, e = block_kind(block)
        c_in = x.shape[1]
        if kind == "mb":
            h = F.relu(self.mb_bn1(self.mb_expand(x, c_in * e)))
            h = F.relu(self.mb_bn2(self.mb_dw(h, kernel=k)))
            h = self.mb_bn3(self.mb_project(h, c_out))
        elif kind == "sep":
            h = F.relu(self.sep_bn1(self.sep_dw(x)))
            h = self.sep_bn2(self.sep_pw(h, c_out))
        elif kind == "conv":
            h = self.conv_bn(self.conv(F.relu(x), c_out))
        else:
            return x
        return h + match_channels(x, c_in, c_out) if self.stride == 1 else h

    def copy_to(self, block: str, module: nn.Module) -> None:
        """Copy the inherited slices into the standalone block `module` (built by make_block)."""
        kind = block_kind(block)[0]
        if kind == "skip":
            return
        targets = [m for m in module.modules() if isinstance(m, (nn.Conv2d, nn.BatchNorm2d))]
        for src, dst in zip(self._parts(kind), targets, strict=True):
            src.copy_to(dst)


class TinySuperNet(nn.Module):
    """The weight-sharing supernet. `set_active(encoding)` (or `with net.active(encoding)`) picks the
    subnet the forward pass runs; until then it runs the largest."""

    def __init__(self, num_classes: int, in_shape: Sequence[int], mean: Sequence[float], std: Sequence[float],
                 width_mult: int = 1):
        super().__init__()
        self.space = TinySpace(width_mult)
        self.num_classes = int(num_classes)
        self.in_shape = tuple(int(s) for s in in_shape)
        self.mean, self.std = [float(m) for m in mean], [float(s) for s in std]
        self.normalize = Normalize(mean, std)
        self.stem = nn.Sequential(nn.Conv2d(self.in_shape[0], self.space.stem, 3, 1, 1, bias=False),
                                  SlicedBatchNorm2d(self.space.stem), nn.ReLU())
        layers, max_in = [], self.space.stem
        for i, stride in enumerate(self.space.strides(self.in_shape)):
            max_out = max(self.space.layer_widths[i])
            layers.append(ChoiceLayer(max_in, max_out, stride))
            max_in = max_out
        self.layers = nn.ModuleList(layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = SlicedLinear(max_in, num_classes)
        self._active = self.space.decode(self.space.largest())

    @property
    def active_genotype(self) -> TinyGenotype:
        return self._active

    def set_active(self, encoding: Sequence[int]) -> None:
        self._active = self.space.decode(encoding)

    @contextmanager
    def active(self, encoding: Sequence[int]) -> Iterator["TinySuperNet"]:
        previous = self._active
        self.set_active(encoding)
        try:
            yield self
        finally:
            self._active = previous

    @contextmanager
    def frozen_batch_stats(self, x: Tensor) -> Iterator["TinySuperNet"]:
        """Until exit, every BN normalises with the batch statistics the active subnet has on x (and updates
        no running statistics). An attack in train mode then perturbs each image alone: with live batch
        statistics, a perturbation of the whole batch moves the normalisation of every image together,
        and the attack fools the batch far below chance without finding per-image adversarial examples."""
        bns = [m for m in self.modules() if isinstance(m, SlicedBatchNorm2d)]
        for bn in bns:
            bn.fixed, bn.capture = None, True
        try:
            with torch.no_grad():
                self(x)
            for bn in bns:
                bn.capture = False
            yield self
        finally:
            for bn in bns:
                bn.fixed, bn.capture = None, False

    def forward(self, x: Tensor) -> Tensor:
        x = self.stem(self.normalize(x))
        for layer, (block, width) in zip(self.layers, self._active.layers):
            x = layer(x, block, width)
        return self.classifier(self.pool(x).flatten(1))

    def extract(self, encoding: Sequence[int] | TinyGenotype) -> TinyNetwork:
        """The standalone subnet with the supernet's weights and BN statistics copied (not shared)."""
        genotype = encoding if isinstance(encoding, TinyGenotype) else self.space.decode(encoding)
        if genotype.width_mult != self.space.width_mult:
            raise UserError(f"genotype is for width x{genotype.width_mult}, the supernet is x{self.space.width_mult}")
        net = TinyNetwork(genotype, self.num_classes, self.in_shape, self.mean, self.std)
        device = self.classifier.weight.device
        net.to(device)
        net.stem.load_state_dict(self.stem.state_dict())
        for layer, module, (block, _) in zip(self.layers, net.layers, genotype.layers):
            layer.copy_to(block, module)
        self.classifier.copy_to(net.classifier)
        net.train(self.training)
        return net


# ------------------------------------------------------------------------------------------- helpers
@torch.no_grad()
def recalibrate_bn(model: nn.Module, batches: Iterable[Tensor]) -> nn.Module:
    """Reset every BatchNorm's running statistics and re-estimate them as the plain average over
    `batches` (inputs in [0,1]); the model is left in eval mode. Inherited statistics belong to the
    whole supernet, not to this subnet."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [bn.momentum for bn in bns]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average
    model.train()
    for x in batches:
        model(x)
    for bn, m in zip(bns, momenta):
        bn.momentum = m
    model.eval()
    return model


def layer_frequencies(encodings: Sequence[Sequence[int]], width_mult: int = 1) -> dict[str, Any]:
    """Per layer, how often each block and each width choice occurs among `encodings` (the first front),
    as fractions: {"blocks": [[...len(BLOCKS)] per layer], "widths": [[...] per layer], "block_names",
    "width_choices"} -- the layer-by-layer analysis of TAM-NAS, ready for a heatmap. A skip layer counts
    under its (inherited) width too."""
    space = TinySpace(width_mult)
    n = max(len(encodings), 1)
    blocks = np.zeros((space.n_layers, len(BLOCKS)))
    widths = np.zeros((space.n_layers, max(len(w) for w in space.layer_widths)))
    for x in encodings:
        x = space.check(x)
        for i in range(space.n_layers):
            blocks[i, x[2 * i]] += 1
            widths[i, x[2 * i + 1]] += 1
    return {"blocks": (blocks / n).tolist(), "widths": (widths / n).tolist(), "block_names": list(BLOCKS),
            "width_choices": [list(w) for w in space.layer_widths]}


def _network(genotype: TinyGenotype, C: Optional[int], layers: Optional[int], num_classes: int,
             in_shape: Sequence[int], mean: Sequence[float], std: Sequence[float], **kw: Any) -> TinyNetwork:
    if C is not None or layers is not None or kw:
        raise UserError("a tiny-block genotype sets its own widths and depth: drop C, layers and cell options")
    return TinyNetwork(genotype, num_classes, in_shape, mean, std)


# TAM-NAS trains its own slice-sharing supernet (search/tiny_supernet.py), not the DARTS loop's.
register(Space("tiny", TinyGenotype.from_dict, _network, BLOCKS, supernet=None, sizes_itself=True, cells=False))
