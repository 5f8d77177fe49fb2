"""AdvRush: the curvature penalty in its public-code form and in the other forms robustnas offers, at one
supernet state, on the alpha batch of an AdvRush search: the penalty's value and its alpha gradient beside
the cross-entropy's (norms, the penalty's share ||g_pen|| / (||g_ce|| + ||g_pen||), their cosine).

The state is a finished `robustnas search --method advrush` run directory (its last checkpoint), or, with
--init, the same supernet before any training (BN statistics from one forward pass of the alpha batch).

    python benchmarks/advrush_forms.py RUN_DIR [--init] [--h 1.5]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F

FORMS = {  # name: (penalty, penalty_scale, h_space)
    "code: 4 * norm, normalised input (default)": ("norm", 4.0, "normalized"),
    "4 * norm, pixels": ("norm", 4.0, "pixel"),
    "squared, normalised input": ("squared", 1.0, "normalized"),
    "paper: squared, pixels (robustnas before)": ("squared", 1.0, "pixel"),
}


def main() -> None:
    from robustnas.core.config import SearchCommand, load_yaml, parse_eps, validate
    from robustnas.app.pipeline import load_data
    from robustnas.search import SearchContext, build_strategy
    from robustnas.search.advrush import curvature_penalty

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run_dir")
    ap.add_argument("--init", action="store_true", help="the supernet before training, not the run's last state")
    ap.add_argument("--h", type=float, default=1.5)
    args = ap.parse_args()
    torch.set_num_threads(1)

    run = Path(args.run_dir)
    cmd = validate(SearchCommand, load_yaml(run / "config.yaml"))
    data = load_data(cmd.data, cmd.seed)
    strat = build_strategy(cmd.method, cmd.search)
    ctx = SearchContext(data=data, eps=parse_eps(cmd.attack.eps), norm=cmd.attack.norm, seed=cmd.seed,
                        out_dir=run, progress=False)
    strat.setup(ctx)
    if strat.cfg.alpha_batch == "fixed":
        x, y = strat.x_fixed, strat.y_fixed
    else:
        x, y = data.train.x[strat.a_idx[:strat.cfg.batch_size]], data.train.y[strat.a_idx[:strat.cfg.batch_size]]
    net = strat.net
    if args.init:
        with torch.no_grad():
            net(x)
    else:
        loop = strat.epoch_loop()
        loop.resume()
        print(f"state after epoch {loop.start_epoch - 1} of {run}")
    std = torch.tensor(data.meta.std).view(1, -1, 1, 1)
    net.train()
    g_ce = torch.cat([g.flatten() for g in torch.autograd.grad(F.cross_entropy(net(x), y), strat.alphas)])
    gamma = strat.cfg.gamma
    print(f"{data.meta.name}, {len(y)} alpha-batch images, h = {args.h}, gamma = {gamma}, ||g_ce|| = {g_ce.norm():.3e}")
    print(f"| form | penalty | gamma * penalty | ||g_pen|| | share | cosine |\n|---|---|---|---|---|---|")
    for name, (form, scale, space) in FORMS.items():
        net.eval()
        p = scale * curvature_penalty(net, x, y, args.h, penalty=form, std=std if space == "normalized" else None)
        net.train()
        g = torch.cat([t.flatten() for t in torch.autograd.grad(gamma * p, strat.alphas)])
        share = g.norm() / (g.norm() + g_ce.norm())
        print(f"| {name} | {p.item():.4g} | {gamma * p.item():.3g} | {g.norm():.3e} | {share:.4f} | "
              f"{F.cosine_similarity(g, g_ce, dim=0):+.3f} |")


if __name__ == "__main__":
    main()
