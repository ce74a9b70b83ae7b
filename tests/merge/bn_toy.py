"""A tiny BatchNorm CNN made here, fine-tuned on three synthetic tasks whose inputs differ in
statistics: the model of the running-statistics tests (issue 14) and of
``benchmarks/norm_stats.py``.

Images are 10x10: Gaussian noise plus a bright 3x3 blob in one quadrant, the class being the
quadrant (4 classes). Every task sees the same kind of image through its own affine intensity
map (``x -> a·x + b``: a bright low-contrast task, a dark high-contrast one, an inverted one),
so the first BatchNorm's statistics are task-specific while the weights barely need to move.
The pretrained model was trained on untransformed images. Each task has a frozen linear head
(as in the task-vector papers); the encoder is fully fine-tuned with BatchNorm in train mode,
so its running statistics follow the task's inputs. Everything is seeded and runs in a few
seconds on one CPU core.

Not a conftest.py (see merge_helpers.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

SIDE = 10
CLASSES = 4
# task -> (gain, offset) of its intensity map
TASKS: dict[str, tuple[float, float]] = {"bright": (0.5, 3.0), "dark": (3.0, -2.0), "inverted": (-1.5, 1.0)}


class TinyBNNet(nn.Module):
    """conv-BN-ReLU, conv(stride 2)-BN-ReLU, conv-BN-ReLU, global average: 16 features."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.bn2 = nn.BatchNorm2d(16)
        self.conv3 = nn.Conv2d(16, 16, 3, padding=1)
        self.bn3 = nn.BatchNorm2d(16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        x = F.relu(self.bn3(self.conv3(x)))
        return x.mean(dim=(2, 3))


def images(n: int, seed: int, gain: float = 1.0, offset: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` images ``[n, 1, SIDE, SIDE]`` and their quadrant labels, through ``x -> gain·x + offset``."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, SIDE, SIDE, generator=g)
    y = torch.randint(0, CLASSES, (n,), generator=g)
    half = SIDE // 2
    r = torch.randint(0, half - 2, (n,), generator=g) + (y // 2) * half
    c = torch.randint(0, half - 2, (n,), generator=g) + (y % 2) * half
    for i in range(n):
        x[i, 0, r[i] : r[i] + 3, c[i] : c[i] + 3] += 2.5
    return x * gain + offset, y


def task_images(task: str, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gain, offset = TASKS[task]
    return images(n, seed + 7919 * (list(TASKS).index(task) + 1), gain, offset)


def head(seed: int) -> torch.Tensor:
    """A frozen linear head ``[CLASSES, 16]`` with orthonormal rows."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(16, CLASSES, generator=g))
    return q.T.contiguous() * 4.0


def train(model: TinyBNNet, w: torch.Tensor, x: torch.Tensor, y: torch.Tensor, steps: int, seed: int, lr: float = 1e-2) -> None:
    """Adam on cross-entropy against the frozen head, BatchNorm in train mode."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, len(x), (64,), generator=g)
        loss = F.cross_entropy(model(x[idx]) @ w.T, y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


@torch.no_grad()
def accuracy(model: nn.Module, w: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    return float(((model(x) @ w.T).argmax(-1) == y).float().mean())


def load(state: dict[str, torch.Tensor]) -> TinyBNNet:
    model = TinyBNNet()
    model.load_state_dict(state)
    return model.eval()


@dataclass
class Toy:
    """The pretrained model, one fine-tune per task, frozen heads, test and unlabeled data, on disk too."""

    pre: dict[str, torch.Tensor]
    fts: dict[str, dict[str, torch.Tensor]]
    heads: dict[str, torch.Tensor]
    test: dict[str, tuple[torch.Tensor, torch.Tensor]]
    unlabeled: dict[str, torch.Tensor]
    pre_path: Path | None = None
    ft_paths: dict[str, Path] | None = None

    def accuracy(self, state: dict[str, torch.Tensor] | nn.Module, task: str) -> float:
        model = state if isinstance(state, nn.Module) else load(state)
        return accuracy(model, self.heads[task], *self.test[task])

    def accuracies(self, state: dict[str, torch.Tensor] | nn.Module) -> dict[str, float]:
        return {t: self.accuracy(state, t) for t in TASKS}


def build(out: Path | None = None, steps: int = 150, seed: int = 0, lr: float = 3e-3) -> Toy:
    """Pretrain on untransformed images, fine-tune on each task (~2 s on one core); written
    to ``out`` (pre.safetensors, <task>.safetensors) when given."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the same numbers wherever it runs
    try:
        torch.manual_seed(seed)
        model = TinyBNNet()
        x, y = images(2048, seed)
        train(model, head(seed + 100), x, y, 2 * steps, seed)
        pre = {k: v.clone() for k, v in model.state_dict().items()}
        fts, heads, test, unlabeled = {}, {}, {}, {}
        for i, task in enumerate(TASKS):
            heads[task] = head(seed + 100)  # the pretrained head: the classes mean the same in every task
            xt, yt = task_images(task, 1024, seed)
            ft = load(pre)
            train(ft, heads[task], xt, yt, steps, seed + i, lr=lr)
            fts[task] = {k: v.clone() for k, v in ft.state_dict().items()}
            test[task] = task_images(task, 512, seed + 1)
            unlabeled[task] = task_images(task, 256, seed + 2)[0]
    finally:
        torch.set_num_threads(threads)
    toy = Toy(pre, fts, heads, test, unlabeled)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        toy.pre_path = out / "pre.safetensors"
        save_file(pre, toy.pre_path)
        toy.ft_paths = {}
        for task, sd in fts.items():
            toy.ft_paths[task] = out / f"{task}.safetensors"
            save_file(sd, toy.ft_paths[task])
    return toy
