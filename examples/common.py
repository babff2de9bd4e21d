"""Shared parts of the examples (simclr.py, clip.py, quickstart.ipynb).

Data (scikit-learn's bundled digits by default; CIFAR-10, STL-10 and image folders through
torchvision), augmentations written in plain torch, small encoders, the training loop with its
progress bar, the evaluations (k-NN and linear probe, true global quantiles), and the results:
tables (Markdown and CSV) and plots (PNG, matplotlib's Agg backend).

Nothing here depends on a particular loss: an example passes a ``train_one(method, seed)``
function to :func:`run_methods`, which runs every method on every seed and writes the results.

Multi-process training (``--distributed``, under ``torchrun``): :func:`init_distributed` sets up
the process group and the device, :class:`GlobalBatches` splits each epoch among the processes,
:func:`wrap_ddp` wraps the encoders, and only rank 0 evaluates and writes (:func:`is_main`).
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

METHODS = ("none", "fnc", "single", "glofnd", "oracle")
DATASETS = ("digits", "cifar10", "stl10", "imagefolder")
DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


# --------------------------------------------------------------------------------------- setup


def seed_everything(seed: int) -> None:
    """Seeds Python, NumPy and torch (all devices), so that one seed gives one run."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def resolve_device(name: str) -> torch.device:
    """``"auto"`` is CUDA when available, else the CPU; any other name is passed to torch."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {name}: CUDA is not available on this machine")
    return device


def base_parser(description: str, epochs: int, alpha: float, out: str) -> argparse.ArgumentParser:
    """The options both examples share; each example adds its own (e.g. ``--base``)."""
    p = argparse.ArgumentParser(description=description,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--dataset", choices=DATASETS, default="digits",
                   help="digits ships with scikit-learn (offline); the others need torchvision")
    p.add_argument("--data-root", default="data",
                   help="where cifar10/stl10 are (or are downloaded to); the folder of "
                        "class sub-folders for imagefolder")
    p.add_argument("--download", action="store_true", help="download cifar10/stl10 if missing")
    p.add_argument("--image-size", type=int, default=32,
                   help="imagefolder images are resized to this size")
    p.add_argument("--subset", type=int, default=None,
                   help="use only this many samples of the data set (train and test together)")
    p.add_argument("--epochs", type=int, default=epochs)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--lr", type=float, default=2e-3, help="learning rate of the encoders (Adam)")
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--alpha", type=float, default=alpha,
                   help="share of each sample's negatives treated as false (GloFND's α)")
    p.add_argument("--lr-lambda", type=float, default=0.05, help="step size of λ")
    p.add_argument("--start-epoch", type=int, default=None,
                   help="epoch, counted from 0, from which λ is learned and the mask applied "
                        "(default: epochs // 3); plots and tables count epochs from 1")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--out", default=out, help="folder for the tables and plots")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's own choice)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    # Multi-process training; each example's build_loss(...) passes them to the loss
    # (through loss_options(args)).
    p.add_argument("--distributed", action="store_true",
                   help="train on several processes: run under torchrun --nproc-per-node K "
                        "(one process per GPU with --device cuda, gloo on the CPU otherwise); "
                        "--batch-size is the global batch, split among the processes; "
                        "without torchrun it runs as one process")
    p.add_argument("--shard-state", action="store_true",
                   help="with --distributed: shard λ (and SogCLR's u) over the processes "
                        "(sample i on rank i %% K) instead of replicating them")
    p.add_argument("--save-state", default=None, metavar="DIR",
                   help="save the loss's state_dict and the model's parameters after each run "
                        "to DIR/<method>_seed<seed>_rank<rank>.pt (every process its own file)")
    return p


def finish_args(args: argparse.Namespace) -> argparse.Namespace:
    """Fills the defaults that depend on other options and checks the ranges."""
    if args.epochs < 1:
        raise SystemExit("--epochs must be >= 1")
    if args.start_epoch is None:
        args.start_epoch = args.epochs // 3
    if not 0 <= args.start_epoch:
        raise SystemExit("--start-epoch must be >= 0")
    if not 0.0 < args.alpha < 1.0:
        raise SystemExit("--alpha must lie in (0, 1)")
    if args.subset is not None and args.subset < 20:
        raise SystemExit("--subset must be >= 20")
    if args.threads is not None:
        if args.threads < 1:
            raise SystemExit("--threads must be >= 1")
        torch.set_num_threads(args.threads)
    if args.shard_state and not args.distributed:
        raise SystemExit("--shard-state needs --distributed")
    args.device = resolve_device(args.device)
    args.rank, args.world_size, args.local_rank = 0, 1, 0
    return args


# ------------------------------------------------------------------------- multi-process runs


def init_distributed(args: argparse.Namespace) -> None:
    """With ``--distributed``: joins the process group that torchrun describes in the
    environment (:func:`glofnd.distributed.init_from_env`; nccl for ``--device cuda``, whose
    index becomes LOCAL_RANK, gloo for the CPU) and sets ``args.rank``, ``args.world_size``,
    ``args.local_rank``. Without torchrun, or without the flag, one process: (0, 1, 0)."""
    if not args.distributed:
        return
    import glofnd.distributed
    cuda = args.device.type == "cuda"
    local = int(os.environ.get("LOCAL_RANK", 0))
    if cuda and local >= torch.cuda.device_count():
        raise SystemExit(f"--distributed on cuda: process {local} of this node has no GPU "
                         f"({torch.cuda.device_count()} visible); start at most one process "
                         f"per GPU, or pass --device cpu (gloo)")
    args.rank, args.world_size, args.local_rank = glofnd.distributed.init_from_env(
        "nccl" if cuda else "gloo")
    if cuda:
        args.device = torch.device("cuda", args.local_rank)
        torch.cuda.set_device(args.device)
    if args.batch_size % args.world_size:
        raise SystemExit(f"--batch-size {args.batch_size} (the global batch) must be a multiple "
                         f"of the number of processes, {args.world_size}")


def multi_process() -> bool:
    """Whether a process group of more than one process is running."""
    import torch.distributed as dist
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def is_main(args: argparse.Namespace) -> bool:
    """Rank 0, the process that evaluates, prints and writes (the only one without
    ``--distributed``)."""
    return args.rank == 0


def barrier(args: argparse.Namespace) -> None:
    """Waits for every process (nothing to do with one process)."""
    if multi_process():
        import torch.distributed as dist
        dist.barrier(device_ids=[args.local_rank] if args.device.type == "cuda" else None)


def finish_distributed(args: argparse.Namespace, ok: bool = True) -> None:
    """Waits for every process (after a normal end) and leaves the process group."""
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        if ok:
            barrier(args)
        dist.destroy_process_group()


def loss_options(args: argparse.Namespace) -> dict:
    """The keyword arguments a loss takes for ``--distributed``: features gathered from every
    process (negatives of the global batch) and one state for all processes, replicated or
    sharded (``--shard-state``). Empty without ``--distributed``."""
    if not args.distributed:
        return {}
    return {"gather_distributed": True, "distributed": "sharded" if args.shard_state else True}


def wrap_ddp(module: nn.Module, args: argparse.Namespace,
             find_unused_parameters: bool = False) -> nn.Module:
    """``module`` in DistributedDataParallel when several processes run, else as is. (The loss
    stays outside: DDP's buffer broadcast would overwrite its state.) ``find_unused_parameters``
    for a module with parameters that get no gradient."""
    if not multi_process():
        return module
    ids = [args.local_rank] if args.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(module, device_ids=ids,
                                               find_unused_parameters=find_unused_parameters)


def full_lambdas(fnd) -> Optional[Tensor]:
    """The whole λ (N,) of a GloFND, gathered from the shards when sharded (collective: every
    process calls it); None for None."""
    if fnd is None:
        return None
    if getattr(fnd, "distributed", None) == "sharded":
        import glofnd.distributed
        return glofnd.distributed.gather_full_state(fnd)["lambdas"]
    return fnd.lambdas.detach().clone()


def save_state(args: argparse.Namespace, method: str, seed: int, loss_fn: nn.Module,
               model: nn.Module) -> None:
    """With ``--save-state DIR``: this process's ``{"loss": loss_fn.state_dict(), "parameters":
    {name: tensor} of model}`` (CPU tensors) to DIR/<method>_seed<seed>_rank<rank>.pt. In a
    multi-process run every rank's file holds the same tensors (a replicated state; DDP keeps
    the parameters equal), except a sharded state, of which each file holds its rank's shard."""
    if args.save_state is None:
        return
    os.makedirs(args.save_state, exist_ok=True)
    state = {"loss": {k: v.detach().cpu() if isinstance(v, Tensor) else v
                      for k, v in loss_fn.state_dict().items()},
             "parameters": {k: v.detach().cpu() for k, v in model.named_parameters()}}
    torch.save(state, os.path.join(args.save_state, f"{method}_seed{seed}_rank{args.rank}.pt"))


# ---------------------------------------------------------------------------------------- data


@dataclass
class ImageData:
    """Images as float tensors in [0, 1], (N, C, H, W), with int64 labels; a held-out split."""
    name: str
    train_x: Tensor
    train_y: Tensor
    test_x: Tensor
    test_y: Tensor
    classes: list = field(default_factory=list)

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def _split(x: np.ndarray, y: np.ndarray, subset: Optional[int], test_fraction: float,
           seed: int = 0) -> tuple:
    """Optionally subsamples, then splits stratified by class (fixed seed: one split for all)."""
    from sklearn.model_selection import train_test_split
    if subset is not None and subset < len(y):
        keep, _ = train_test_split(np.arange(len(y)), train_size=subset, stratify=y,
                                   random_state=seed)
        x, y = x[keep], y[keep]
    return train_test_split(x, y, test_size=test_fraction, stratify=y, random_state=seed)


def load_digits_data(subset: Optional[int] = None, test_fraction: float = 0.2) -> ImageData:
    """scikit-learn's bundled handwritten digits: 1,797 images of 8×8 (values 0-16), 10 classes,
    split 80/20 stratified. Needs no download."""
    from sklearn.datasets import load_digits
    d = load_digits()
    x = (d.images / 16.0).astype(np.float32)[:, None]          # (N, 1, 8, 8) in [0, 1]
    xtr, xte, ytr, yte = _split(x, d.target.astype(np.int64), subset, test_fraction)
    return ImageData("digits", torch.from_numpy(xtr), torch.from_numpy(ytr),
                     torch.from_numpy(xte), torch.from_numpy(yte), list(DIGIT_NAMES))


def _require_torchvision(dataset: str):
    try:
        import torchvision
    except ImportError:
        raise SystemExit(f"--dataset {dataset} needs torchvision, which is not installed: "
                         "pip install torchvision (matching your torch), or use --dataset digits") \
            from None
    return torchvision


def _to_tensor_uint8(images: np.ndarray, channels_last: bool) -> Tensor:
    t = torch.from_numpy(np.ascontiguousarray(images))
    if channels_last:
        t = t.permute(0, 3, 1, 2)
    return t.float().div_(255.0)


def load_torchvision_data(dataset: str, root: str, download: bool, image_size: int,
                          subset: Optional[int], test_fraction: float = 0.2) -> ImageData:
    """CIFAR-10 (train/test), STL-10 (labelled train/test, 96×96) or an image folder (one
    sub-folder per class, resized to ``image_size``, split 80/20), held in memory as tensors."""
    tv = _require_torchvision(dataset)
    try:
        if dataset == "cifar10":
            tr = tv.datasets.CIFAR10(root, train=True, download=download)
            te = tv.datasets.CIFAR10(root, train=False, download=download)
            parts = [(_to_tensor_uint8(s.data, True), torch.as_tensor(s.targets)) for s in (tr, te)]
            classes = list(tr.classes)
        elif dataset == "stl10":
            tr = tv.datasets.STL10(root, split="train", download=download)
            te = tv.datasets.STL10(root, split="test", download=download)
            parts = [(_to_tensor_uint8(s.data, False), torch.as_tensor(s.labels).long())
                     for s in (tr, te)]
            classes = list(tr.classes)
        else:
            if not os.path.isdir(root):
                raise SystemExit(f"--data-root {root!r} is not a folder of class sub-folders")
            folder = tv.datasets.ImageFolder(root)
            resize = tv.transforms.Compose([tv.transforms.Resize(image_size),
                                            tv.transforms.CenterCrop(image_size)])
            imgs = np.stack([np.asarray(resize(folder.loader(p).convert("RGB")))
                             for p, _ in folder.samples])
            y = np.asarray(folder.targets, dtype=np.int64)
            xtr, xte, ytr, yte = _split(imgs, y, subset, test_fraction)
            parts = [(_to_tensor_uint8(xtr, True), torch.from_numpy(ytr)),
                     (_to_tensor_uint8(xte, True), torch.from_numpy(yte))]
            return ImageData(dataset, *parts[0], *parts[1], list(folder.classes))
    except RuntimeError as e:  # torchvision's "Dataset not found or corrupted"
        raise SystemExit(f"--dataset {dataset}: {e} (pass --download, or --data-root)") from None
    (xtr, ytr), (xte, yte) = parts
    if subset is not None:
        g = torch.Generator().manual_seed(0)
        ntr = min(len(ytr), max(1, round(subset * (1 - test_fraction))))
        nte = min(len(yte), max(1, subset - ntr))
        itr, ite = torch.randperm(len(ytr), generator=g)[:ntr], torch.randperm(len(yte), generator=g)[:nte]
        xtr, ytr, xte, yte = xtr[itr], ytr[itr], xte[ite], yte[ite]
    return ImageData(dataset, xtr, ytr.long(), xte, yte.long(), classes)


def load_data(args: argparse.Namespace) -> ImageData:
    """The data set named by ``--dataset`` (see :func:`base_parser`)."""
    if args.dataset == "digits":
        return load_digits_data(args.subset)
    first = args.download and not is_main(args)  # several processes: rank 0 downloads first
    if first:
        barrier(args)
    data = load_torchvision_data(args.dataset, args.data_root, args.download, args.image_size,
                                 args.subset)
    if args.download and is_main(args):
        barrier(args)
    return data


def batches(n: int, batch_size: int, generator: Optional[torch.Generator] = None):
    """Shuffled index batches covering all n samples once (the last one may be smaller, so that
    every sample's λ is visited every epoch)."""
    return torch.randperm(n, generator=generator).split(batch_size)


class GlobalBatches:
    """The batches of a multi-process run, as ``DistributedSampler(shuffle=True,
    drop_last=True)`` gives them, the same for any number of processes.

    Epoch e shuffles the n indices with a generator seeded ``seed·2^32 + e`` (the same
    permutation on every process; DistributedSampler seeds ``seed + e``, which would give seed
    s + 1 the permutations of seed s one epoch later), cuts it into n // batch_size global batches of ``batch_size`` (the last
    incomplete one is dropped, on every process alike) and each process takes its contiguous
    slice: rank r of W holds rows [r·b, (r+1)·b) of each batch, b = batch_size // W. Gathered in
    rank order, the slices are the global batch in its order.

    ``epoch(e)`` -> the global batches (list of (batch_size,) int64); ``local(t)`` -> this
    process's rows of a tensor aligned with a global batch; ``len()`` -> steps per epoch.

    Example::

        >>> gb = GlobalBatches(10, 4, seed=0, rank=1, world_size=2)
        >>> [gb.local(idx).shape[0] for idx in gb.epoch(0)]
        [2, 2]
    """

    def __init__(self, n: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1):
        if batch_size % world_size:
            raise ValueError(f"batch_size ({batch_size}) must be a multiple of world_size "
                             f"({world_size})")
        if n < batch_size:
            raise ValueError(f"the {n} training samples do not fill one global batch of "
                             f"{batch_size}; lower --batch-size")
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.per_process = batch_size // world_size

    def __len__(self) -> int:
        return self.n // self.batch_size

    def epoch(self, epoch: int) -> list:
        g = torch.Generator().manual_seed(self.seed * 2**32 + epoch)
        perm = torch.randperm(self.n, generator=g)
        return list(perm[:len(self) * self.batch_size].split(self.batch_size))

    def local(self, t: Tensor) -> Tensor:
        start = self.rank * self.per_process
        return t[start:start + self.per_process]


# ------------------------------------------------------------------------------- augmentations


def _affine(x: Tensor, theta: Tensor, padding: str) -> Tensor:
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode=padding, align_corners=False)


def _uniform(n: int, lo: float, hi: float, device) -> Tensor:
    return torch.empty(n, device=device).uniform_(lo, hi)


class DigitAugment:
    """Random views of small grey-scale digits, batched in plain torch.

    Per image: rotation ±``rotate`` degrees, zoom in [``scale``], shear ±``shear``, shift
    ±``shift`` (share of the image), then a contrast factor in ``contrast``, additive noise of
    standard deviation ``noise`` and a random erased square (a third of the side) with
    probability ``erase``. No flips (a mirrored digit is another symbol). Input and output
    (B, 1, H, W) in [0, 1]; with every strength at zero (scale and contrast (1, 1)) it is the
    identity.
    """

    def __init__(self, rotate: float = 15.0, scale=(0.8, 1.15), shear: float = 0.2,
                 shift: float = 0.15, contrast=(0.6, 1.4), noise: float = 0.1,
                 erase: float = 0.5):
        self.rotate, self.scale, self.shear, self.shift = rotate, scale, shear, shift
        self.contrast, self.noise, self.erase = contrast, noise, erase

    def __call__(self, x: Tensor) -> Tensor:
        b, dev = x.shape[0], x.device
        a = _uniform(b, -self.rotate, self.rotate, dev) * (math.pi / 180)
        s = _uniform(b, *self.scale, dev)
        sh = _uniform(b, -self.shear, self.shear, dev)
        theta = torch.zeros(b, 2, 3, device=dev)
        theta[:, 0, 0], theta[:, 0, 1] = a.cos() / s, (-a.sin() + sh) / s
        theta[:, 1, 0], theta[:, 1, 1] = a.sin() / s, a.cos() / s
        theta[:, :, 2] = torch.empty(b, 2, device=dev).uniform_(-2 * self.shift, 2 * self.shift)
        x = _affine(x, theta, "zeros")
        x = x * _uniform(b, *self.contrast, dev).view(b, 1, 1, 1)
        x = x + self.noise * torch.randn_like(x)
        if self.erase > 0:
            h, w = x.shape[-2:]
            k = max(1, h // 3)
            cy = torch.randint(0, h - k + 1, (b, 1, 1, 1), device=dev)
            cx = torch.randint(0, w - k + 1, (b, 1, 1, 1), device=dev)
            yy = torch.arange(h, device=dev).view(1, 1, h, 1)
            xx = torch.arange(w, device=dev).view(1, 1, 1, w)
            box = (yy >= cy) & (yy < cy + k) & (xx >= cx) & (xx < cx + k)
            hit = (torch.rand(b, 1, 1, 1, device=dev) < self.erase)
            x = x.masked_fill(box & hit, 0.0)
        return x.clamp(0.0, 1.0)


def _grey(x: Tensor) -> Tensor:
    """Luma (ITU-R 601) of (B, 3, H, W) images, (B, 1, H, W)."""
    w = torch.tensor([0.299, 0.587, 0.114], device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return (x * w).sum(1, keepdim=True)


class ColorAugment:
    """SimCLR's views of colour images, batched in plain torch: random resized crop (area in
    ``crop``, aspect ratio in [3/4, 4/3]), horizontal flip, colour jitter of brightness,
    contrast and saturation (strength ``jitter``, probability 0.8; no hue), grey-scale with
    probability 0.2. Input and output (B, 3, H, W) in [0, 1]."""

    def __init__(self, crop=(0.2, 1.0), jitter: float = 0.4):
        self.crop, self.jitter = crop, jitter

    def __call__(self, x: Tensor) -> Tensor:
        b, dev = x.shape[0], x.device
        area = _uniform(b, *self.crop, dev)
        ratio = torch.exp(_uniform(b, math.log(3 / 4), math.log(4 / 3), dev))
        sw = (area * ratio).sqrt().clamp(max=1.0)
        sh = (area / ratio).sqrt().clamp(max=1.0)
        flip = torch.where(torch.rand(b, device=dev) < 0.5, -1.0, 1.0)
        theta = torch.zeros(b, 2, 3, device=dev)
        theta[:, 0, 0], theta[:, 1, 1] = sw * flip, sh
        theta[:, 0, 2] = (torch.rand(b, device=dev) * 2 - 1) * (1 - sw)
        theta[:, 1, 2] = (torch.rand(b, device=dev) * 2 - 1) * (1 - sh)
        x = _affine(x, theta, "reflection")
        j, on = self.jitter, (torch.rand(b, 1, 1, 1, device=dev) < 0.8).float()
        factor = [1 + on * _uniform(b, -j, j, dev).view(b, 1, 1, 1) for _ in range(3)]
        x = x * factor[0]                                               # brightness
        mean = _grey(x).mean((2, 3), keepdim=True)
        x = (x - mean) * factor[1] + mean                               # contrast
        g = _grey(x)
        x = (x - g) * factor[2] + g                                     # saturation
        to_grey = torch.rand(b, 1, 1, 1, device=dev) < 0.2
        x = torch.where(to_grey, _grey(x).expand_as(x), x)
        return x.clamp(0.0, 1.0)


def make_augment(data: ImageData):
    """The augmentation suited to the data: :class:`DigitAugment` for grey-scale, else
    :class:`ColorAugment`."""
    return DigitAugment() if data.train_x.shape[1] == 1 else ColorAugment()


# ------------------------------------------------------------------------------------ encoders


class ConvEncoder(nn.Module):
    """A small conv net: stages of 3×3 conv, batch norm, ReLU, with 2×2 max pooling after each
    stage but the first while the map is larger than 4×4, then global average pooling.
    (B, C, H, W) -> (B, widths[-1])."""

    def __init__(self, in_channels: int, image_size: int, widths: Sequence[int] = (32, 64, 128)):
        super().__init__()
        layers, c, size = [], in_channels, image_size
        for i, w in enumerate(widths):
            layers += [nn.Conv2d(c, w, 3, padding=1, bias=False), nn.BatchNorm2d(w),
                       nn.ReLU(inplace=True)]
            if i > 0 and size > 4:
                layers.append(nn.MaxPool2d(2))
                size //= 2
            c = w
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        self.net = nn.Sequential(*layers)
        self.dim = c

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


def image_encoder(data: ImageData) -> ConvEncoder:
    """Three narrow stages for the 8×8 digits (fast on a CPU), five wider ones for larger
    colour images."""
    size = data.train_x.shape[-1]
    widths = (16, 32, 64) if size <= 16 else (64, 128, 256, 256, 512)
    return ConvEncoder(data.train_x.shape[1], size, widths)


def projection_head(in_dim: int, hidden: int = 128, out_dim: int = 64) -> nn.Module:
    """SimCLR's projection MLP: Linear, batch norm, ReLU, Linear."""
    return nn.Sequential(nn.Linear(in_dim, hidden, bias=False), nn.BatchNorm1d(hidden),
                         nn.ReLU(inplace=True), nn.Linear(hidden, out_dim))


@torch.no_grad()
def embed(fn: Callable[[Tensor], Tensor], x: Tensor, device, batch_size: int = 1024) -> Tensor:
    """``fn`` applied over ``x`` in batches on ``device`` (eval mode is the caller's); CPU result."""
    return torch.cat([fn(x[i:i + batch_size].to(device)).float().cpu()
                      for i in range(0, len(x), batch_size)])


# ---------------------------------------------------------------------------------- evaluation


def knn_top1(train_f: Tensor, train_y: Tensor, test_f: Tensor, test_y: Tensor, k: int = 20,
             temperature: float = 0.1) -> float:
    """Weighted k-NN top-1 accuracy (%) on cosine similarity, as in instance discrimination:
    each of the k nearest training samples votes for its class with weight exp(s/temperature)."""
    train_f, test_f = F.normalize(train_f, dim=1), F.normalize(test_f, dim=1)
    k = min(k, len(train_y))
    num_classes = int(max(train_y.max(), test_y.max())) + 1
    correct = 0
    for i in range(0, len(test_y), 1024):
        sim, nn_idx = (test_f[i:i + 1024] @ train_f.T).topk(k, dim=1)
        votes = torch.zeros(len(sim), num_classes)
        votes.scatter_add_(1, train_y[nn_idx], (sim / temperature).exp())
        correct += int((votes.argmax(1) == test_y[i:i + 1024]).sum())
    return 100.0 * correct / len(test_y)


def linear_probe_top1(train_f: Tensor, train_y: Tensor, test_f: Tensor, test_y: Tensor,
                      weight_decay: float = 1e-3, max_iter: int = 200) -> float:
    """Top-1 accuracy (%) of a multinomial logistic regression on frozen, standardised features:
    minimises mean cross-entropy + weight_decay·‖W‖² with full-batch L-BFGS from zero weights
    (deterministic; no learning rate to tune)."""
    mean, std = train_f.mean(0), train_f.std(0).clamp_min(1e-6)
    xtr, xte = ((train_f - mean) / std).double(), ((test_f - mean) / std).double()
    num_classes = int(max(train_y.max(), test_y.max())) + 1
    lin = nn.Linear(xtr.shape[1], num_classes, dtype=torch.float64)
    nn.init.zeros_(lin.weight)
    nn.init.zeros_(lin.bias)
    opt = torch.optim.LBFGS(lin.parameters(), lr=1.0, max_iter=max_iter, history_size=20,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(lin(xtr), train_y) + weight_decay * lin.weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    with torch.no_grad():
        return 100.0 * float((lin(xte).argmax(1) == test_y).double().mean())


def true_quantiles(anchors: Tensor, columns, alpha: float, rows: Optional[Tensor] = None,
                   chunk: int = 512) -> Tensor:
    r"""The (1−α)-quantile of each anchor's cosines to the whole data set, the value λ_i
    estimates: q_i = quantile_{1−α}{ cos(a_i, c_j) : c in columns, j ≠ i }.

    anchors (N, D); columns one (N, D) tensor or a list of them (e.g. both views of SimCLR),
    row j of each belonging to sample j, so that column j of every block is excluded for anchor
    i = j (the sample itself / its positive; for CLIP the own caption). Embeddings are
    normalised here. ``rows`` restricts the anchors (for large data sets). Returns
    (len(rows),) float32, torch's linear interpolation between order statistics.
    """
    blocks = [columns] if isinstance(columns, Tensor) else list(columns)
    a = F.normalize(anchors.float(), dim=1)
    blocks = [F.normalize(c.float(), dim=1) for c in blocks]
    rows = torch.arange(len(a)) if rows is None else rows
    out = []
    for r in rows.split(chunk):
        sims = []
        for c in blocks:
            sim = a[r] @ c.T
            sim[torch.arange(len(r)), r] = float("nan")
            sims.append(sim)
        out.append(torch.nanquantile(torch.cat(sims, 1), 1.0 - alpha, dim=1))
    return torch.cat(out)


# -------------------------------------------------------------------------------------- training


def train_epochs(params, loss_fn: nn.Module, step: Callable[[Tensor], Tensor], n: int,
                 epochs: int, batch_size: int, lr: float, desc: str,
                 progress: bool = True, on_epoch: Optional[Callable[[int], None]] = None,
                 sampler: Optional[GlobalBatches] = None) -> list:
    """The shared loop: Adam with a cosine learning-rate schedule, one pass over a shuffled
    permutation of the n training indices per epoch, ``loss_fn.set_epoch(epoch)`` at the start of
    each epoch, and ``step(index_batch) -> loss`` for each batch. With a ``sampler``
    (:class:`GlobalBatches`, multi-process runs) ``step`` gets each global batch of
    ``sampler.epoch(epoch)`` and takes its own rows.

    Returns one dict per epoch: the mean of ``loss_fn.last_stats`` over the epoch's steps (the
    loss's diagnostics, e.g. false-negative precision and recall) and the mean loss; with
    several processes, the mean over the steps of all processes.
    """
    from tqdm import tqdm
    opt = torch.optim.Adam(params, lr=lr, weight_decay=1e-6)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
    history = []
    steps_per_epoch = math.ceil(n / batch_size) if sampler is None else len(sampler)
    bar = tqdm(total=epochs * steps_per_epoch, desc=desc, disable=not progress, leave=False,
               dynamic_ncols=True, file=sys.stderr)
    for epoch in range(epochs):
        if hasattr(loss_fn, "set_epoch"):
            loss_fn.set_epoch(epoch)
        sums, counts = {}, {}
        for idx in batches(n, batch_size) if sampler is None else sampler.epoch(epoch):
            loss = step(idx)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            stats = {"loss": float(loss.detach())}
            stats.update({k: float(v) for k, v in (getattr(loss_fn, "last_stats", None) or {}).items()
                          if k != "loss" and isinstance(v, (int, float, Tensor))})
            for k, v in stats.items():
                if math.isfinite(v):
                    sums[k] = sums.get(k, 0.0) + v
                    counts[k] = counts.get(k, 0) + 1
            bar.update(1)
            bar.set_postfix(epoch=epoch + 1, loss=f"{stats['loss']:.3f}")
        sched.step()
        if multi_process():
            sums, counts = _merge_stats(sums, counts)
        history.append({"epoch": epoch + 1, **{k: sums[k] / counts[k] for k in sums}})
        if on_epoch is not None:
            on_epoch(epoch)
    bar.close()
    return history


def _merge_stats(sums: dict, counts: dict) -> tuple[dict, dict]:
    """Sums and counts of the per-step statistics added over all processes (collective)."""
    import torch.distributed as dist
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, (sums, counts))
    total, number = {}, {}
    for s, c in parts:
        for k in s:
            total[k] = total.get(k, 0.0) + s[k]
            number[k] = number.get(k, 0) + c[k]
    return total, number


# ------------------------------------------------------------------------- running all methods


@dataclass
class RunResult:
    """What one (method, seed) run reports: final ``metrics`` (name -> float, percentages for
    accuracies), per-epoch ``history`` (from :func:`train_epochs`) and, where the method learns
    per-sample thresholds, ``lambdas`` as {panel title: (λ (N,), true quantile (N,))}."""
    metrics: dict
    history: list
    lambdas: dict = field(default_factory=dict)


def main(args: argparse.Namespace, describe: Callable[[ImageData], str],
         make_train_one: Callable[[argparse.Namespace, ImageData], Callable[[str, int], RunResult]],
         accuracy_keys: Sequence[str], title: Callable[[ImageData], str]) -> dict:
    """An example's whole run: processes (with ``--distributed``), data, a one-line description
    on rank 0, every method and seed (:func:`run_methods`), and a clean shutdown."""
    ok = False
    try:
        init_distributed(args)
        data = load_data(args)
        if is_main(args):
            print(describe(data) + (f", {args.world_size} processes" if args.distributed else ""))
        results = run_methods(args, make_train_one(args, data), accuracy_keys, title(data))
        ok = True
        return results
    finally:
        finish_distributed(args, ok)


def run_methods(args: argparse.Namespace, train_one: Callable[[str, int], RunResult],
                accuracy_keys: Sequence[str], title: str) -> dict:
    """Runs ``train_one(method, seed)`` for every method and seed (same seeds for all methods),
    prints the table and writes to ``args.out``: results.md, results.csv, history.csv,
    results.json, accuracy.png, false_negatives.png and lambda_vs_quantile.png.

    With several processes every process trains every run and only rank 0 (whose
    ``train_one`` returns the result; the others return None) prints and writes; the
    processes wait for each other after each run. Returns {} on the other ranks."""
    main = is_main(args)
    if main:
        os.makedirs(args.out, exist_ok=True)
    results = {m: [] for m in args.methods}
    t0 = time.time()
    for method in args.methods:
        for seed in args.seeds:
            seed_everything(seed)
            t = time.time()
            run = train_one(method, seed)
            barrier(args)
            if not main:
                continue
            results[method].append(run)
            last = run.history[-1] if run.history else {}
            figures = [f"{COLUMN_NAMES.get(k, k)} {run.metrics[k]:.1f}" for k in accuracy_keys]
            figures += [f"{COLUMN_NAMES[k]} {100 * last[k]:.1f}" for k in FN_KEYS if k in last]
            print(f"{method:>6} seed {seed}: " + ", ".join(figures) + f" ({time.time() - t:.0f} s)",
                  flush=True)
    if not main:
        return {}
    elapsed = time.time() - t0
    table = summarise(results, accuracy_keys)
    settings = settings_line(args, elapsed)
    write_tables(table, results, args.out, title, settings)
    plot_accuracy(table, accuracy_keys, os.path.join(args.out, "accuracy.png"), title)
    plot_false_negatives(results, os.path.join(args.out, "false_negatives.png"), args.start_epoch)
    plot_lambdas(results, os.path.join(args.out, "lambda_vs_quantile.png"), args.alpha)
    print(f"\n{title}: {settings}\n")
    print(markdown_table(table))
    print(f"\nwritten to {args.out}/ (results.md, results.csv, history.csv, *.png)")
    return results


def settings_line(args: argparse.Namespace, elapsed: float) -> str:
    seeds = " ".join(map(str, args.seeds))
    n = "all" if args.subset is None else str(args.subset)
    extra = f", base {args.base}" if hasattr(args, "base") else ""
    if args.distributed:  # the single-process line stays as it was
        layout = "sharded" if args.shard_state else "replicated"
        extra = (f" ({args.world_size} processes × {args.batch_size // args.world_size}, "
                 f"{layout} state){extra}")
    return (f"{args.dataset} ({n} samples), {args.epochs} epochs, batch {args.batch_size}"
            f"{extra}, α={args.alpha}, lr_λ={args.lr_lambda}, λ learned and applied from epoch "
            f"{args.start_epoch + 1}, "
            f"seeds {seeds}, device {args.device}, {elapsed:.0f} s")


FN_KEYS = ("precision", "recall", "f1")


def summarise(results: dict, accuracy_keys: Sequence[str]) -> list:
    """One row per method: mean and standard deviation over seeds of each accuracy, of the last
    epoch's false-negative precision/recall/F1 (percent) and of the median |λ − q|."""
    rows = []
    for method, runs in results.items():
        row = {"method": method, "seeds": len(runs)}
        for key in list(accuracy_keys) + list(FN_KEYS) + ["lambda_err"]:
            vals = []
            for r in runs:
                if key in FN_KEYS:
                    v = r.history[-1].get(key) if r.history else None
                    v = None if v is None else 100.0 * v
                else:
                    v = r.metrics.get(key)
                if v is not None and math.isfinite(v):
                    vals.append(v)
            row[key] = (float(np.mean(vals)), float(np.std(vals))) if vals else None
        rows.append(row)
    return rows


COLUMN_NAMES = {"knn_top1": "k-NN top-1", "linear_top1": "linear top-1",
                "zero_shot_top1": "zero-shot top-1", "i2t_r1": "image→text R@1",
                "t2i_r1": "text→image R@1", "precision": "FN precision",
                "recall": "FN recall", "f1": "FN F1", "lambda_err": "median |λ−q|"}


def _fmt(v, digits: int) -> str:
    if v is None:
        return "–"
    mean, std = v
    return f"{mean:.{digits}f} ± {std:.{digits}f}" if std > 0 else f"{mean:.{digits}f}"


def markdown_table(table: list) -> str:
    """Mean ± std over seeds (± omitted when 0 or a single seed); accuracies and FN figures in %."""
    keys = [k for k in table[0] if k not in ("method", "seeds")]
    head = "| method | " + " | ".join(COLUMN_NAMES.get(k, k) for k in keys) + " |"
    lines = [head, "|" + "---|" * (len(keys) + 1)]
    for row in table:
        cells = [_fmt(row[k], 3 if k == "lambda_err" else 1) for k in keys]
        lines.append(f"| {row['method']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_tables(table: list, results: dict, out: str, title: str, settings: str) -> None:
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(f"# {title}\n\n{settings}\n\n{markdown_table(table)}\n\n"
                "Accuracies and false-negative (FN) precision/recall/F1 in %, FN figures of the "
                "last epoch against same-class negatives; median |λ−q|: learned threshold against "
                "the true global quantile.\n")
    keys = [k for k in table[0] if k not in ("method", "seeds")]
    with open(os.path.join(out, "results.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["method", "seeds"] + [f"{k}_{s}" for k in keys for s in ("mean", "std")])
        for row in table:
            cells = []
            for k in keys:
                cells += ["", ""] if row[k] is None else [f"{row[k][0]:.6g}", f"{row[k][1]:.6g}"]
            w.writerow([row["method"], row["seeds"]] + cells)
    hist_keys = sorted({k for runs in results.values() for r in runs for h in r.history for k in h}
                       - {"epoch"})
    with open(os.path.join(out, "history.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["method", "run", "epoch"] + hist_keys)
        for method, runs in results.items():
            for i, r in enumerate(runs):
                for h in r.history:
                    w.writerow([method, i, h["epoch"]] + [f"{h[k]:.6g}" if k in h else ""
                                                          for k in hist_keys])
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump({"title": title, "settings": settings,
                   "runs": {m: [r.metrics for r in runs] for m, runs in results.items()}}, f,
                  indent=1)


# ----------------------------------------------------------------------------------------- plots


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_accuracy(table: list, keys: Sequence[str], path: str, title: str) -> None:
    """Grouped bars: one group per metric, one bar per method, error bars = std over seeds."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 3.6), dpi=100)
    width = 0.8 / len(table)
    lo = []
    for i, row in enumerate(table):
        xs = [j + (i - (len(table) - 1) / 2) * width for j in range(len(keys))]
        means = [row[k][0] if row[k] else 0.0 for k in keys]
        stds = [row[k][1] if row[k] else 0.0 for k in keys]
        ax.bar(xs, means, width, yerr=stds, capsize=2, label=row["method"])
        lo += [m for m in means if m > 0]
    ax.set_xticks(range(len(keys)), [COLUMN_NAMES.get(k, k) for k in keys])
    ax.set_ylim(max(0.0, min(lo, default=0.0) - 10), min(100.0, max(lo, default=100.0) + 5))
    ax.set_ylabel("accuracy (%)")
    ax.set_title(title)
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.0, 0.5))
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_false_negatives(results: dict, path: str, start_epoch: int) -> None:
    """False-negative precision, recall and F1 (mean over seeds) per epoch and method."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(10, 3.2), dpi=100, sharey=True)
    for ax, key in zip(axes, FN_KEYS):
        for method, runs in results.items():
            epochs = [h["epoch"] for h in runs[0].history]
            curve = [np.mean([r.history[e][key] for r in runs if key in r.history[e]])
                     if any(key in r.history[e] for r in runs) else np.nan
                     for e in range(len(epochs))]
            if not all(np.isnan(curve)):
                ax.plot(epochs, 100 * np.asarray(curve), marker="." if len(epochs) < 30 else None,
                        label=method)
        ax.axvline(start_epoch + 0.5, color="grey", lw=0.8, ls=":")
        ax.set_title(COLUMN_NAMES[key])
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("% (same-class negatives as truth)")
    axes[0].set_ylim(-2, 102)
    axes[-1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_lambdas(results: dict, path: str, alpha: float) -> None:
    """Learned λ_i against the true global (1−α)-quantile q_i of each sample (first seed of each
    method that learns per-sample thresholds), with the identity line."""
    panels = [(f"{m}: {name}", lam, q) for m, runs in results.items() if runs
              for name, (lam, q) in runs[0].lambdas.items()]
    plt = _pyplot()
    fig, axes = plt.subplots(1, max(1, len(panels)), figsize=(3.6 * max(1, len(panels)), 3.6),
                             dpi=100, squeeze=False)
    if not panels:
        axes[0, 0].text(0.5, 0.5, "no method with per-sample λ was run", ha="center")
        axes[0, 0].set_axis_off()
    for ax, (name, lam, q) in zip(axes[0], panels):
        lam, q = np.asarray(lam), np.asarray(q)
        ax.scatter(q, lam, s=4, alpha=0.5)
        lo, hi = float(min(q.min(), lam.min())), float(max(q.max(), lam.max()))
        ax.plot([lo, hi], [lo, hi], color="black", lw=0.8, label="λ = q")
        err = float(np.median(np.abs(lam - q)))
        ax.set_title(f"{name}\nmedian |λ−q| = {err:.3f}", fontsize=9)
        ax.set_xlabel(f"true (1−α)-quantile q, α={alpha}")
        ax.set_ylabel("learned λ")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
