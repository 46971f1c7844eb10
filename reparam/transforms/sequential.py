"""III. Sequential convs (1x1 -> KxK, KxK -> 1x1, KxK -> KxK, through BNs): one conv.

A layer applied to the output of a linear region is folded into it by `Kernel.then`: tap t of
the first kernel and tap u of the second meet at input offset `d1*t + s1*d2*u`, so

    W[o, i, (d1*t + s1*d2*u)/D] += sum_m W2[o, m, u] * W1[m, i, t],    b = b2 + sum_{m,u} W2[o, m, u] * b1[m]

with stride s1*s2 and dilation D = gcd(d1, s1*d2).

Exact condition: the second kernel adds no padding of its own, or the first is pointwise
(1x1, stride 1) and its response to the padding equals the padding: always for reflect /
replicate / circular padding, and for zero padding only with no bias. A biased or BN-shifted
1x1 feeding a zero-padded KxK is therefore refused (`border not exact`): the KxK reads zeros
at the border where the composed conv would read the 1x1's bias. DBB's remedy is its
BN-and-pad layer: the BN pads its output with its own zero-input value and the KxK is
unpadded, which is exactly a zero-padded KxK applied to the 1x1's input. That is a pad after a
pointwise kernel, folded by the padding rules (padding.py) in whichever spelling it is written.

This transform has no rule of its own: every layer rule extends the region feeding it by
`Kernel.then` (`region.chain`), and the fusions it makes list `sequential` among their rules.

Paper: X. Ding et al., "Diverse Branch Block: Building a Convolution as an Inception-like
Unit", CVPR 2021 (transform III).
"""
