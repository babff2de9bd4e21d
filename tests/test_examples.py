"""Tests of the examples: their shared pieces against independent computations, the two scripts
end to end in a subprocess (tiny settings), and the quickstart notebook executed by nbclient.

Independent references: per-row NumPy quantiles written out with explicit exclusion loops, a
brute-force k-NN in Python, scikit-learn's logistic regression (same objective, other solver).
"""
import csv
import importlib.util
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
METHODS = ["none", "fnc", "single", "glofnd", "oracle"]
PNGS = ["accuracy.png", "false_negatives.png", "lambda_vs_quantile.png"]


def _load(name):
    sys.path.insert(0, str(EXAMPLES))  # clip.py imports common from its own folder
    try:
        spec = importlib.util.spec_from_file_location(f"examples_{name}", EXAMPLES / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # dataclasses look their module up there
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(EXAMPLES))


common = _load("common")


# ----------------------------------------------------------------------------- shared pieces


def test_true_quantiles_match_numpy_with_exclusion():
    g = torch.Generator().manual_seed(0)
    a, b, c = (torch.randn(30, 4, generator=g, dtype=torch.float64) for _ in range(3))
    alpha = 0.1
    got = common.true_quantiles(a, [b, c], alpha, chunk=7)
    an = a.numpy() / np.linalg.norm(a.numpy(), axis=1, keepdims=True)
    cols = [x.numpy() / np.linalg.norm(x.numpy(), axis=1, keepdims=True) for x in (b, c)]
    for i in range(30):
        vals = [float(an[i] @ col[j]) for col in cols for j in range(30) if j != i]
        assert len(vals) == 58
        assert got[i].item() == pytest.approx(np.quantile(vals, 1 - alpha), abs=1e-6)
    rows = torch.tensor([3, 17])
    assert torch.allclose(common.true_quantiles(a, [b, c], alpha, rows=rows), got[rows])


def test_knn_top1_k1_is_nearest_neighbour():
    g = torch.Generator().manual_seed(1)
    tr, te = torch.randn(50, 6, generator=g), torch.randn(40, 6, generator=g)
    ytr, yte = torch.randint(0, 3, (50,), generator=g), torch.randint(0, 3, (40,), generator=g)
    tn = (tr / tr.norm(dim=1, keepdim=True)).tolist()
    correct = 0
    for q, y in zip((te / te.norm(dim=1, keepdim=True)).tolist(), yte.tolist()):
        sims = [sum(u * v for u, v in zip(q, t)) for t in tn]
        correct += ytr[max(range(50), key=sims.__getitem__)].item() == y
    assert common.knn_top1(tr, ytr, te, yte, k=1) == pytest.approx(100.0 * correct / 40)


def test_linear_probe_agrees_with_sklearn():
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler
    g = torch.Generator().manual_seed(2)
    centres = 2.0 * torch.randn(4, 8, generator=g)
    y = torch.randint(0, 4, (400,), generator=g)
    x = centres[y] + 1.5 * torch.randn(400, 8, generator=g)
    got = common.linear_probe_top1(x[:300], y[:300], x[300:], y[300:])
    s = StandardScaler().fit(x[:300].numpy())
    # sklearn minimises ½‖W‖² + C·Σ CE; ours mean CE + wd‖W‖²: C = 1 / (2·wd·n).
    clf = LogisticRegression(C=1 / (2 * 1e-3 * 300), max_iter=2000, tol=1e-8)
    clf.fit(s.transform(x[:300].numpy()), y[:300].numpy())
    want = 100.0 * (clf.predict(s.transform(x[300:].numpy())) == y[300:].numpy()).mean()
    assert 40.0 < want  # the task is learnable, so agreement is informative
    assert abs(got - want) <= 2.0  # at most 2 of 100 test points decided differently


def test_digit_augment_identity_and_range():
    x = common.load_digits_data(subset=100).train_x
    off = common.DigitAugment(rotate=0, scale=(1, 1), shear=0, shift=0, contrast=(1, 1),
                              noise=0, erase=0)
    assert torch.allclose(off(x), x, atol=1e-5)
    torch.manual_seed(0)
    y = common.DigitAugment()(x)
    assert y.shape == x.shape and y.min() >= 0 and y.max() <= 1
    assert (y - x).abs().mean() > 0.05


def test_color_augment_shape_range_and_randomness():
    torch.manual_seed(0)
    x = torch.rand(8, 3, 16, 16)
    aug = common.ColorAugment()
    a, b = aug(x), aug(x)
    assert a.shape == x.shape and a.min() >= 0 and a.max() <= 1
    assert not torch.equal(a, b)


def test_digits_split_is_stratified_and_fixed():
    d = common.load_digits_data(subset=200)
    assert len(d.train_y) == 160 and len(d.test_y) == 40
    assert torch.bincount(d.test_y, minlength=10).tolist() == [4] * 10
    assert torch.equal(common.load_digits_data(subset=200).train_x, d.train_x)


def test_torchvision_datasets_fail_clearly_without_torchvision(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchvision", None)  # makes `import torchvision` fail
    with pytest.raises(SystemExit, match="needs torchvision"):
        common.load_torchvision_data("cifar10", "data", False, 32, None)


def _fake_torchvision(found=True):
    """A stand-in module with torchvision's data-set interface (``.data`` uint8 arrays: CIFAR-10
    (N, H, W, 3) with ``.targets``, STL-10 (N, 3, H, W) with ``.labels``)."""
    import types

    def pixels(*shape):  # distinct values per position: a wrong axis order shows
        return (np.arange(np.prod(shape)) % 251).astype(np.uint8).reshape(shape)

    class Cifar:
        classes = [f"c{i}" for i in range(10)]

        def __init__(self, root, train, download):
            if not found:
                raise RuntimeError("Dataset not found or corrupted.")
            n = 50 if train else 20
            self.data = pixels(n, 32, 32, 3)
            self.targets = list(range(10)) * (n // 10)

    class Stl:
        classes = Cifar.classes

        def __init__(self, root, split, download):
            n = 30 if split == "train" else 10
            self.data = pixels(n, 3, 96, 96)
            self.labels = np.arange(n) % 10

    return types.SimpleNamespace(datasets=types.SimpleNamespace(CIFAR10=Cifar, STL10=Stl))


@pytest.mark.parametrize("name, shape, n_train", [("cifar10", (3, 32, 32), 50),
                                                  ("stl10", (3, 96, 96), 30)])
def test_torchvision_datasets_become_tensors(monkeypatch, name, shape, n_train):
    tv = _fake_torchvision()
    monkeypatch.setitem(sys.modules, "torchvision", tv)
    d = common.load_torchvision_data(name, "data", False, 32, None)
    ref = getattr(tv.datasets, "CIFAR10" if name == "cifar10" else "STL10")
    assert d.train_x.shape == (n_train,) + shape and d.train_x.dtype == torch.float32
    raw = ref("data", True, False) if name == "cifar10" else ref("data", "train", False)
    want = raw.data.astype(np.float64) / 255.0
    want = want.transpose(0, 3, 1, 2) if name == "cifar10" else want  # to (N, C, H, W)
    assert np.allclose(d.train_x.numpy(), want, atol=1e-7)
    assert d.train_y.dtype == torch.int64 and d.train_y.tolist() == [i % 10 for i in range(n_train)]
    assert d.classes == ref.classes
    sub = common.load_torchvision_data(name, "data", False, 32, 20)
    assert len(sub.train_y) == 16 and len(sub.test_y) == 4


def test_torchvision_dataset_missing_says_download(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchvision", _fake_torchvision(found=False))
    with pytest.raises(SystemExit, match="--download"):
        common.load_torchvision_data("cifar10", "data", False, 32, None)


def test_clip_captions_describe_their_class():
    clip = _load("clip")
    caps = clip.Captions(common.DIGIT_NAMES)
    labels = torch.arange(10).repeat(5)
    texts = caps.make(labels, torch.rand(50), np.random.default_rng(0))
    for t, c in zip(texts, labels.tolist()):
        words = t.split()
        assert common.DIGIT_NAMES[c] in words or str(c) in words
    ids = caps.encode(texts)
    inverse = {i: w for w, i in caps.vocab.items()}
    assert [" ".join(inverse[i] for i in row if i) for row in ids.tolist()] == texts
    assert len(set(texts)) < len(texts)  # pairs share captions: true false negatives exist


# ------------------------------------------------------------------------------ end to end


def _run(script, out, *extra):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    cmd = [sys.executable, str(EXAMPLES / script), "--epochs", "1", "--subset", "200",
           "--batch-size", "64", "--start-epoch", "0", "--out", str(out), *extra]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def _check_outputs(out, stdout, accuracy_columns):
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["method"] for r in rows] == METHODS
    for r in rows:
        for col in accuracy_columns:
            assert 0.0 <= float(r[col + "_mean"]) <= 100.0
    by = {r["method"]: r for r in rows}
    assert by["none"]["precision_mean"] == ""  # nothing is flagged without a method
    assert float(by["oracle"]["precision_mean"]) == 100.0  # the oracle flags the truth itself
    assert float(by["oracle"]["recall_mean"]) == 100.0
    for m in ("fnc", "single", "glofnd"):
        for key in ("precision", "recall", "f1"):
            v = by[m][key + "_mean"]
            assert v == "" or 0.0 <= float(v) <= 100.0
    assert math.isfinite(float(by["glofnd"]["lambda_err_mean"]))
    table = (out / "results.md").read_text()
    assert sum(line.startswith(f"| {m} |") for line in table.splitlines() for m in METHODS) == 5
    for m in METHODS:
        assert f"| {m} |" in stdout  # the table is printed too
    for png in PNGS:
        data = (out / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and 5_000 < len(data) < 200_000
    with open(out / "history.csv") as f:
        hist = list(csv.DictReader(f))
    assert sorted((h["method"], h["epoch"]) for h in hist) == sorted((m, "1") for m in METHODS)


@pytest.mark.slow
def test_simclr_script(tmp_path):
    stdout = _run("simclr.py", tmp_path, "--no-progress")
    _check_outputs(tmp_path, stdout, ["knn_top1", "linear_top1"])


@pytest.mark.slow
def test_clip_script(tmp_path):
    stdout = _run("clip.py", tmp_path, "--base", "sogclr")
    _check_outputs(tmp_path, stdout, ["zero_shot_top1", "i2t_r1", "t2i_r1"])


@pytest.mark.slow
def test_quickstart_notebook_runs():
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    nb = nbformat.read(EXAMPLES / "quickstart.ipynb", as_version=4)
    # The kernel starts in the repository root, where `import glofnd` finds the package.
    client = nbclient.NotebookClient(nb, kernel_name="python3", timeout=240,
                                     resources={"metadata": {"path": str(ROOT)}})
    client.execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) == 3
    tables = [o["data"]["text/markdown"] for o in outputs if "text/markdown" in o.get("data", {})]
    assert len(tables) == 1 and all(f"| {m} |" in tables[0] for m in METHODS)
