"""The built-in example: scikit-learn's bundled handwritten digits and the product brief's MLP.

`load_digits` ships 1,797 real 8x8 images inside scikit-learn, so nothing is downloaded. The split
(60 % train, 20 % validation, 20 % test, stratified) is fixed by `seed`, so every tool that imports
this module sees the same test set. The models are plain `nn.Sequential` stacks of `nn.Linear` and
`nn.ReLU`, so a bare state_dict (`0.weight`, `0.bias`, `2.weight`, ...) describes the MLP fully.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

WIDTHS = {"small": (100, 50), "wide": (2048, 1024)}
N_FEATURES, N_CLASSES = 64, 10


class Split(NamedTuple):
    x: torch.Tensor  # (N, 64) float32, pixel intensities scaled to [0, 1]
    y: torch.Tensor  # (N,) int64 class labels 0..9


class Digits(NamedTuple):
    train: Split
    val: Split
    test: Split


def digits_data(seed: int = 0) -> Digits:
    """Train/validation/test tensors of the digits data set, split reproducibly by `seed`."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    x = bunch.data.astype("float32") / 16.0  # pixel values are 0..16
    y = bunch.target.astype("int64")
    x_rest, x_test, y_rest, y_test = train_test_split(x, y, test_size=0.2, random_state=seed, stratify=y)
    # 0.25 of the remaining 80 % is 20 % of the whole.
    x_train, x_val, y_train, y_val = train_test_split(
        x_rest, y_rest, test_size=0.25, random_state=seed, stratify=y_rest)
    return Digits(*(Split(torch.from_numpy(a), torch.from_numpy(b))
                    for a, b in ((x_train, y_train), (x_val, y_val), (x_test, y_test))))


def loader(split: Split, batch_size: int = 32, shuffle: bool = False, seed: int = 0):
    """A DataLoader over one split; shuffling draws from its own generator so runs repeat exactly."""
    dataset = torch.utils.data.TensorDataset(split.x, split.y)
    generator = torch.Generator().manual_seed(seed) if shuffle else None
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=generator)


def mlp(sizes: list[int] | tuple[int, ...], activation: str = "relu") -> nn.Sequential:
    """An MLP `Linear -> act -> ... -> Linear` with layer widths `sizes` (input first, classes last)."""
    acts = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid}
    if activation not in acts:
        raise ValueError(f"mlp: unknown activation {activation!r}; choose one of {', '.join(acts)}")
    if len(sizes) < 2 or any(int(s) <= 0 for s in sizes):
        raise ValueError(f"mlp: sizes must hold at least 2 positive widths, got {list(sizes)}")
    layers: list[nn.Module] = []
    for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        if i:
            layers.append(acts[activation]())
        layers.append(nn.Linear(int(n_in), int(n_out)))
    return nn.Sequential(*layers)


def mlp_digits(width: str = "small", seed: int | None = None) -> nn.Sequential:
    """The digits MLP: hidden (100, 50) for "small" (the product brief), (2048, 1024) for "wide"."""
    if width not in WIDTHS:
        raise ValueError(f"mlp_digits: unknown width {width!r}; choose one of {', '.join(WIDTHS)}")
    if seed is not None:
        torch.manual_seed(seed)
    return mlp([N_FEATURES, *WIDTHS[width], N_CLASSES])


def mlp_architecture(model: nn.Sequential) -> dict:
    """`{"family": "mlp", "sizes": [...], "activation": ...}` for an MLP built by `mlp`."""
    linears = [m for m in model if isinstance(m, nn.Linear)]
    acts = {type(m).__name__.lower() for m in model if not isinstance(m, nn.Linear)}
    if len(acts) > 1:
        raise ValueError(f"mlp_architecture: expected one activation kind, found {sorted(acts)}")
    sizes = [linears[0].in_features] + [m.out_features for m in linears]
    return {"family": "mlp", "sizes": sizes, "activation": acts.pop() if acts else "relu"}


@torch.no_grad()
def accuracy(model: nn.Module, split: Split, batch_size: int = 512) -> float:
    """Fraction of `split` the model classifies correctly (argmax of the logits)."""
    was_training = model.training
    model.eval()
    correct = 0
    for start in range(0, len(split.y), batch_size):
        logits = model(split.x[start:start + batch_size])
        correct += int((logits.argmax(dim=1) == split.y[start:start + batch_size]).sum())
    model.train(was_training)
    return correct / max(len(split.y), 1)


def train_dense(model: nn.Module, data: Digits, epochs: int = 60, seed: int = 0, *,
                lr: float = 1e-3, weight_decay: float = 1e-4, batch_size: int = 32) -> dict:
    """Train `model` in place (Adam, L2 weight decay, cross-entropy), keeping the epoch with the
    best validation accuracy. Returns {"val_accuracy", "test_accuracy", "epochs"}."""
    torch.manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    best_acc, best_state = -1.0, None
    for epoch in range(epochs):
        model.train()
        for xb, yb in loader(data.train, batch_size, shuffle=True, seed=seed * 1000 + epoch):
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(xb), yb).backward()
            optimizer.step()
        acc = accuracy(model, data.val)
        if acc > best_acc:  # strict: the earliest epoch wins ties, so runs repeat exactly
            best_acc, best_state = acc, {k: v.clone() for k, v in model.state_dict().items()}
    if best_state is not None:
        model.load_state_dict(best_state)
    return {"val_accuracy": accuracy(model, data.val), "test_accuracy": accuracy(model, data.test),
            "epochs": epochs}
