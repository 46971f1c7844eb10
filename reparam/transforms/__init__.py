"""The built-in rules, one file per transform, numbered as in the Diverse Branch Block paper.

I `conv_bn`, II `branch_sum`, III `sequential`, IV `concat`, V `avg_pool`, VI `multiscale`;
`functional` covers the `F.conv*d` / `F.batch_norm` spellings of I and VI, `scale` constant
multiplies and adds (layer-scale, shifts), `padding` pads folded into the conv after them or
the pointwise kernel before them, `channels_last` a Linear between permutes (a 1x1 conv),
`linear` nn.Linear (LeViT's BN over tokens included) and transposed convs; `aten` the
same transforms spelled as torch.export's aten operators (for `reparam.fuse_exported`).
"""

from .aten import ATEN_RULES
from .avg_pool import AVG_POOL, AVG_POOL_OF_INPUT
from .channels_last import CHANNELS_LAST_LINEAR
from .branch_sum import DIFFERENCE, SUM, SUM_WITH_ALPHA
from .concat import CONCAT
from .conv_bn import BATCHNORM
from .functional import BATCH_NORM as FUNCTIONAL_BATCH_NORM
from .functional import CONV as FUNCTIONAL_CONV
from .linear import FLATTENED_CONV, LINEAR, TOKEN_LINEAR_BN, TRANSPOSED_CONV
from .linear_constants import (
    LINEAR_DIVIDED,
    LINEAR_SCALED,
    LINEAR_SHIFTED,
    LINEAR_SHIFTED_DOWN,
    LINEAR_SUBTRACTED_FROM,
)
from .multiscale import CONV
from .padding import BORDERED_REGION, CROPPED_CONV, PADDED_CONV, PADDED_REGION
from .scale import DIVIDE, NEGATION, SCALE, SHIFT, SHIFT_DOWN, SUBTRACTED_FROM

BUILTIN_RULES = (
    PADDED_CONV,  # these two before CONV, which they fall back to
    CROPPED_CONV,
    CONV,
    BATCHNORM,
    FUNCTIONAL_CONV,
    FUNCTIONAL_BATCH_NORM,
    LINEAR,
    TRANSPOSED_CONV,
    FLATTENED_CONV,
    TOKEN_LINEAR_BN,
    LINEAR_SCALED,  # a Linear of any rank and a per-feature constant: replaced by one Linear
    LINEAR_DIVIDED,
    LINEAR_SHIFTED,
    LINEAR_SHIFTED_DOWN,
    LINEAR_SUBTRACTED_FROM,
    PADDED_REGION,
    BORDERED_REGION,
    CHANNELS_LAST_LINEAR,
    AVG_POOL,
    AVG_POOL_OF_INPUT,
    SUM,
    DIFFERENCE,
    SUM_WITH_ALPHA,
    SCALE,
    DIVIDE,
    NEGATION,
    SHIFT,
    SHIFT_DOWN,
    SUBTRACTED_FROM,
    CONCAT,
    *ATEN_RULES,  # the same transforms in torch.export's aten spelling
)

__all__ = [
    "ATEN_RULES",
    "AVG_POOL",
    "AVG_POOL_OF_INPUT",
    "BATCHNORM",
    "BORDERED_REGION",
    "BUILTIN_RULES",
    "CHANNELS_LAST_LINEAR",
    "CONCAT",
    "CONV",
    "DIFFERENCE",
    "DIVIDE",
    "FUNCTIONAL_BATCH_NORM",
    "FLATTENED_CONV",
    "FUNCTIONAL_CONV",
    "LINEAR",
    "LINEAR_DIVIDED",
    "LINEAR_SCALED",
    "LINEAR_SHIFTED",
    "LINEAR_SHIFTED_DOWN",
    "LINEAR_SUBTRACTED_FROM",
    "PADDED_CONV",
    "CROPPED_CONV",
    "PADDED_REGION",
    "NEGATION",
    "SCALE",
    "SHIFT",
    "SHIFT_DOWN",
    "SUBTRACTED_FROM",
    "SUM",
    "SUM_WITH_ALPHA",
    "TOKEN_LINEAR_BN",
    "TRANSPOSED_CONV",
]
