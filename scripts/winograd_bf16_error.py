"""How much bf16 operands cost Winograd's tiles: the relative L2 error of one 3x3 convolution
over C input channels against the exact (float64) result, with the transformed operands rounded
to bf16 (to nearest even) and the products summed in f32, for F(2x2, 3x3), F(4x4, 3x3) and
F(3x3, 3x3) at several sets of interpolation points (Toom-Cook's matrices built from the points,
B^T solved from the convolution identity), beside the direct convolution's rounding.

    python3 scripts/winograd_bf16_error.py [C]     (numpy; C = 256 by default)
"""
import sys

import numpy as np

def bf16(x):
    x = np.asarray(x, np.float32)
    b = x.view(np.uint32).astype(np.uint64)
    b = (b + 0x7FFF + ((b >> 16) & 1)) & 0xFFFF0000
    return b.astype(np.uint32).view(np.float32)

def matrices(points, m, r=3):
    n = m + r - 1
    assert len(points) == n - 1
    p = points
    G = np.zeros((n, r)); AT = np.zeros((m, n))
    for i, pi in enumerate(p):
        N = np.prod([pi - pj for j, pj in enumerate(p) if j != i])
        G[i] = [pi ** k / N for k in range(r)]
        AT[:, i] = [pi ** k for k in range(m)]
    G[n - 1, r - 1] = 1; AT[m - 1, n - 1] = 1
    # Solve B^T from the bilinear identity.
    rows, rhs = [], []
    for a in range(r):
        for b in range(n):
            ga = G[:, a]  # G e_a
            # y = AT diag(ga) BT e_b -> sum_i AT[k,i] ga[i] BT[i,b]
            for k in range(m):
                coef = np.zeros((n, n))
                coef[:, b] = AT[k] * ga
                rows.append(coef.ravel()); rhs.append(1.0 if k + a == b else 0.0)
    BT, res, *_ = np.linalg.lstsq(np.array(rows), np.array(rhs), rcond=None)
    BT = BT.reshape(n, n)
    assert np.allclose(np.array(rows) @ BT.ravel(), rhs, atol=1e-9), "no exact B^T"
    return AT, G, BT

def conv_tiles(d, g, AT, G, BT, rnd):
    # d: [T, C, n, n] input tiles, g: [C, 3, 3]; one output channel; f32 sums.
    U = np.einsum('ij,cjk,lk->cil', G, g, G).astype(np.float32)
    V = np.einsum('ij,tcjk,lk->tcil', BT, d, BT).astype(np.float32)
    if rnd:
        U, V = bf16(U), bf16(V)
    M = np.einsum('cil,tcil->til', U.astype(np.float32), V.astype(np.float32)).astype(np.float32)
    return np.einsum('ij,tjk,lk->til', AT, M, AT)

def direct(d, g, m, rnd):
    if rnd:
        d, g = bf16(d), bf16(g)
    T, C, n, _ = d.shape
    out = np.zeros((T, m, m))
    for y in range(m):
        for x in range(m):
            out[:, y, x] = np.einsum('tcij,cij->t', d[:, :, y:y + 3, x:x + 3].astype(np.float64), g.astype(np.float64))
    return out

rng = np.random.default_rng(0)
C, T = int(sys.argv[1]) if len(sys.argv) > 1 else 256, 400
for name, m, pts in [
    ("F(2x2) {0,1,-1}", 2, [0, 1, -1]),
    ("F(4x4) {0,1,-1,2,-2}", 4, [0, 1, -1, 2, -2]),
    ("F(4x4) {0,1,-1,1/2,-1/2}", 4, [0, 1, -1, 0.5, -0.5]),
    ("F(4x4) {0,1,-1,1/2,-2}", 4, [0, 1, -1, 0.5, -2]),
    ("F(4x4) {0,-1,1,1/2,-3}", 4, [0, -1, 1, 0.5, -3]),
    ("F(3x3) {0,1,-1,1/2}", 3, [0, 1, -1, 0.5]),
    ("F(3x3) {0,1,-1,2}", 3, [0, 1, -1, 2]),
]:
    AT, G, BT = matrices(pts, m)
    n = m + 2
    # Post-GELU-like inputs (mostly positive, some small negative) and He-scaled filters.
    d = rng.standard_normal((T, C, n, n)).astype(np.float32)
    d = (d * 0.5 * (1 + np.tanh(0.8 * d))).astype(np.float32)
    g = (rng.standard_normal((C, 3, 3)) / np.sqrt(9 * C)).astype(np.float32)
    exact = direct(d.astype(np.float64), g.astype(np.float64), m, False)
    w = conv_tiles(d, g, AT, G, BT, True)
    e = np.sqrt(((w - exact) ** 2).sum() / (exact ** 2).sum())
    w32 = conv_tiles(d, g, AT, G, BT, False)
    e32 = np.sqrt(((w32 - exact) ** 2).sum() / (exact ** 2).sum())
    dd = direct(d, g, m, True)
    ed = np.sqrt(((dd - exact) ** 2).sum() / (exact ** 2).sum())
    print(f"{name:28s} bf16 {100*e:.3f}% (direct {100*ed:.3f}%)  f32 {100*e32:.5f}%  "
          f"max|B|={abs(BT).max():.3g} max|G|={abs(G).max():.3g} max|A|={abs(AT).max():.3g}")
