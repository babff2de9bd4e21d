"""CLIP with GloFND and its baselines on image-caption pairs built from handwritten digits.

Every image of scikit-learn's digits gets one caption drawn from several templates of its class
("a handwritten 7", "the number seven written by hand", "a thick drawing of a seven", ...): many
pairs share their meaning, so a batch holds true false negatives, as web image-text data does.
A small conv net (images) and a bag-of-words encoder (captions) are trained from scratch with
the CLIP loss (or SogCLR's global contrastive loss, ``--base sogclr``) for the methods none,
fnc, single, glofnd and oracle on the same seeds. Reported on the held-out pairs: zero-shot
accuracy (class prompts averaged over the templates), image→text and text→image recall@1, and
the false-negative precision/recall/F1 per epoch (labels serve evaluation only, except for the
oracle).

    python examples/clip.py                                   # all 5 methods, seed 0
    python examples/clip.py --seeds 0 1 2 --epochs 60 --out out/clip
    torchrun --nproc-per-node 2 examples/clip.py --distributed     # 2 processes (gloo, CPU)

Writes to ``--out``: results.md / results.csv (one row per method), history.csv (per epoch),
accuracy.png, false_negatives.png, lambda_vs_quantile.png.
"""
from __future__ import annotations

import math
import os
import sys
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402  (the examples' shared code, next to this file)

import glofnd  # noqa: E402

# {word}: the digit's name, {num}: its numeral, {adj}: "thick" or "thin" (the image's ink
# against its class median), so a caption carries a little more than the class.
TEMPLATES = (
    "a photo of the digit {word}",
    "a handwritten {num}",
    "the number {word} written by hand",
    "a {adj} drawing of a {word}",
    "digit {num} in {adj} strokes",
    "an image of a {adj} {num}",
)
ADJECTIVES = ("thick", "thin")


class Captions:
    """Captions of the digits and their word vocabulary (index 0 pads).

    ``make(labels, ink, rng)`` draws one template per image; ``encode(texts)`` gives (n, L)
    int64 token ids padded with 0; ``prompts(c)`` lists every caption of class c (all templates
    and adjectives), the zero-shot classifier's prompts."""

    def __init__(self, classes):
        self.classes = list(classes)
        words = set()
        for c in range(len(self.classes)):
            words.update(w for t in self.prompts(c) for w in t.split())
        self.vocab = {w: i + 1 for i, w in enumerate(sorted(words))}
        self.length = max(len(t.split()) for c in range(len(self.classes)) for t in self.prompts(c))

    def caption(self, template: str, c: int, adj: str) -> str:
        return template.format(word=self.classes[c], num=str(c), adj=adj)

    def prompts(self, c: int) -> list:
        return sorted({self.caption(t, c, a) for t in TEMPLATES for a in ADJECTIVES})

    def make(self, labels: Tensor, ink: Tensor, rng: np.random.Generator) -> list:
        thick = torch.zeros(len(labels), dtype=torch.bool)
        for c in labels.unique():
            sel = labels == c
            thick[sel] = ink[sel] > ink[sel].median()
        choice = rng.integers(len(TEMPLATES), size=len(labels))
        return [self.caption(TEMPLATES[k], int(c), ADJECTIVES[0] if t else ADJECTIVES[1])
                for k, c, t in zip(choice, labels.tolist(), thick.tolist())]

    def encode(self, texts) -> Tensor:
        ids = torch.zeros(len(texts), self.length, dtype=torch.int64)
        for i, t in enumerate(texts):
            tok = [self.vocab[w] for w in t.split()]
            ids[i, :len(tok)] = torch.tensor(tok)
        return ids


class TextEncoder(nn.Module):
    """Bag of words: mean of the word embeddings (padding ignored), then a two-layer MLP.
    (B, L) int64 -> (B, out_dim)."""

    def __init__(self, vocab_size: int, dim: int = 64, out_dim: int = 64):
        super().__init__()
        self.bag = nn.EmbeddingBag(vocab_size + 1, dim, mode="mean", padding_idx=0)
        self.mlp = nn.Sequential(nn.Linear(dim, 128), nn.ReLU(inplace=True), nn.Linear(128, out_dim))

    def forward(self, ids: Tensor) -> Tensor:
        return self.mlp(self.bag(ids))


class ClipModel(nn.Module):
    """Both encoders and the learned logit scale (log 1/τ) in one module, the one DDP wraps:
    ``(images, tokens) -> (image features, text features, min(e^logit_scale, 100))``."""

    def __init__(self, image_model: nn.Module, text_model: nn.Module, logit_scale: nn.Parameter):
        super().__init__()
        self.image_model, self.text_model, self.logit_scale = image_model, text_model, logit_scale

    def forward(self, images: Tensor, tokens: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        scale = self.logit_scale.exp().clamp(max=100.0)
        return self.image_model(images), self.text_model(tokens), scale


class ImageEncoder(nn.Module):
    """The shared small conv net followed by a linear projection. (B, C, H, W) -> (B, out_dim)."""

    def __init__(self, data: common.ImageData, out_dim: int = 64):
        super().__init__()
        self.trunk = common.image_encoder(data)
        self.proj = nn.Linear(self.trunk.dim, out_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(self.trunk(x))


def parse_args(argv=None):
    p = common.base_parser(__doc__.split("\n")[0], epochs=40, alpha=0.05, out="out/clip")
    p.add_argument("--base", choices=("clip", "sogclr"), default="clip",
                   help="the image-text contrastive loss GloFND is applied to")
    p.add_argument("--gamma", type=float, default=0.9, help="SogCLR's moving-average weight")
    args = common.finish_args(p.parse_args(argv))
    if args.dataset != "digits":
        raise SystemExit("clip.py builds its captions from the digits: --dataset digits only")
    return args


def build_loss(args, method: str, num_samples: int) -> nn.Module:
    """The loss of one run. This is the one place where the loss is configured; with
    ``--distributed`` it gathers the images and captions of all processes and shares one
    state among them (replicated, or sharded with ``--shard-state``)."""
    return glofnd.GloFNDClipLoss(num_samples, alpha=args.alpha, lr=args.lr_lambda,
                                 base=args.base, method=method, gamma=args.gamma,
                                 start_update=args.start_epoch, start_mask=args.start_epoch,
                                 **common.loss_options(args))


def recall_at_1(query: Tensor, keys: Tensor, query_text: list, key_text: list) -> float:
    """Recall@1 (%) of retrieving by cosine: the top key counts as a hit when its caption is the
    query's own caption (identical captions cannot be told apart, so they all count)."""
    top = (F.normalize(query, dim=1) @ F.normalize(keys, dim=1).T).argmax(1)
    return 100.0 * float(np.mean([key_text[j] == q for j, q in zip(top.tolist(), query_text)]))


def make_train_one(args, data: common.ImageData):
    device = args.device
    caps = Captions(data.classes)
    rng = np.random.default_rng(0)  # one set of pairs for all seeds and methods
    texts = {split: caps.make(y, x.flatten(1).sum(1), rng)
             for split, x, y in (("train", data.train_x, data.train_y),
                                 ("test", data.test_x, data.test_y))}
    tokens = caps.encode(texts["train"]).to(device)
    test_tokens = caps.encode(texts["test"])
    prompt_tokens = [caps.encode(caps.prompts(c)) for c in range(data.num_classes)]
    augment = common.DigitAugment(erase=0.0)
    x, y = data.train_x.to(device), data.train_y.to(device)
    n = len(y)

    def train_one(method: str, seed: int) -> Optional[common.RunResult]:
        image_model = ImageEncoder(data).to(device)
        text_model = TextEncoder(len(caps.vocab)).to(device)
        logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07), device=device))
        model = ClipModel(image_model, text_model, logit_scale)
        loss_fn = build_loss(args, method, n).to(device)  # outside DDP: DDP must not sync it
        sampler = None
        if args.distributed:
            sampler = common.GlobalBatches(n, args.batch_size, seed, args.rank, args.world_size)
        # SogCLR's bimodal loss takes the scale as a fixed 1/τ: logit_scale gets no gradient
        net = common.wrap_ddp(model, args, find_unused_parameters=args.base == "sogclr")

        def step(idx):
            idx = idx.to(device)
            images = augment(x[idx])
            if sampler is not None:  # views of the whole global batch, the same on every
                images, idx = sampler.local(images), sampler.local(idx)  # process: keep ours
            img, txt, scale = net(images, tokens[idx])
            return loss_fn(img, txt, scale, idx, labels=y[idx])

        image_model.train()
        history = common.train_epochs(net.parameters(), loss_fn, step, n, args.epochs,
                                      args.batch_size, args.lr, f"{method} seed {seed}",
                                      progress=not args.no_progress and common.is_main(args),
                                      sampler=sampler)
        fnds = (loss_fn.fnd_image, loss_fn.fnd_text)
        lam_final = [common.full_lambdas(f) for f in fnds]  # collective when sharded
        common.save_state(args, method, seed, loss_fn, model)
        if not common.is_main(args):
            return None
        image_model.eval()
        text_model.eval()
        img_test = common.embed(image_model, data.test_x, device)
        txt_test = common.embed(text_model, test_tokens, device)
        with torch.no_grad():
            class_emb = torch.stack([F.normalize(text_model(p.to(device)).float(), dim=1).mean(0)
                                     for p in prompt_tokens]).cpu()
        pred = (F.normalize(img_test, dim=1) @ F.normalize(class_emb, dim=1).T).argmax(1)
        metrics = {
            "zero_shot_top1": 100.0 * float((pred == data.test_y).float().mean()),
            "i2t_r1": recall_at_1(img_test, txt_test, texts["test"], texts["test"]),
            "t2i_r1": recall_at_1(txt_test, img_test, texts["test"], texts["test"]),
        }
        lambdas = {}
        if loss_fn.fnd_image is not None and args.start_epoch < args.epochs:
            # The values λ estimates, from the final embeddings of all training pairs: image i's
            # (1−α)-quantile of its cosines to every other caption, and caption i's to every
            # other image (the own pair excluded).
            img = common.embed(image_model, data.train_x, device)
            txt = common.embed(text_model, caps.encode(texts["train"]), device)
            errs = []
            for name, lam, a, b in (("image→text", lam_final[0], img, txt),
                                    ("text→image", lam_final[1], txt, img)):
                q = common.true_quantiles(a, b, args.alpha)
                lam = lam.float().cpu().expand(n)
                key = f"{name} λ_i" if method == "glofnd" else f"{name} shared λ"
                lambdas[key] = (lam, q)
                errs.append(float((lam - q).abs().median()))
            metrics["lambda_err"] = float(np.mean(errs))
        return common.RunResult(metrics, history, lambdas)

    return train_one


def main(argv=None):
    args = parse_args(argv)
    base = "CLIP" if args.base == "clip" else "SogCLR (bimodal)"
    return common.main(
        args,
        lambda data: (f"{data.name} image-caption pairs: {len(data.train_y)} training and "
                      f"{len(data.test_y)} held-out, {len(TEMPLATES)} templates × "
                      f"{len(ADJECTIVES)} adjectives per class; glofnd {glofnd.implementation}; "
                      f"device {args.device}"),
        make_train_one, ("zero_shot_top1", "i2t_r1", "t2i_r1"),
        lambda data: f"{base} on {data.name} captions")


if __name__ == "__main__":
    main()
