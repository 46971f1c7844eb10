"""Train a small CNN in its plain form and in its expanded (training-time) form, then fuse it back.

    python examples/train_expanded.py                 # 300 steps, block="dbb"
    python examples/train_expanded.py --block acb --steps 500

The data is synthetic: random images, and as targets the outputs of a fixed random "teacher"
CNN (a learnable function, so the losses mean something). A student CNN is trained twice from
the same weights: as written, and after `expand(student, block)`, whose function-preserving
initialization makes both runs start from the same function. The expanded model is then fused
(`reparam.fuse`) back into the student's architecture and checked against itself in eval mode.

Everything printed is measured on this run; nothing here says that expansion improves accuracy
in general (on a problem this small it may not).
"""

from __future__ import annotations

import argparse
import copy
import time
from collections.abc import Sequence

import torch
from torch import nn

import reparam
from reparam.expansion import expand_with_report
from reparam.stats import relative_error


def small_cnn(width: int = 16, outputs: int = 10) -> nn.Sequential:
    """Four 3x3 conv + BN + ReLU layers (two with stride 2), global pooling, a linear head."""

    def unit(cin: int, cout: int, stride: int) -> list[nn.Module]:
        return [nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]

    return nn.Sequential(
        *unit(3, width, 1),
        *unit(width, width, 2),
        *unit(width, 2 * width, 2),
        *unit(2 * width, 2 * width, 1),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(2 * width, outputs),
    )


class Teacher:
    """The learnable target: a fixed random CNN, its outputs standardized. Fresh images every batch."""

    def __init__(self, seed: int, size: int = 16) -> None:
        torch.manual_seed(seed)
        self.net = small_cnn(width=8).eval()
        self.size = size
        self.generator = torch.Generator().manual_seed(seed + 1)
        _, targets = self.batch(1024, standardize=False)
        self.mean, self.std = targets.mean(0), targets.std(0)

    def batch(self, n: int, standardize: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        images = torch.randn(n, 3, self.size, self.size, generator=self.generator)
        with torch.no_grad():
            targets = self.net(images)
        return images, (targets - self.mean) / self.std if standardize else targets


def fit(model: nn.Module, teacher: Teacher, steps: int, seed: int, batch: int = 32) -> list[float]:
    """Adam in train mode on fresh batches (the same ones for every model); the loss of every step."""
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    teacher.generator.manual_seed(seed)
    losses = []
    for _ in range(steps):
        images, targets = teacher.batch(batch)
        loss = nn.functional.mse_loss(model(images), targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def eval_loss(model: nn.Module, images: torch.Tensor, targets: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        return nn.functional.mse_loss(model(images), targets).item()


def count_convs(model: nn.Module) -> int:
    return sum(isinstance(m, nn.Conv2d) for m in model.modules())


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--block", default="dbb", help="acb, dbb, repvgg, mobileone or a registered expander")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # these layers are too small to gain from more threads
    try:
        return run(args.steps, args.block, args.seed)
    finally:
        torch.set_num_threads(threads)


def run(steps: int, block: str, seed: int) -> dict[str, float]:
    """Train the plain and the expanded student, fuse the expanded one, and return the measured numbers."""
    teacher = Teacher(seed)
    teacher.generator.manual_seed(seed + 2)
    test_x, test_y = teacher.batch(512)  # held out: fit() draws from other seeds
    torch.manual_seed(seed + 3)
    plain = small_cnn()
    expanded, report = expand_with_report(plain, block)  # a copy: `plain` is untouched
    print(report)
    print(f"convs: plain {count_convs(plain)}, expanded {count_convs(expanded)}")
    start = eval_loss(copy.deepcopy(plain), test_x, test_y), eval_loss(copy.deepcopy(expanded), test_x, test_y)
    print(f"held-out loss at step 0: plain {start[0]:.4f}, expanded {start[1]:.4f} (same function at the start)")

    timings, curves = {}, {}
    for name, model in [("plain", plain), ("expanded", expanded)]:
        begin = time.perf_counter()
        curves[name] = fit(model, teacher, steps, seed + 4)
        timings[name] = time.perf_counter() - begin
    every = max(1, steps // 6)
    print(f"{'step':>6} {'plain':>10} {'expanded':>10}   (training loss, mean of the last {every} steps)")
    for end in range(every, steps + 1, every):
        plain_loss = sum(curves["plain"][end - every : end]) / every
        expanded_loss = sum(curves["expanded"][end - every : end]) / every
        print(f"{end:>6} {plain_loss:>10.4f} {expanded_loss:>10.4f}")

    fused = reparam.fuse(expanded.eval())
    with torch.no_grad():
        error = relative_error(fused(test_x), expanded(test_x))
    if error > 1e-5:
        raise RuntimeError(f"the fused model differs from the expanded one: relative error {error:.2e}")
    results = {
        "plain_test_loss": eval_loss(plain, test_x, test_y),
        "expanded_test_loss": eval_loss(expanded, test_x, test_y),
        "fused_test_loss": eval_loss(fused, test_x, test_y),
        "fused_vs_expanded_relative_error": error,
        "plain_seconds": timings["plain"],
        "expanded_seconds": timings["expanded"],
    }
    print(
        f"fused back: {count_convs(fused)} convs (plain: {count_convs(plain)}); "
        f"fused vs expanded relative error {error:.2e}"
    )
    print(
        f"held-out loss (eval mode) after {steps} steps: plain {results['plain_test_loss']:.4f}, "
        f"expanded {results['expanded_test_loss']:.4f}, fused {results['fused_test_loss']:.4f}"
    )
    print(f"training time: plain {timings['plain']:.1f} s, expanded {timings['expanded']:.1f} s")
    return results


if __name__ == "__main__":
    main()
