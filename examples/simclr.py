"""SimCLR (or SogCLR with ``--base sogclr``) with GloFND and its baselines, trained for real.

Runs the methods none, fnc, single, glofnd and oracle on the same seeds and reports for each the
k-NN and linear-probe top-1 accuracy on a held-out split, and the false-negative precision,
recall and F1 per epoch (the class labels serve evaluation only, except for the oracle, which
removes same-class negatives). The default data set, scikit-learn's bundled handwritten digits
(1,797 images of 8×8, 10 classes), needs no download and trains in a few minutes on 2 CPU cores:

    python examples/simclr.py                                    # all 5 methods, seed 0
    python examples/simclr.py --base sogclr --seeds 0 1 2 --epochs 100 --out out/sogclr

``--dataset cifar10|stl10|imagefolder`` trains on real images; these need torchvision
(``pip install torchvision``), with ``--data-root DIR`` (``--download`` fetches CIFAR-10/STL-10;
for imagefolder DIR holds one sub-folder per class):

    python examples/simclr.py --dataset cifar10 --download --epochs 200 --device cuda

``--distributed`` trains on several processes, one per GPU (or on the CPU with gloo), started by
torchrun; ``--batch-size`` stays the global batch and the negatives come from all processes:

    torchrun --nproc-per-node 4 examples/simclr.py --distributed --device cuda --dataset cifar10

Writes to ``--out``: results.md / results.csv (one row per method), history.csv (per epoch),
accuracy.png, false_negatives.png, lambda_vs_quantile.png.
"""
from __future__ import annotations

import os
import sys
from typing import Optional

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402  (the examples' shared code, next to this file)

import glofnd  # noqa: E402


def parse_args(argv=None):
    p = common.base_parser(__doc__.split("\n")[0], epochs=40, alpha=0.05, out="out/simclr")
    p.add_argument("--base", choices=("simclr", "sogclr"), default="simclr",
                   help="the contrastive loss GloFND is applied to")
    p.add_argument("--temperature", type=float, default=0.1)
    p.add_argument("--gamma", type=float, default=0.9, help="SogCLR's moving-average weight")
    return common.finish_args(p.parse_args(argv))


def build_loss(args, method: str, num_samples: int) -> nn.Module:
    """The loss of one run. This is the one place where the loss is configured; with
    ``--distributed`` it gathers the negatives of all processes and shares one state among
    them (replicated, or sharded with ``--shard-state``)."""
    return glofnd.GloFNDLoss(num_samples, temperature=args.temperature, alpha=args.alpha,
                             lr=args.lr_lambda, base=args.base, method=method, gamma=args.gamma,
                             start_update=args.start_epoch, start_mask=args.start_epoch,
                             **common.loss_options(args))


def make_train_one(args, data: common.ImageData):
    device = args.device
    augment = common.make_augment(data)
    x, y = data.train_x.to(device), data.train_y.to(device)
    n = len(y)

    def train_one(method: str, seed: int) -> Optional[common.RunResult]:
        encoder = common.image_encoder(data)
        model = nn.Sequential(encoder, common.projection_head(encoder.dim)).to(device)
        loss_fn = build_loss(args, method, n).to(device)  # outside DDP: DDP must not sync it
        sampler = None
        if args.distributed:
            sampler = common.GlobalBatches(n, args.batch_size, seed, args.rank, args.world_size)
        net = common.wrap_ddp(model, args)

        def step(idx):
            idx = idx.to(device)
            xb = x[idx]
            v0, v1 = augment(xb), augment(xb)
            if sampler is not None:  # views of the whole global batch, the same on every
                v0, v1, idx = (sampler.local(t) for t in (v0, v1, idx))  # process: keep ours
            z0, z1 = net(torch.cat([v0, v1])).chunk(2)
            return loss_fn(z0, z1, idx, labels=y[idx])

        model.train()
        history = common.train_epochs(net.parameters(), loss_fn, step, n, args.epochs,
                                      args.batch_size, args.lr, f"{method} seed {seed}",
                                      progress=not args.no_progress and common.is_main(args),
                                      sampler=sampler)
        fnd = getattr(loss_fn, "fnd", None)  # GloFND state: (N,) for glofnd, (1,) for single
        lam_final = common.full_lambdas(fnd)  # collective when sharded
        common.save_state(args, method, seed, loss_fn, model)
        if not common.is_main(args):
            return None
        model.eval()
        f_train = common.embed(encoder, data.train_x, device)
        f_test = common.embed(encoder, data.test_x, device)
        metrics = {
            "knn_top1": common.knn_top1(f_train, data.train_y, f_test, data.test_y),
            "linear_top1": common.linear_probe_top1(f_train, data.train_y, f_test, data.test_y),
        }
        lambdas = {}
        if fnd is not None and args.start_epoch < args.epochs:
            # The value λ estimates, from the final model over the whole training set: each
            # sample's (1−α)-quantile of its cosines to all other samples, each seen, as in
            # training, through random views (one view as anchor, columns: both views of the
            # others; self and positive excluded).
            with torch.no_grad():
                za, zb = (common.embed(lambda xb: model(augment(xb)), data.train_x, device)
                          for _ in range(2))
            rows = torch.randperm(n)[:5000].sort().values if n > 5000 else None
            q = common.true_quantiles(za, [zb, za], args.alpha, rows=rows)
            lam = lam_final.float().cpu().expand(n)
            lam = lam if rows is None else lam[rows]
            lambdas["λ_i" if method == "glofnd" else "shared λ"] = (lam, q)
            metrics["lambda_err"] = float((lam - q).abs().median())
        return common.RunResult(metrics, history, lambdas)

    return train_one


def main(argv=None):
    args = parse_args(argv)
    base = "SimCLR" if args.base == "simclr" else "SogCLR"
    return common.main(
        args,
        lambda data: (f"{data.name}: {len(data.train_y)} training and {len(data.test_y)} "
                      f"held-out images {tuple(data.train_x.shape[1:])}, {data.num_classes} "
                      f"classes; glofnd {glofnd.implementation}; device {args.device}"),
        make_train_one, ("knn_top1", "linear_top1"), lambda data: f"{base} on {data.name}")


if __name__ == "__main__":
    main()
