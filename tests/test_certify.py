"""Certified bounds: sound against sampled and attacked points, exact at eps=0, CROWN no looser than IBP,
monotone in eps, differentiable in a supernet's alphas, and a bisected radius that is certified."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from robustnas.robustness.certify import (certified_accuracy, certified_radius, crown_bounds, ibp_bounds,
                               margin_lower_bound)
from robustnas.core.errors import UserError
from robustnas.nets.models.base import Normalize

TOL = 1e-4  # float32 slack for "inside the bounds"


# ------------------------------------------------------------------------------------------- tiny nets
def randomize_bn(model: nn.Module, seed: int) -> nn.Module:
    """Non-trivial running statistics, so eval-mode BN is a real affine map."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.3)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            if m.affine:
                m.weight.data.copy_(torch.randn(m.num_features, generator=g))
                m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    return model.eval()


def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 20), nn.ReLU(), nn.Linear(20, 12), nn.ReLU(), nn.Linear(12, 3))


def hand_cnn(seed=0):
    """Normalize + conv-BN-ReLU + max-pool + strided conv + global average pool + linear, like models/."""
    torch.manual_seed(seed)
    net = nn.Sequential(
        Normalize([0.4], [0.3]),
        nn.Conv2d(1, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(4, 6, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(6), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 3),
    )
    return randomize_bn(net, seed)


class ResNetish(nn.Module):
    """A projection residual block and an identity one (F.relu, +, mean over space)."""

    def __init__(self):
        super().__init__()
        self.norm = Normalize([0.5], [0.5])
        self.stem = nn.Conv2d(1, 4, 3, padding=1)
        self.c1, self.b1 = nn.Conv2d(4, 6, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(6)
        self.c2, self.b2 = nn.Conv2d(6, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6)
        self.short = nn.Conv2d(4, 6, 1, stride=2, bias=False)
        self.c3 = nn.Conv2d(6, 6, 3, padding=2, dilation=2)
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        x = F.relu(self.stem(self.norm(x)))
        out = F.relu(self.b1(self.c1(x)))
        out = F.relu(self.b2(self.c2(out)) + self.short(x))
        out = torch.relu(out + self.c3(out))
        return self.fc(out.mean([2, 3]))


def resnetish(seed=0):
    torch.manual_seed(seed)
    return randomize_bn(ResNetish(), seed)


class Functional(nn.Module):
    """The functional forms: F.conv2d / F.batch_norm / F.linear with constant weights, F.max_pool2d
    with ceil_mode and dilation, F.pad, view, slicing, negative constants, sub and division."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(5, 2, 3, 3) * 0.5)
        self.b = nn.Parameter(torch.randn(5) * 0.1)
        self.register_buffer("mean", torch.randn(5) * 0.1)
        self.register_buffer("var", torch.rand(5) + 0.5)
        self.fc = nn.Parameter(torch.randn(3, 5 * 3 * 3) * 0.3)
        self.register_buffer("signs", torch.tensor([1.0, -0.5, 2.0]))

    def forward(self, x):
        x = torch.cat([x, 1.0 - x], 1) / 0.5
        x = F.conv2d(x, self.w, self.b, stride=1, padding=1)
        x = F.batch_norm(x, self.mean, self.var, None, None, False, 0.1, 1e-5)
        x = F.max_pool2d(torch.relu(x), 3, stride=2, padding=1, dilation=1, ceil_mode=True)  # 8x8 -> 5x5
        x = F.pad(x, (0, 1, 0, 1))[:, :, 1:, 1:] - 0.25 * x  # a shifted copy minus the original
        x = F.max_pool2d(x, 2, stride=1, dilation=2)  # 5x5 -> 3x3
        logits = F.linear(x.view(x.size(0), -1), self.fc)
        return -logits * self.signs - 0.5 * logits


def functional(seed=0):
    torch.manual_seed(seed)
    return Functional().eval()


# -- a DARTS-like supernet: MixedOp = sum(w * op(x) for w, op in zip(softmax(alpha), ops))
class Zero(nn.Module):
    def __init__(self, stride):
        super().__init__()
        self.stride = stride

    def forward(self, x):
        return x.mul(0.0) if self.stride == 1 else x[:, :, ::self.stride, ::self.stride].mul(0.0)


class FactorizedReduce(nn.Module):
    def __init__(self, c_in, c_out):
        super().__init__()
        self.relu = nn.ReLU()
        self.c1 = nn.Conv2d(c_in, c_out // 2, 1, stride=2, bias=False)
        self.c2 = nn.Conv2d(c_in, c_out // 2, 1, stride=2, bias=False)
        self.bn = nn.BatchNorm2d(c_out, affine=False)

    def forward(self, x):
        x = self.relu(x)
        return self.bn(torch.cat([self.c1(x), self.c2(x[:, :, 1:, 1:])], dim=1))


def sep_conv(c, stride, dilation=1):
    pad = dilation
    return nn.Sequential(nn.ReLU(), nn.Conv2d(c, c, 3, stride, pad, dilation=dilation, groups=c, bias=False),
                         nn.Conv2d(c, c, 1, bias=False), nn.BatchNorm2d(c, affine=False))


def ops_for(c, stride):
    return nn.ModuleList([
        Zero(stride),
        nn.MaxPool2d(3, stride, padding=1),
        nn.AvgPool2d(3, stride, padding=1, count_include_pad=False),
        nn.Identity() if stride == 1 else FactorizedReduce(c, c),
        sep_conv(c, stride),
        sep_conv(c, stride, dilation=2),
    ])


N_OPS = 6


class MixedOp(nn.Module):
    def __init__(self, c, stride):
        super().__init__()
        self._ops = ops_for(c, stride)

    def forward(self, x, weights):
        return sum(w * op(x) for w, op in zip(weights, self._ops))


class Cell(nn.Module):
    """Two intermediate nodes over 5 edges; output cat + channel shuffle."""

    def __init__(self, c_in, c, reduction):
        super().__init__()
        self.pre0 = nn.Sequential(nn.ReLU(), nn.Conv2d(c_in, c, 1, bias=False), nn.BatchNorm2d(c, affine=False))
        self.pre1 = nn.Sequential(nn.ReLU(), nn.Conv2d(c_in, c, 1, bias=False), nn.BatchNorm2d(c, affine=False))
        self.edges = nn.ModuleList()
        for i in range(2):
            for j in range(2 + i):
                self.edges.append(MixedOp(c, 2 if reduction and j < 2 else 1))

    def forward(self, s0, s1, weights):
        states = [self.pre0(s0), self.pre1(s1)]
        offset = 0
        for _ in range(2):
            s = sum(self.edges[offset + j](h, weights[offset + j]) for j, h in enumerate(states))
            offset += len(states)
            states.append(s)
        out = torch.cat(states[-2:], dim=1)
        n, c, h, w = out.size()
        return out.view(n, 2, c // 2, h, w).transpose(1, 2).contiguous().view(n, c, h, w)


class TinySupernet(nn.Module):
    def __init__(self, c=2, classes=3):
        super().__init__()
        self.norm = Normalize([0.5], [0.3])
        self.stem = nn.Sequential(nn.Conv2d(1, 2 * c, 3, padding=1, bias=False), nn.BatchNorm2d(2 * c))
        self.cell1 = Cell(2 * c, c, reduction=False)
        self.cell2 = Cell(2 * c, c, reduction=True)
        self.fc = nn.Linear(2 * c, classes)
        self.alphas_normal = nn.Parameter(1e-1 * torch.randn(5, N_OPS))
        self.alphas_reduce = nn.Parameter(1e-1 * torch.randn(5, N_OPS))
        self.register_buffer("scale", torch.tensor([1.0, -0.7, 1.3]))

    def forward(self, x):
        s = self.stem(self.norm(x))
        s1 = self.cell1(s, s, F.softmax(self.alphas_normal, dim=-1))
        s2 = self.cell2(s, F.avg_pool2d(s1, 3, 1, 1, count_include_pad=False) + s1, F.softmax(self.alphas_reduce, -1))
        pooled = F.adaptive_avg_pool2d(s2, 1).flatten(1)
        return self.fc(pooled) * self.scale + 0.1


def supernet(seed=0):
    torch.manual_seed(seed)
    return randomize_bn(TinySupernet(), seed)


NETS = {
    "mlp": (mlp, (1, 4, 4)),
    "hand_cnn": (hand_cnn, (1, 8, 8)),
    "resnetish": (resnetish, (1, 8, 8)),
    "functional": (functional, (1, 8, 8)),
    "supernet": (supernet, (1, 6, 6)),
}


def data(name, n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, *NETS[name][1], generator=g)
    y = torch.randint(0, 3, (n,), generator=g)
    return x, y


def all_bounds(model, x, eps, raw=False):
    """name -> (lower, upper) of the logits, for every method."""
    out = {"ibp": ibp_bounds(model, x, eps)}
    for inter in ("ibp", "crown", "forward", "zonotope"):
        out[f"crown/{inter}"] = crown_bounds(model, x, eps, intermediate=inter, intersect_ibp=not raw)
    return out


# ------------------------------------------------------------------------------------------- attacks in the test
def margin(logits, y):
    other = logits.clone()
    other[torch.arange(len(y)), y] = float("-inf")
    return logits[torch.arange(len(y)), y] - other.max(1).values


def pgd_points(model, x, eps, objectives, steps=10, seed=0):
    """For each objective(logits) -> (N,), points of the ball within [0, 1] that maximise it (sign-gradient
    ascent, all objectives in one batch): (R, N, ...)."""
    g = torch.Generator().manual_seed(seed)
    r = len(objectives)
    lo, hi = (x - eps).clamp(min=0).expand(r, *x.shape), (x + eps).clamp(max=1).expand(r, *x.shape)
    z = lo + (hi - lo) * torch.rand(lo.shape, generator=g)
    for _ in range(steps):
        z.requires_grad_(True)
        logits = model(z.flatten(0, 1)).view(r, x.shape[0], -1)
        total = sum(f(logits[i]).sum() for i, f in enumerate(objectives))
        (grad,) = torch.autograd.grad(total, z)
        z = torch.min(torch.max(z.detach() + eps / 4 * grad.sign(), lo), hi)
    return z.detach()


def ball_points(model, x, y, eps, seed=0):
    """Uniform points, corners (sign vectors) and PGD points that push every logit up and down and the
    margin down: (P, N, ...)."""
    g = torch.Generator().manual_seed(seed)
    lo, hi = (x - eps).clamp(min=0).expand(20, *x.shape), (x + eps).clamp(max=1).expand(20, *x.shape)
    uniform = lo + (hi - lo) * torch.rand(lo.shape, generator=g)
    corners = torch.where(torch.rand(lo.shape, generator=g) < 0.5, lo, hi)
    pts = [uniform, corners]
    if eps > 0:
        objectives = [lambda z: -margin(z, y)]
        objectives += [lambda z, k=k: z[:, k] for k in range(3)] + [lambda z, k=k: -z[:, k] for k in range(3)]
        pts.append(pgd_points(model, x, eps, objectives, seed=seed))
    return torch.cat(pts)


# ------------------------------------------------------------------------------------------- (1) soundness
@pytest.mark.parametrize("name", list(NETS))
@pytest.mark.parametrize("eps", [0.02, 0.1])
def test_bounds_contain_every_point_of_the_ball(name, eps):
    model = NETS[name][0]()
    x, y = data(name)
    bounds = {**all_bounds(model, x, eps), **{f"raw {k}": v for k, v in all_bounds(model, x, eps, raw=True).items()
                                              if k != "ibp"}}
    margins = {m: margin_lower_bound(model, x, y, eps, m)
               for m in ("ibp", "crown-ibp", "crown", "crown-fwd", "crown-zono")}
    C = torch.tensor([[1.0, -1.0, 0.0], [0.5, 0.5, -2.0]])  # a spec shared by the batch
    spec_lo, spec_hi = crown_bounds(model, x, eps, C=C, intermediate="crown", intersect_ibp=False)
    points = ball_points(model, x, y, eps)
    assert (points - x).abs().max() <= eps + 1e-6 and points.min() >= 0 and points.max() <= 1
    with torch.no_grad():
        logits = model(points.flatten(0, 1)).view(len(points), *x.shape[:1], -1)  # (P, N, K)
    for method, (lo, hi) in bounds.items():
        assert (logits >= lo - TOL).all() and (logits <= hi + TOL).all(), method
    for method, m in margins.items():
        assert all((margin(p, y) >= m - TOL).all() for p in logits), method
    spec = logits @ C.T
    assert (spec >= spec_lo - TOL).all() and (spec <= spec_hi + TOL).all()


def test_an_affine_model_is_bounded_exactly():
    """Normalize + one Linear layer (weights of both signs): every method gives the exact extremes."""
    torch.manual_seed(1)
    lin = nn.Linear(16, 3)
    model = nn.Sequential(Normalize([0.5], [0.2]), nn.Flatten(), lin, nn.Identity())
    x = torch.rand(3, 1, 4, 4, generator=torch.Generator().manual_seed(2))
    eps = 0.05
    lo_in, hi_in = (x - eps).clamp(min=0).flatten(1), (x + eps).clamp(max=1).flatten(1)
    w = lin.weight / 0.2
    b = lin.bias - (0.5 / 0.2) * lin.weight.sum(1)
    exact_lo = lo_in @ w.clamp(min=0).T + hi_in @ w.clamp(max=0).T + b
    exact_hi = hi_in @ w.clamp(min=0).T + lo_in @ w.clamp(max=0).T + b
    for method, (lo, hi) in all_bounds(model, x, eps, raw=True).items():
        torch.testing.assert_close(lo, exact_lo, atol=1e-4, rtol=1e-4, msg=method)
        torch.testing.assert_close(hi, exact_hi, atol=1e-4, rtol=1e-4, msg=method)


# ------------------------------------------------------------------------------------------- (2) eps = 0
@pytest.mark.parametrize("name", list(NETS))
def test_bounds_at_eps_zero_are_the_logits(name):
    model = NETS[name][0]()
    x, y = data(name)
    with torch.no_grad():
        logits = model(x)
    for method, (lo, hi) in all_bounds(model, x, 0.0, raw=True).items():
        torch.testing.assert_close(lo, logits, atol=1e-4, rtol=1e-4, msg=method)
        torch.testing.assert_close(hi, logits, atol=1e-4, rtol=1e-4, msg=method)
    for method in ("ibp", "crown-ibp", "crown", "crown-fwd", "crown-zono"):
        torch.testing.assert_close(margin_lower_bound(model, x, y, 0.0, method), margin(logits, y),
                                   atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------------------------------- (3) CROWN vs IBP
@pytest.mark.parametrize("name", list(NETS))
def test_crown_is_never_looser_than_ibp(name):
    model = NETS[name][0]()
    x, y = data(name)
    eps = 0.05
    bounds = all_bounds(model, x, eps)
    ibp_lo, ibp_hi = bounds.pop("ibp")
    for method, (lo, hi) in bounds.items():
        assert (lo >= ibp_lo - 1e-5).all() and (hi <= ibp_hi + 1e-5).all(), method
    m_ibp = margin_lower_bound(model, x, y, eps, "ibp")
    for method in ("crown-ibp", "crown", "crown-fwd", "crown-zono"):
        assert (margin_lower_bound(model, x, y, eps, method) >= m_ibp - 1e-5).all()


@pytest.mark.parametrize("name", ["mlp", "hand_cnn", "resnetish", "supernet"])
def test_raw_crown_is_tighter_than_ibp_in_total(name):
    """Not a theorem elementwise, but on these nets the linear relaxation must beat intervals clearly."""
    model = NETS[name][0]()
    x, _ = data(name)
    ibp_lo, ibp_hi = ibp_bounds(model, x, 0.05)
    lo, hi = crown_bounds(model, x, 0.05, intermediate="crown", intersect_ibp=False)
    assert (hi - lo).sum() < 0.9 * (ibp_hi - ibp_lo).sum()


# ------------------------------------------------------------------------------------------- (4) monotone in eps
@pytest.mark.parametrize("name", list(NETS))
def test_bounds_widen_with_eps(name):
    model = NETS[name][0]()
    x, _ = data(name)
    crown = name in ("mlp", "hand_cnn")  # IBP is monotone by construction; CROWN only in practice
    methods = ["ibp", "crown/ibp", "crown/crown", "crown/forward", "crown/zonotope"] if crown else ["ibp"]
    previous = None
    for eps in (0.0, 0.01, 0.03, 0.1):
        bounds = all_bounds(model, x, eps) if crown else {"ibp": ibp_bounds(model, x, eps)}
        if previous is not None:
            for m in methods:
                assert (bounds[m][0] <= previous[m][0] + 1e-5).all(), (m, eps)
                assert (bounds[m][1] >= previous[m][1] - 1e-5).all(), (m, eps)
        previous = bounds
    lo, hi = bounds["ibp"]
    assert (hi - lo).min() > 0


# ------------------------------------------------------------------------------------------- (5) gradient in alpha
@pytest.mark.parametrize("method", ["ibp", "crown-ibp"])
def test_margin_bound_is_differentiable_in_alpha(method):
    model = supernet().double()
    x, y = data("supernet")
    x = x.double()
    eps = 0.03
    alpha = model.alphas_normal

    def bound():
        return margin_lower_bound(model, x, y, eps, method).sum()

    (grad,) = torch.autograd.grad(bound(), alpha)
    assert grad.abs().sum() > 0
    h = 1e-6
    with torch.no_grad():
        for i, j in [(0, 1), (1, 4), (3, 2), (4, 5)]:
            alpha[i, j] += h
            up = bound()
            alpha[i, j] -= 2 * h
            down = bound()
            alpha[i, j] += h
            torch.testing.assert_close(grad[i, j], (up - down) / (2 * h), atol=1e-6, rtol=1e-4)
    assert model.alphas_normal.grad is None


def test_crown_gradient_reaches_alpha_and_weights():
    model = supernet()
    x, y = data("supernet")
    margin_lower_bound(model, x, y, 0.03, "crown").sum().backward()
    for p in (model.alphas_normal, model.alphas_reduce, model.fc.weight, model.stem[0].weight):
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0


# ------------------------------------------------------------------------------------------- (6) accuracy and radius
def labelled(model, x, seed=0):
    """Labels the model gets right except every third one, so both cases occur."""
    with torch.no_grad():
        y = model(x).argmax(1)
    y[::3] = (y[::3] + 1) % 3
    return y


@pytest.mark.parametrize("method", ["ibp", "crown-ibp"])
def test_certified_radius_is_certified_and_tight(method):
    model = hand_cnn()
    x, _ = data("hand_cnn", n=12, seed=3)
    y = labelled(model, x)
    tol = 1e-3
    r = certified_radius(model, x, y, method=method, max_eps=0.5, tol=tol, batch_size=5)
    with torch.no_grad():
        correct = model(x).argmax(1) == y
    assert (r[~correct] == 0).all()
    assert (r[correct] > 0).all()
    inside = correct & (r < 0.5 - 2 * tol)
    assert inside.any()
    assert (margin_lower_bound(model, x[correct], y[correct], r[correct], method) > 0).all()
    assert (margin_lower_bound(model, x[inside], y[inside], r[inside] + 2 * tol, method) <= 0).all()
    # certified accuracy at eps agrees with the radii (IBP is monotone in eps)
    eps = float(r[correct].median())
    acc = certified_accuracy(model, x, y, eps, method=method, batch_size=5)
    if method == "ibp":
        assert (r >= eps + tol).float().mean() <= acc <= (r >= eps - 2 * tol).float().mean()
    assert acc <= correct.float().mean()


@pytest.mark.parametrize("method", ["ibp", "crown-ibp", "crown", "crown-fwd", "crown-zono"])
def test_certified_accuracy_is_at_most_clean_accuracy(method):
    model = resnetish()
    x, _ = data("resnetish", n=9, seed=4)
    y = labelled(model, x)
    clean = 6 / 9
    accs = [certified_accuracy(model, x, y, eps, method=method, batch_size=4) for eps in (0.0, 0.002, 0.05)]
    assert accs[0] == pytest.approx(clean)
    assert accs[0] >= accs[1] >= accs[2]


# ------------------------------------------------------------------------------------------- modes and errors
def test_bounds_use_eval_mode_and_restore_the_callers_mode():
    model = hand_cnn()
    x, y = data("hand_cnn")
    with torch.no_grad():
        logits = model(x)
    model.train()
    model[2].eval()  # a mixed mode must come back as it was
    stats = model[2].running_mean.clone(), model[6].running_mean.clone()
    lo, hi = crown_bounds(model, x, 0.0, intermediate="crown")
    margin_lower_bound(model, x, y, 0.01, "ibp")
    certified_radius(model, x, y, max_eps=0.1, tol=0.01)
    torch.testing.assert_close(lo, logits, atol=1e-4, rtol=1e-4)
    assert model.training and not model[2].training and model[6].training
    assert torch.equal(stats[0], model[2].running_mean) and torch.equal(stats[1], model[6].running_mean)


class Sigmoidal(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 2)
        self.act = nn.Sigmoid()

    def forward(self, x):
        return self.fc(self.act(x.flatten(1)))


class Square(nn.Module):
    def forward(self, x):
        x = x.flatten(1)
        return x * x


class Branchy(nn.Module):
    def forward(self, x):
        return x.flatten(1) if x.sum() > 0 else -x.flatten(1)


@pytest.mark.parametrize("model,words", [
    (Sigmoidal(), "Sigmoid"),
    (Square(), "product of two input-dependent"),
    (Branchy(), "cannot trace"),
])
def test_unsupported_models_are_refused_with_the_op_named(model, words):
    x = torch.rand(2, 1, 2, 2)
    for call in (lambda: ibp_bounds(model, x, 0.1), lambda: crown_bounds(model, x, 0.1)):
        with pytest.raises(UserError, match=words):
            call()


def test_bad_arguments_raise_user_errors():
    model = mlp()
    x, y = data("mlp")
    with pytest.raises(UserError, match="eps"):
        ibp_bounds(model, x, -0.1)
    with pytest.raises(UserError, match="clip"):
        ibp_bounds(model, x + 2.0, 0.1)
    with pytest.raises(UserError, match="method"):
        margin_lower_bound(model, x, y, 0.1, "lp")
    with pytest.raises(UserError, match="intermediate"):
        crown_bounds(model, x, 0.1, intermediate="lp")
    with pytest.raises(UserError, match="C must have shape"):
        crown_bounds(model, x, 0.1, C=torch.ones(2, 4))
    with pytest.raises(UserError, match="labels"):
        margin_lower_bound(model, x, y + 3, 0.1)
    with pytest.raises(UserError, match="y must be"):
        certified_accuracy(model, x, y[:2], 0.1)


# ------------------------------------------------------------------------------------------- speed paths
def test_certification_bounds_only_correctly_classified_samples(monkeypatch):
    import robustnas.robustness.certify as certify

    model = hand_cnn()
    x, _ = data("hand_cnn", n=12, seed=3)
    y = labelled(model, x)
    with torch.no_grad():
        correct = model(x).argmax(1) == y
    assert 0 < int(correct.sum()) < len(x)
    sizes = []
    real = certify._margin

    def counting(traced, xb, *args, **kw):
        sizes.append(len(xb))
        return real(traced, xb, *args, **kw)

    monkeypatch.setattr(certify, "_margin", counting)
    r = certified_radius(model, x, y, method="ibp", max_eps=0.5, tol=1e-2)
    assert max(sizes) == int(correct.sum()) and (r[~correct] == 0).all()
    sizes.clear()
    certified_accuracy(model, x, y, 0.01, method="ibp")
    assert sizes == [int(correct.sum())]


def test_conv_transpose_path_equals_the_vjp():
    """CROWN through Conv2d by a transposed convolution gives the bound of the generic vjp (odd sizes,
    stride, dilation, groups)."""
    from robustnas.robustness.bounds import TracedModel
    from robustnas.robustness.bounds.crown import backward_lower

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 3, stride=2, padding=1), nn.ReLU(),
                          nn.Conv2d(4, 4, 3, padding=2, dilation=2, groups=2), nn.ReLU(),
                          nn.Conv2d(4, 3, 2, stride=3), nn.Flatten()).eval()
    x = torch.rand(2, 2, 9, 7)
    graph = TracedModel(model).propagate(x - 0.05, x + 0.05)
    assert sum(s.transpose is not None for s in graph.steps) == 3
    spec = torch.randn(2, 5, *graph.steps[graph.output].lo.shape[1:])
    fast = backward_lower(graph, graph.output, spec)
    for s in graph.steps:
        s.transpose = None
    graph._vjps.clear()
    torch.testing.assert_close(fast, backward_lower(graph, graph.output, spec), rtol=1e-5, atol=1e-5)


class TiedPaths(nn.Module):
    """A max-pool over a flat patch (every window a tie), two signed paths from it that cancel, a ReLU."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(1, 3, 2, bias=False)
        self.fc = nn.Linear(3 * 4 * 4, 3)

    def forward(self, x):
        p = F.max_pool2d(x, 2, 1)
        a = self.conv(p)
        d = (a * 2.0 - a) - a + 0.5  # == 0.5 for every input
        return self.fc(torch.relu(d - 0.2).flatten(1))


def test_zonotope_intervals_keep_the_correlations_that_forward_bounds_lose():
    """The value feeding the ReLU is the constant 0.3: its zonotope interval has width 0 (each relaxation's
    slack is one symbol that the cancelling paths cancel), the forward linear bounds' does not (their lower
    and upper functions part at the tied max-pool and |W| widens the gap on every path)."""
    from robustnas.robustness.bounds import ForwardBounds, TracedModel, ZonotopeBounds

    model = TiedPaths().eval()
    x = torch.full((1, 1, 6, 6), 0.5)
    lo, hi = x - 0.1, x + 0.1
    traced = TracedModel(model)
    widths = {}
    for name, hook in (("forward", ForwardBounds), ("zonotope", ZonotopeBounds)):
        graph = traced.propagate(lo, hi, forward=hook(lo, hi))
        pre = graph.steps[[s.kind for s in graph.steps].index("relu")].inputs[0]
        torch.testing.assert_close(graph.steps[pre].lo.mean(), torch.tensor(0.3), atol=0.5, rtol=0)
        widths[name] = float((graph.steps[pre].hi - graph.steps[pre].lo).max())
    assert widths["zonotope"] < 1e-6 < 0.1 < widths["forward"]
    with torch.no_grad():
        logits = model(x)
    y = logits.argmax(1)
    exact = margin(logits, y)  # the model is constant on the ball
    torch.testing.assert_close(margin_lower_bound(model, x, y, 0.1, "crown-zono"), exact, atol=1e-5, rtol=0)
    assert margin_lower_bound(model, x, y, 0.1, "crown-fwd") < exact - 0.01


def test_zonotope_that_runs_out_of_columns_stays_sound():
    """Past max_columns the zonotope stops and later values keep their IBP intervals: looser, still sound."""
    from robustnas.robustness.bounds import zonotope

    model = supernet()
    x, y = data("supernet")
    eps = 0.05
    full = margin_lower_bound(model, x, y, eps, "crown-zono")
    old = zonotope.MAX_COLUMNS
    zonotope.MAX_COLUMNS = x[0].numel() + 2  # the first relaxation already overflows
    try:
        capped = margin_lower_bound(model, x, y, eps, "crown-zono")
    finally:
        zonotope.MAX_COLUMNS = old
    torch.testing.assert_close(capped, margin_lower_bound(model, x, y, eps, "crown-ibp"))
    assert (capped <= full + 1e-5).all() and (capped < full - 1e-3).any()
    points = ball_points(model, x, y, eps)
    with torch.no_grad():
        worst = torch.stack([margin(model(p), y) for p in points]).min(0).values
    assert (worst >= full - TOL).all()
