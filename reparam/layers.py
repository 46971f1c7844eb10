"""Layers the engine emits that torch.nn does not have."""

from __future__ import annotations

from torch import Tensor
from torch.nn.modules.batchnorm import _BatchNorm


class AnyRankBatchNorm(_BatchNorm):
    """An eval-mode BatchNorm over dim 1 of an input of any rank >= 2 (`F.batch_norm`'s own contract).

    Emitted for a per-channel map whose input rank is unknown (a BatchNorm1d, or `F.batch_norm`,
    with a layer-scale): `nn.BatchNorm1d` would accept only 2D and 3D inputs, `nn.BatchNorm2d`
    only 4D, where the original accepted whatever its layers did.
    """

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected an input with a channel dim (2D or more), got {input.dim()}D")
