"""Triton kernels for the chunked two-pass Trellis operator, forward and backward.

trellis.py's chunked form, tiled: the same arguments and result as trellis.trellis_op(...,
impl="chunked") with sweeps = 0 (the paper's chunk-start rule) or sweeps >= C - 1 (the exact
recurrence, solved inside each chunk by sweeps that stop once they settle to the dots' rounding);
trellis_op(impl="kernel" or "auto") calls trellis_op_triton. Only the memory recurrence is
sequential (Ubar = gamma code(W S^T, A) needs the memory); every read is computed for all chunks in
parallel from the stored chunk-start memories. Each kernel's docstring names the equations of
trellis.py's section 3b it computes (F1-F5 forward, B1-B6 backward):

    forward   _state_fwd_kernel      grid (B*H, 2 passes), chunks in order: F1, F2, F5
              _read_fwd_kernel       grid (chunks, B*H): both reads, F4
    backward  _read_bwd_value_kernel, then _read_bwd_key_kernel
                                     grid (chunks, B*H): the reads' gradients, in reverse order, B1
              _code_prep_kernel      grid (chunks, B*H, 2 passes), long sequences: B3's terms free of dS
              _state_bwd_kernel      grid (B*H, 2 passes), chunks in reverse carrying dS: B2-B4, B6
              _state_grads_kernel    grid (chunks, B*H, 2 passes): dW and d log beta, B4, B5
In long sequences the backward takes the chunks in runs, last run first, so that _state_bwd_kernel
walks one run while the read and prep kernels work on the next.

Performance only, skippable on a first reading (each bought at least 5% at some T in a same-run
A/B, NOTES.md section 3.2): _exp and _sigmoid (PTX), _code_vjp_u, _dot16 / _dot_split (bf16 tiles
into the tensor cores as they are), EVEN (sizes compiled in), the backward's runs of chunks
(_code_prep_kernel, _store_terms / _load_terms, _runs, default_runs, PREP), and the
layer's short convolution in one pass each way (short_conv_silu, the last section before the check).

Legend: kernel names -> trellis.py's symbols (one head, one chunk of C rows)
  pointers (global tensors)
    q, k, v, al          q, k, v, alpha             [B, T, H, d_k | d_v | m]
    LB, GM               log beta, gamma            [B, T, H] float32
    K0, V0 / KT, VT      initial / final memories   [B, H, m, d] float32
    SK, SV               each chunk's start memory  [B, H, NC, m, d] (stored by the forward)
    UK, UV               U = Ubar of each pass      [B, T, H, m]
    YK                   yhat, the key pass's read  [B, T, H, m]
    PT, PR, PL           a run's code terms (tiles, rows) and the exact rule's L (the backward in runs)
    d<name>              dLoss/d<name>; dSK, dSV: the reads' share per chunk, then (_state_bwd_kernel)
                         dLoss/d(the chunk's start state); dUK, dUV: the reads' dŪ, then dZ
  tiles (registers)
    W, w                 the pass's write pointer (k or v) and its rows, [C, d]
    a, g, lb             the chunk's alpha [C, m], gamma [C], log beta [C]
    S                    the memory: K or V, [m, d]
    Z, U                 Z = W S^T and Ubar, [C, m]
    b, eb, b_c           b (cumulative log beta), e^b, b at the chunk's last row
    Gam, to_end          Gamma [C, C] and e^{b_c - b} [C]
    b_prev, Gam_prev, L  b_{i-1}, Gamma' and L = (W W^T) . Gamma' of the exact rule
    Z0                   diag(e^{b_prev}) W S^T, the exact rule's right-hand side
    qq, kk, vv, R        q, k, v rows and r = f(yhat) rows of the chunk
    Uk, Uv, Yk           Ubar of the key / value pass and yhat, [C, m]
    mm, tm               masks: real slots (m may be padded to a power of 2), real times (T % C)
  launch constants
    C0, NCS              a run of chunks: its first chunk and its length (the backward in runs)
    PREP                 the walk reads _code_prep_kernel's terms
    EVEN                 d_k = d_v and m equal their power-of-two blocks: sizes compiled in

    python kernel.py                  # GPU: check against the PyTorch forms, then the benchmark table
    python kernel.py --skip-check --against OTHER_KERNEL.py ...   # GPU: a same-run A/B of kernel.py files
"""

import argparse
import concurrent.futures
import contextlib
import math
import multiprocessing
import os

import torch
import triton
import triton.language as tl

SUPPORTED_PHI = ("identity", "silu", "norm_silu")
SUPPORTED_F = ("norm_silu", "l2_silu")
_PHI_ID = {name: i for i, name in enumerate(SUPPORTED_PHI)}
_F_ID = {name: i for i, name in enumerate(SUPPORTED_F)}
DEFAULT_PRECISION = "tf32"  # of the dots: TF32 (10-bit mantissas, ~3x the rate) or "ieee" (_dot)

# -----------------------------------------------------------------------------
# row-wise pieces (each row is one token's m slots; `mm` masks padded slots)

_COMPILED = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") != "1")  # False under Triton's interpreter


@triton.jit  # performance only: tl.exp with one instruction fewer
def _exp(x):
    """e^x in one ex2.approx.ftz: the approximation tl.exp uses, without its fix-up for results
    below 2^-126 (a compare and two predicated products an element; such results flush to zero)."""
    if _COMPILED:
        return tl.inline_asm_elementwise("ex2.approx.ftz.f32 $0, $1;", "=f,f", [x * 1.4426950408889634],
                                         dtype=tl.float32, is_pure=True, pack=1)
    else:
        return tl.exp(x)


@triton.jit
def _sigmoid(z):
    """1 / (1 + e^-z) with rcp.approx.ftz (1 ulp) for tl.sigmoid's range-checked division (2 ulp)."""
    if _COMPILED:
        return tl.inline_asm_elementwise("rcp.approx.ftz.f32 $0, $1;", "=f,f", [1.0 + _exp(-z)],
                                         dtype=tl.float32, is_pure=True, pack=1)
    else:
        return tl.sigmoid(z)


@triton.jit
def _silu_parts(z):
    """silu(z), silu'(z), silu''(z)."""
    sg = _sigmoid(z)
    return z * sg, sg * (1 + z * (1 - sg)), sg * (1 - sg) * (2 + z * (1 - 2 * sg))


@triton.jit
def _norm_stats(s, mm, M, EPS: tl.constexpr):
    """LayerNorm over the real slots: (y, 1 / sd, mean) with y zero on padded slots (one division
    a row, a product a slot)."""
    s = tl.where(mm, s, 0.0)
    mu = tl.sum(s, 1) / M
    c = tl.where(mm, s - mu[:, None], 0.0)
    rsd = 1.0 / tl.sqrt(tl.sum(c * c, 1) / M + EPS)
    return c * rsd[:, None], rsd, mu


@triton.jit
def _code_lin(z, a, mm, M, PHI: tl.constexpr, EPS: tl.constexpr):
    """u = J_phi(z)ᵀ (phi(z) - a) (F2), and the terms of its vector-Jacobian product (_code_vjp)
    that do not depend on the incoming gradient: tiles k1 (du/dz slot by slot), s1 = silu'(z),
    y = phi(z) and, per row, rsd, c0 = 1 - mean(e y), c1 = 2 c0 + 1 - mean(y²) and c2 = mean(e),
    e = y - a (normalized SiLU; trellis.py section 1 and code_vjp; mean(y²) = 1 - eps rsd²)."""
    if PHI == 0:
        u = z - a
        k1, s1, y, rsd = u, u, u, tl.sum(u, 1)  # placeholders, unused (and compiled away)
        c0, c1, c2 = rsd, rsd, rsd
    elif PHI == 1:
        s, s1, s2 = _silu_parts(z)
        u = s1 * (s - a)
        k1 = s2 * (s - a) + s1 * s1
        y, rsd = u, tl.sum(u, 1)  # placeholders, unused (and compiled away)
        c0, c1, c2 = rsd, rsd, rsd
    else:
        s, s1, s2 = _silu_parts(z)
        y, rsd, _ = _norm_stats(s, mm, M, EPS)
        e = tl.where(mm, y - a, 0.0)
        c2, ey = tl.sum(e, 1) / M, tl.sum(e * y, 1) / M
        h = (e - c2[:, None] - y * ey[:, None]) * rsd[:, None]  # J_y e (J_y is symmetric)
        u = s1 * h
        c0 = 1 - ey
        c1 = 2 * c0 + EPS * rsd * rsd
        k1 = h * s2 + ((rsd * rsd * c0)[:, None] * s1) * s1
    return tl.where(mm, u, 0.0), k1, s1, y, rsd, c0, c1, c2


@triton.jit
def _code_fwd(z, a, mm, M, PHI: tl.constexpr, EPS: tl.constexpr):
    """u = J_phi(z)ᵀ (phi(z) - a): _code_lin without its other terms (compiled away)."""
    u, _, _, _, _, _, _, _ = _code_lin(z, a, mm, M, PHI, EPS)
    return u


@triton.jit
def _code_vjp(dU, g, u, k1, s1, y, a, rsd, c0, c1, c2, mm, M, PHI: tl.constexpr):
    """B3: (dz, da, dg) for Ū = g ⊙ code(z, a) with dL/dŪ = dU, from _code_lin's terms at (z, a);
    trellis.py's code_vjp in closed form. For normalized SiLU, with u = s1 ⊙ h,
    h = (c0 y - a - c2) rsd, and three row sums of q = dU ⊙ s1 over the real slots:
        dg = Σ dU ⊙ u = rsd (c0 Σ q y - Σ q a - c2 Σ q),
        dz = du ⊙ k1 - s1 ⊙ (y r1 - a r2 + r3),   da = -(q - mean(q) - y mean(q y)) g rsd,
        du = g dU,  r2 = g rsd² mean(q y),  r1 = c1 r2 + g rsd dg / M,
        r3 = g rsd² (c0 mean(q) - c2 mean(q y));
    Identity and SiLU read u: their product is _code_vjp_u's (the chunk-start walk's form)."""
    if PHI != 2:
        return _code_vjp_u(dU, g, u, k1, s1, y, a, rsd, c0, c1, c2, mm, M, PHI)
    du = g[:, None] * dU
    q = tl.where(mm, dU * s1, 0.0)
    sq, sqy, sqa = tl.sum(q, 1), tl.sum(q * y, 1), tl.sum(q * a, 1)
    dg = rsd * (c0 * sqy - sqa - c2 * sq)
    mq, qy = sq / M, sqy / M
    r2 = g * rsd * rsd * qy
    r1 = c1 * r2 + g * rsd * dg / M
    r3 = g * rsd * rsd * (c0 * mq - c2 * qy)
    dz = du * k1 - s1 * (y * r1[:, None] - a * r2[:, None] + r3[:, None])
    da = -(q - mq[:, None] - y * qy[:, None]) * (g * rsd)[:, None]
    return tl.where(mm, dz, 0.0), tl.where(mm, da, 0.0), dg


@triton.jit  # performance only: the same product, fewer products a slot where u is at hand
def _code_vjp_u(dU, g, u, k1, s1, y, a, rsd, c0, c1, c2, mm, M, PHI: tl.constexpr):
    """_code_vjp's (dz, da, dg), with dg = Σ dU ⊙ u read from u, which the chunk-start walk has at
    hand, instead of from three sums of q. In p = du ⊙ s1 = g q the rest is _code_vjp's:
    r2 = rsd² mean(p y), r1 = c1 r2 + rsd g dg / M, r3 = rsd² (c0 mean(p) - c2 mean(p y))."""
    du = g[:, None] * dU
    dg = tl.sum(dU * u, 1)
    if PHI == 0:
        dz = du
        da = -du
    elif PHI == 1:
        dz = du * k1
        da = -du * s1
    else:
        p = tl.where(mm, du * s1, 0.0)
        mp, py = tl.sum(p, 1) / M, tl.sum(p * y, 1) / M
        r2 = rsd * rsd * py
        r1 = r2 * c1 + rsd * (g * dg / M)
        r3 = rsd * rsd * (c0 * mp - py * c2)
        dz = du * k1 - s1 * (y * r1[:, None] - a * r2[:, None] + r3[:, None])
        da = -(p - mp[:, None] - y * py[:, None]) * rsd[:, None]
    return tl.where(mm, dz, 0.0), tl.where(mm, da, 0.0), dg


@triton.jit
def _f_fwd(yh, mm, M, F: tl.constexpr, EPS: tl.constexpr):
    """r = f(yhat): LayerNorm(SiLU) (F = 0) or SiLU / ||SiLU|| (F = 1)."""
    s, _, _ = _silu_parts(yh)
    if F == 0:
        r, _, _ = _norm_stats(s, mm, M, EPS)
    else:
        s = tl.where(mm, s, 0.0)
        r = s * (1.0 / tl.sqrt(tl.sum(s * s, 1) + 1e-6))[:, None]
    return r


@triton.jit
def _f_bwd(yh, dr, mm, M, F: tl.constexpr, EPS: tl.constexpr):
    """d yhat from d r."""
    s, s1, _ = _silu_parts(yh)
    dr = tl.where(mm, dr, 0.0)
    if F == 0:
        y, rsd, _ = _norm_stats(s, mm, M, EPS)
        ds = (dr - (tl.sum(dr, 1) / M)[:, None] - y * (tl.sum(dr * y, 1) / M)[:, None]) * rsd[:, None]
    else:
        s = tl.where(mm, s, 0.0)
        rn = (1.0 / tl.sqrt(tl.sum(s * s, 1) + 1e-6))[:, None]
        r = s * rn
        ds = (dr - r * tl.sum(r * dr, 1)[:, None]) * rn
    return tl.where(mm, ds * s1, 0.0)


# -----------------------------------------------------------------------------
# loads and dots shared by the kernels


@triton.jit
def _load_rows(ptr, t, tm, offs, real, s_t):
    """[C, block] tile of rows t (time) of one (batch, head), in the tensor's dtype, zero where masked."""
    mask = tm[:, None] & (offs[None, :] < real)
    return tl.load(ptr + t[:, None] * s_t + offs[None, :], mask=mask, other=0.0)


@triton.jit
def _store_rows(ptr, x, t, tm, offs, real, s_t):
    """x [C, block] into rows t, in the tensor's dtype: _load_rows' inverse."""
    mask = tm[:, None] & (offs[None, :] < real)
    tl.store(ptr + t[:, None] * s_t + offs[None, :], x.to(ptr.dtype.element_ty), mask=mask)


# Dots. q, k, v and dO come in the inputs' dtype; everything else (memories, codes, gradients) is
# fp32. A bf16 tile goes into the tensor cores as it is: a product with a bf16 partner is exact
# in one bf16 dot, and an fp32 partner x is split into bf16 terms x = x1 + x2 (+ x3) whose
# products are exact, summed in fp32. Two terms keep 16 of x's 24 bits (TF32 keeps 11); three
# keep all of them (IEEE). This skips the conversion of every bf16 tile to fp32 in shared memory
# that an fp32 dot needs, and a bf16 tile takes half the space.


@triton.jit  # performance only (the three _dot* helpers below): what _dot does with bf16 tiles
def _dot16(a, b):
    if _COMPILED:  # the interpreter's bf16 dot is wrong
        return tl.dot(a, b, out_dtype=tl.float32)
    else:  # exact products in fp32 (bf16 has 8 mantissa bits): the same sums
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")


@triton.jit
def _dot16_beside(x, w, X_LEFT: tl.constexpr):
    if X_LEFT:
        return _dot16(x, w)
    else:
        return _dot16(w, x)


@triton.jit
def _dot_split(x, w, X_LEFT: tl.constexpr, PREC: tl.constexpr):
    """x @ w (X_LEFT) or w @ x: x fp32 split into bf16 terms, w bf16."""
    x1 = x.to(tl.bfloat16)
    r = x - x1.to(tl.float32)  # exact
    x2 = r.to(tl.bfloat16)
    acc = _dot16_beside(x1, w, X_LEFT) + _dot16_beside(x2, w, X_LEFT)
    if PREC == "ieee":
        acc += _dot16_beside((r - x2.to(tl.float32)).to(tl.bfloat16), w, X_LEFT)
    return acc


@triton.jit
def _dot(a, b, PREC: tl.constexpr):
    """a @ b in fp32: bf16 operands as they are (above), others as fp32 with PREC ("tf32", "ieee")."""
    if (a.dtype == tl.bfloat16) & (b.dtype == tl.bfloat16):
        return _dot16(a, b)
    elif (a.dtype == tl.bfloat16) & (b.dtype == tl.float32):
        return _dot_split(b, a, False, PREC)
    elif (a.dtype == tl.float32) & (b.dtype == tl.bfloat16):
        return _dot_split(a, b, True, PREC)
    else:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision=PREC)


@triton.jit
def _chunk_rows(ci, pid, T, H, C: tl.constexpr):
    """Chunk ci of (batch, head) pid = b H + h: in a contiguous [B,T,H] tensor, the offset
    gb = b T H + h of (b, h, time 0) and the time stride s_t = H (a gate at gb + t s_t; in a
    [B,T,H,width] one, both times the width); the chunk's row offsets oc, its times t, their mask."""
    oc = tl.arange(0, C)
    t = ci * C + oc
    return (pid // H) * T * H + pid % H, H, oc, t, t < T


@triton.jit
def _load_state(ptr, idx, om, od, M, D):
    """[BM, BD] tile of stored state number idx (an [M, D] matrix), zero-padded, with its
    offsets and mask (for storing a gradient of the same shape)."""
    mask = (om[:, None] < M) & (od[None, :] < D)
    loc = idx * M * D + om[:, None] * D + od[None, :]
    return tl.load(ptr + loc, mask=mask, other=0.0), loc, mask


@triton.jit
def _chunk_decays(lb, offs_c, C: tl.constexpr):
    """b (cumulative log beta), Gamma (lower triangle, exp(b_i - b_j)), e^b, b_c, e^{b_c - b}."""
    b = tl.cumsum(lb, 0)
    tri = offs_c[:, None] >= offs_c[None, :]
    Gam = _exp(tl.where(tri, b[:, None] - b[None, :], float("-inf")))  # only exponents <= 0
    b_c = tl.sum(tl.where(offs_c == C - 1, b, 0.0), 0)  # padded rows have log beta = 0
    return b, Gam, tl.exp(b), b_c, tl.exp(b_c - b)


# -----------------------------------------------------------------------------
# exact chunks (sweeps >= C - 1): the per-token recurrence inside a chunk, as the fixed point
#   Z = Z0 - L Ū(Z),   Z0 = diag(e^{b_prev}) W Sᵀ,   L = (W Wᵀ) ⊙ Γ',  Γ'_ij = exp(b_{i-1} - b_j) (j < i)
# (trellis.py, section 3), reached by sweeps that are matrix products. L is strictly lower
# triangular, so sweep n leaves rows 1..n+1 exact (rows counted from 1, as in trellis.py) and
# C - 1 sweeps solve the system; the error shrinks geometrically long before that, so the loop
# stops once a sweep moves no entry by more than a tolerance times the largest one (_moving).
# Compiled for the GPU, the sweeps settle on a change of about one ulp that never reaches zero
# (NOTES.md, section 2). The backward solves the adjoint system (upper triangular) the same way.


@triton.jit
def _moving(new, old, PREC: tl.constexpr):
    """Whether a sweep moved some entry by more than the tolerance times the largest |entry|:
    2^-21 (8 fp32 ulps) for IEEE dots, 2^-11 for TF32 ones (one rounding of a TF32 operand, 10
    stored mantissa bits: the resolution of the sweeps' own products)."""
    if PREC == "ieee":
        tol = 4.76837158203125e-07
    else:
        tol = 4.8828125e-04
    change, size = tl.max(tl.max(tl.abs(new - old), 1), 0), tl.max(tl.max(tl.abs(new), 1), 0)
    return change > size * tol


@triton.jit
def _exact_lower(w, b, lb, oc, PREC: tl.constexpr):
    """b_{i-1}, Γ' and L = (W Wᵀ) ⊙ Γ' (zero on and above the diagonal)."""
    b_prev = b - lb
    low = oc[:, None] > oc[None, :]
    Gam_prev = _exp(tl.where(low, b_prev[:, None] - b[None, :], float("-inf")))  # only exponents <= 0
    return b_prev, Gam_prev, _dot(w, tl.trans(w), PREC) * Gam_prev


@triton.jit
def _exact_codes_fwd(Z0, L, a, g, mm, M, PHI: tl.constexpr, EPS: tl.constexpr, C: tl.constexpr,
                     PREC: tl.constexpr):
    """Ū of the exact rule: from the codes at Z0 (each row's own decay, none of the chunk's earlier
    tokens), sweeps Ū <- γ code(Z0 - L Ū, α) until Ū settles (_moving) or C - 1 sweeps are done."""
    U = g[:, None] * _code_fwd(Z0, a, mm, M, PHI, EPS)
    n = 0
    moving = True
    while (n < C - 1) & moving:
        U_next = g[:, None] * _code_fwd(Z0 - _dot(L, U, PREC), a, mm, M, PHI, EPS)
        moving = _moving(U_next, U, PREC)
        U = U_next
        n += 1
    return U


@triton.jit
def _exact_codes_bwd(L, a, g, dU, u, k1, s1, y, rsd, c0, c1, c2, mm, M, PHI: tl.constexpr, C: tl.constexpr,
                     PREC: tl.constexpr):
    """B6: the adjoint of _exact_codes_fwd at its solution, from the code's terms there (_code_lin).
    dU: dLoss/dŪ from everything but z (the reads, the chunk end). Solves dŪ = dU - Lᵀ dZ,
    dZ = J_code(z)ᵀ (γ dŪ) by sweeps of dZ alone from dZ = 0 (the first gives the chunk-start
    rule's dZ), then returns dZ, dα and dγ, the last two taken once at the solution."""
    dZ = tl.zeros_like(dU)
    n = 0
    moving = True
    while (n < C) & moving:
        dZ_next, _, _ = _code_vjp(dU - _dot(tl.trans(L), dZ, PREC), g, u, k1, s1, y, a, rsd, c0, c1, c2, mm, M, PHI)
        moving = _moving(dZ_next, dZ, PREC)
        dZ = dZ_next
        n += 1
    _, da, dg = _code_vjp(dU - _dot(tl.trans(L), dZ, PREC), g, u, k1, s1, y, a, rsd, c0, c1, c2, mm, M, PHI)
    return dZ, da, dg


# -----------------------------------------------------------------------------
# forward: _state_fwd_kernel walks the chunks (F1, F2, F5), _read_fwd_kernel reads every chunk
# in parallel (F4); the labels are trellis.py's, section 3b


@triton.jit
def _state_fwd_kernel(k, v, al, LB, GM, K0, V0, SK, SV, UK, UV, KT, VT, T, H, NC,
                      DK, DV, M, BD: tl.constexpr, BM: tl.constexpr,
                      C: tl.constexpr, PHI: tl.constexpr, EPS: tl.constexpr, PREC: tl.constexpr,
                      EXACT: tl.constexpr, EVEN: tl.constexpr):
    """F1, F2, F5. Grid (B*H, 2 passes). Per chunk: Z = W Sᵀ (EXACT: the per-token z, _exact_codes_fwd),
    U = γ code(Z, α), S <- e^{b_c} S - (U ⊙ to_end)ᵀ W.
    Stores each chunk's start state [B,H,NC,m,d] and U [B,T,H,m] for the parallel kernels."""
    if EVEN:  # every size equals its block: strides, masks and divisors are known when compiling
        DK, DV, M = BD, BD, BM
    pid = tl.program_id(0)
    if tl.program_id(1) == 0:  # key pass: write vectors k, memory K
        W, S0, SS, UU, ST, D = k, K0, SK, UK, KT, DK
    else:  # value pass: write vectors v, memory V
        W, S0, SS, UU, ST, D = v, V0, SV, UV, VT, DV
    gb, s_t, oc, t, tm = _chunk_rows(0, pid, T, H, C)  # t, tm: set again for each chunk
    od, om = tl.arange(0, BD), tl.arange(0, BM)
    mm = (om < M)[None, :]
    smask = (om[:, None] < M) & (od[None, :] < D)
    loc = om[:, None] * D + od[None, :]  # [BM, BD] offsets inside one m x d state
    S = tl.load(S0 + pid * M * D + loc, mask=smask, other=0.0)
    row_w, row_m = gb * D, gb * M
    for ci in range(0, NC):
        tl.store(SS + (pid * NC + ci) * M * D + loc, S, mask=smask)
        t = ci * C + oc
        tm = t < T
        w = _load_rows(W + row_w, t, tm, od, D, s_t * D)
        a = _load_rows(al + row_m, t, tm, om, M, s_t * M).to(tl.float32)
        g = tl.load(GM + gb + t * s_t, mask=tm, other=0.0)
        lb = tl.load(LB + gb + t * s_t, mask=tm, other=0.0)
        b, Gam, eb, b_c, to_end = _chunk_decays(lb, oc, C)
        Z = _dot(w, tl.trans(S), PREC)  # W Sᵀ
        if EXACT:
            b_prev, _, L = _exact_lower(w, b, lb, oc, PREC)
            U = _exact_codes_fwd(tl.exp(b_prev)[:, None] * Z, L, a, g, mm, M, PHI, EPS, C, PREC)
        else:
            U = g[:, None] * _code_fwd(Z, a, mm, M, PHI, EPS)
        _store_rows(UU + row_m, U, t, tm, om, M, s_t * M)
        S = tl.exp(b_c) * S - _dot(tl.trans(U * to_end[:, None]), w, PREC)
    tl.store(ST + pid * M * D + loc, S, mask=smask)


@triton.jit
def _read_fwd_kernel(q, k, v, LB, SK, SV, UK, UV, o, YK, T, H, NC,
                     DK, DV, M,
                     BDK: tl.constexpr, BDV: tl.constexpr, BM: tl.constexpr, C: tl.constexpr,
                     F: tl.constexpr, EPS: tl.constexpr, PREC: tl.constexpr, EVEN: tl.constexpr):
    """F4. Grid (NC, B*H): one chunk's reads from its start states and stored codes:
    Yhat = e^b q Kᵀ - ((q kᵀ) ⊙ Γ) Uk,  R = f(Yhat),  O = e^b R V - ((R Uvᵀ) ⊙ Γ) v."""
    if EVEN:
        DK, DV, M = BDK, BDV, BM
    ci, pid = tl.program_id(0), tl.program_id(1)
    gb, s_t, oc, t, tm = _chunk_rows(ci, pid, T, H, C)
    odk, odv, om = tl.arange(0, BDK), tl.arange(0, BDV), tl.arange(0, BM)
    mm = (om < M)[None, :]
    Ks, _, _ = _load_state(SK, pid * NC + ci, om, odk, M, DK)
    Vs, _, _ = _load_state(SV, pid * NC + ci, om, odv, M, DV)
    row_k, row_v, row_m = gb * DK, gb * DV, gb * M
    qq = _load_rows(q + row_k, t, tm, odk, DK, s_t * DK)
    kk = _load_rows(k + row_k, t, tm, odk, DK, s_t * DK)
    vv = _load_rows(v + row_v, t, tm, odv, DV, s_t * DV)
    Uk = _load_rows(UK + row_m, t, tm, om, M, s_t * M)
    Uv = _load_rows(UV + row_m, t, tm, om, M, s_t * M)
    b, Gam, eb, b_c, to_end = _chunk_decays(tl.load(LB + gb + t * s_t, mask=tm, other=0.0), oc, C)
    Pk = _dot(qq, tl.trans(kk), PREC) * Gam
    Yk = eb[:, None] * _dot(qq, tl.trans(Ks), PREC) - _dot(Pk, Uk, PREC)
    _store_rows(YK + row_m, Yk, t, tm, om, M, s_t * M)  # for the backward
    R = _f_fwd(Yk, mm, M, F, EPS)
    Pv = _dot(R, tl.trans(Uv), PREC) * Gam
    O = eb[:, None] * _dot(R, Vs, PREC) - _dot(Pv, vv, PREC)
    _store_rows(o + row_v, O, t, tm, odv, DV, s_t * DV)


# -----------------------------------------------------------------------------
# backward: the read kernels differentiate every chunk's reads in parallel (B1); _state_bwd_kernel
# walks the chunks in reverse carrying dS (B2-B4, B6: the only sequential part);
# _state_grads_kernel finishes dW and d log beta every chunk in parallel (B4, B5)


@triton.jit
def _read_bwd_value_kernel(v, LB, SV, UV, YK, do, dv, dUV, dSV, dYK, dlb, T, H, NC, C0,
                           DV, M, BDV: tl.constexpr, BM: tl.constexpr,
                           C: tl.constexpr, F: tl.constexpr, EPS: tl.constexpr, PREC: tl.constexpr,
                           EVEN: tl.constexpr):
    """B1 (read with r). Grid (chunks of a run, B*H), chunk C0 + program_id(0). The value pass's read
    O = e^b R V - ((R Uvᵀ) ⊙ Γ) v with R = f(Yhat):
    the read parts of dv, dUv, d log beta, dS_read per chunk, and dYhat for the key pass."""
    if EVEN:
        DV, M = BDV, BM
    ci, pid = C0 + tl.program_id(0), tl.program_id(1)
    gb, s_t, oc, t, tm = _chunk_rows(ci, pid, T, H, C)
    odv, om = tl.arange(0, BDV), tl.arange(0, BM)
    mm = (om < M)[None, :]
    Vs, loc_v, vmask = _load_state(SV, pid * NC + ci, om, odv, M, DV)
    row_v, row_m = gb * DV, gb * M
    vv = _load_rows(v + row_v, t, tm, odv, DV, s_t * DV)
    Uv = _load_rows(UV + row_m, t, tm, om, M, s_t * M)
    Yk = _load_rows(YK + row_m, t, tm, om, M, s_t * M)
    dO = _load_rows(do + row_v, t, tm, odv, DV, s_t * DV)
    b, Gam, eb, b_c, to_end = _chunk_decays(tl.load(LB + gb + t * s_t, mask=tm, other=0.0), oc, C)
    R = _f_fwd(Yk, mm, M, F, EPS)
    Pv = _dot(R, tl.trans(Uv), PREC)
    dPv = -_dot(dO, tl.trans(vv), PREC) * Gam  # dL/d(R Uvᵀ)
    dOV = _dot(dO, tl.trans(Vs), PREC)
    dR = eb[:, None] * dOV + _dot(dPv, Uv, PREC)
    G = dPv * Pv  # dΓ ⊙ Γ
    db = tl.sum(R * dOV, 1) * eb + tl.sum(G, 1) - tl.sum(G, 0)  # R * dOV: rows of dO ⊙ (R V), summed
    _store_rows(dYK + row_m, _f_bwd(Yk, dR, mm, M, F, EPS), t, tm, om, M, s_t * M)
    _store_rows(dUV + row_m, _dot(tl.trans(dPv), R, PREC), t, tm, om, M, s_t * M)
    _store_rows(dv + row_v, -_dot(tl.trans(Pv * Gam), dO, PREC), t, tm, odv, DV, s_t * DV)
    tl.store(dSV + loc_v, _dot(tl.trans(R * eb[:, None]), dO, PREC), mask=vmask)
    tl.store(dlb + gb + t * s_t, tl.sum(db, 0) - tl.cumsum(db, 0) + db, mask=tm)  # d log beta_j = sum_{i>=j} db_i


@triton.jit
def _read_bwd_key_kernel(q, k, LB, SK, UK, dYK, dq, dk, dUK, dSK, dlb, T, H, NC, C0,
                         DK, M, BDK: tl.constexpr, BM: tl.constexpr,
                         C: tl.constexpr, PREC: tl.constexpr, EVEN: tl.constexpr):
    """B1 (read with q). Grid (chunks of a run, B*H), chunk C0 + program_id(0). The key pass's read
    Yhat = e^b q Kᵀ - ((q kᵀ) ⊙ Γ) Uk: dq (final), the
    read parts of dk, dUk, dS_read per chunk, and its share of d log beta (added)."""
    if EVEN:
        DK, M = BDK, BM
    ci, pid = C0 + tl.program_id(0), tl.program_id(1)
    gb, s_t, oc, t, tm = _chunk_rows(ci, pid, T, H, C)
    odk, om = tl.arange(0, BDK), tl.arange(0, BM)
    Ks, loc_k, kmask = _load_state(SK, pid * NC + ci, om, odk, M, DK)
    row_k, row_m = gb * DK, gb * M
    qq = _load_rows(q + row_k, t, tm, odk, DK, s_t * DK)
    kk = _load_rows(k + row_k, t, tm, odk, DK, s_t * DK)
    Uk = _load_rows(UK + row_m, t, tm, om, M, s_t * M)
    dYk = _load_rows(dYK + row_m, t, tm, om, M, s_t * M)
    b, Gam, eb, b_c, to_end = _chunk_decays(tl.load(LB + gb + t * s_t, mask=tm, other=0.0), oc, C)
    Pk = _dot(qq, tl.trans(kk), PREC)
    dPk = -_dot(dYk, tl.trans(Uk), PREC) * Gam  # dL/d(q kᵀ)
    G = dPk * Pk
    dYKs = _dot(dYk, Ks, PREC)
    db = tl.sum(qq.to(tl.float32) * dYKs, 1) * eb + tl.sum(G, 1) - tl.sum(G, 0)  # rows of dYk ⊙ (q Kᵀ), summed
    dqq = eb[:, None] * dYKs + _dot(dPk, kk, PREC)
    _store_rows(dq + row_k, dqq, t, tm, odk, DK, s_t * DK)
    _store_rows(dk + row_k, _dot(tl.trans(dPk), qq, PREC), t, tm, odk, DK, s_t * DK)
    _store_rows(dUK + row_m, -_dot(tl.trans(Pk * Gam), dYk, PREC), t, tm, om, M, s_t * M)
    tl.store(dSK + loc_k, _dot(tl.trans(dYk * eb[:, None]), qq, PREC), mask=kmask)
    dlbb = tl.sum(db, 0) - tl.cumsum(db, 0) + db
    tl.store(dlb + gb + t * s_t, tl.load(dlb + gb + t * s_t, mask=tm, other=0.0) + dlbb, mask=tm)


@triton.jit
def _forward_z(w, S, U, b, lb, oc, EXACT: tl.constexpr, PREC: tl.constexpr):
    """The z at which the forward took the chunk's codes: Z = W Sᵀ, or (EXACT) the solution
    diag(e^{b_prev}) W Sᵀ - L Ū from the stored Ū (U); with L and e^{b_prev} (not EXACT: placeholders;
    they, and the load of U, are compiled away)."""
    Z = _dot(w, tl.trans(S), PREC)
    if EXACT:
        b_prev, _, L = _exact_lower(w, b, lb, oc, PREC)
        eb_prev = tl.exp(b_prev)
        Z = eb_prev[:, None] * Z - _dot(L, U, PREC)
    else:
        L, eb_prev = Z, b
    return Z, L, eb_prev


@triton.jit  # performance only (with _load_terms and _code_prep_kernel)
def _store_terms(PT, PR, PL, run_ci, u, k1, s1, y, rsd, c0, c1, c2, L, oc, om, C: tl.constexpr, BM: tl.constexpr,
                 PHI: tl.constexpr, EXACT: tl.constexpr):
    """One chunk's _code_lin terms into a run's buffers: tiles u (unless the exact rule's normalized
    SiLU, whose product does not read it), k1, s1, y into PT, rows rsd, c0, c1, c2 into PR, and
    (EXACT) L into PL."""
    tile, base = oc[:, None] * BM + om[None, :], run_ci * 4
    if (PHI != 2) | (not EXACT):
        tl.store(PT + base * C * BM + tile, u)
    tl.store(PT + (base + 1) * C * BM + tile, k1)
    tl.store(PT + (base + 2) * C * BM + tile, s1)
    tl.store(PT + (base + 3) * C * BM + tile, y)
    tl.store(PR + base * C + oc, rsd)
    tl.store(PR + (base + 1) * C + oc, c0)
    tl.store(PR + (base + 2) * C + oc, c1)
    tl.store(PR + (base + 3) * C + oc, c2)
    if EXACT:
        tl.store(PL + run_ci * C * C + oc[:, None] * C + oc[None, :], L)


@triton.jit
def _load_terms(PT, PR, PL, run_ci, oc, om, C: tl.constexpr, BM: tl.constexpr, EXACT: tl.constexpr):
    """What _store_terms stored: u, k1, s1, y, rsd, c0, c1, c2, L (a load whose value goes unused
    is compiled away)."""
    tile, base = oc[:, None] * BM + om[None, :], run_ci * 4
    u, k1 = tl.load(PT + base * C * BM + tile), tl.load(PT + (base + 1) * C * BM + tile)
    s1, y = tl.load(PT + (base + 2) * C * BM + tile), tl.load(PT + (base + 3) * C * BM + tile)
    rsd, c0 = tl.load(PR + base * C + oc), tl.load(PR + (base + 1) * C + oc)
    c1, c2 = tl.load(PR + (base + 2) * C + oc), tl.load(PR + (base + 3) * C + oc)
    if EXACT:
        L = tl.load(PL + run_ci * C * C + oc[:, None] * C + oc[None, :])
    else:
        L = rsd  # placeholder
    return u, k1, s1, y, rsd, c0, c1, c2, L


@triton.jit
def _code_prep_kernel(k, v, al, LB, SK, SV, UK, UV, PT, PR, PL, T, H, NC, C0, NCS,
                      DK, DV, M, BD: tl.constexpr, BM: tl.constexpr,
                      C: tl.constexpr, PHI: tl.constexpr, EPS: tl.constexpr, PREC: tl.constexpr,
                      EXACT: tl.constexpr, EVEN: tl.constexpr):
    """Performance only: takes B3's gradient-free part out of the walk. Grid (chunks of a run, B*H,
    2 passes), chunk C0 + program_id(0): _code_lin's terms at the forward's z (_forward_z), and
    (EXACT) L, into the run's buffers PT, PR, PL [2 passes, B*H, NCS, ...] (_store_terms)."""
    if EVEN:
        DK, DV, M = BD, BD, BM
    j, pid = tl.program_id(0), tl.program_id(1)
    ci = C0 + j
    if tl.program_id(2) == 0:
        W, SS, UU, D = k, SK, UK, DK
    else:
        W, SS, UU, D = v, SV, UV, DV
    gb, s_t, oc, t, tm = _chunk_rows(ci, pid, T, H, C)
    od, om = tl.arange(0, BD), tl.arange(0, BM)
    mm = (om < M)[None, :]
    S, _, _ = _load_state(SS, pid * NC + ci, om, od, M, D)
    row_w, row_m = gb * D, gb * M
    w = _load_rows(W + row_w, t, tm, od, D, s_t * D)
    a = _load_rows(al + row_m, t, tm, om, M, s_t * M).to(tl.float32)
    lb = tl.load(LB + gb + t * s_t, mask=tm, other=0.0)
    U = _load_rows(UU + row_m, t, tm, om, M, s_t * M)
    Z, L, _ = _forward_z(w, S, U, tl.cumsum(lb, 0), lb, oc, EXACT, PREC)
    u, k1, s1, y, rsd, c0, c1, c2 = _code_lin(Z, a, mm, M, PHI, EPS)
    run_ci = (tl.program_id(2) * tl.num_programs(1) + pid) * NCS + j  # this chunk in the run's buffers
    _store_terms(PT, PR, PL, run_ci, u, k1, s1, y, rsd, c0, c1, c2, L, oc, om, C, BM, PHI, EXACT)


@triton.jit
def _state_bwd_kernel(k, v, al, LB, GM, SK, SV, PT, PR, PL, UK, UV, dUK, dUV, dSK, dSV, dKT, dVT, dalK, dalV,
                      dgmK, dgmV, dK0, dV0, T, H, NC, C0, NCS,
                      DK, DV, M, BD: tl.constexpr, BM: tl.constexpr,
                      C: tl.constexpr, PHI: tl.constexpr, EPS: tl.constexpr, PREC: tl.constexpr,
                      EXACT: tl.constexpr, PREP: tl.constexpr, EVEN: tl.constexpr):
    """B2, B3, B4's step and B6. Grid (B*H, 2 passes), chunks C0 + NCS - 1 down to C0, carrying
    dS = dL/d(state at the chunk's end) from dKT, dVT (the run's end) to dK0, dV0 (its start):
    dS += dS_read of the next chunk, dU = dU_read - to_end ⊙ (W dSᵀ), (dZ, dα, dγ) through the
    code at the forward's z (_code_vjp; EXACT: _exact_codes_bwd), dS <- e^{b_c} dS + dZᵀ W.
    The code's terms come from _code_prep_kernel (PREP) or _code_lin here. For _state_grads_kernel
    it overwrites the next chunk's dS_read with dS and dU_read with dZ (EXACT: before its scaling
    by e^{b_prev}). dK0, dV0 lack the run's first chunk's dS_read, which the run before adds (the
    run from chunk 0 adds its own: the full dL/dK0)."""
    if EVEN:  # every size equals its block: strides, masks and divisors are known when compiling
        DK, DV, M = BD, BD, BM
    pid = tl.program_id(0)
    if tl.program_id(1) == 0:
        W, SS, UU, dUU, dSR, dST, dal, dgm, dS0, D = k, SK, UK, dUK, dSK, dKT, dalK, dgmK, dK0, DK
    else:
        W, SS, UU, dUU, dSR, dST, dal, dgm, dS0, D = v, SV, UV, dUV, dSV, dVT, dalV, dgmV, dV0, DV
    gb, s_t, oc, t, tm = _chunk_rows(0, pid, T, H, C)  # t, tm: set again for each chunk
    od, om = tl.arange(0, BD), tl.arange(0, BM)
    mm = (om < M)[None, :]
    smask = (om[:, None] < M) & (od[None, :] < D)
    loc = om[:, None] * D + od[None, :]
    dS = tl.load(dST + pid * M * D + loc, mask=smask, other=0.0)
    row_w, row_m = gb * D, gb * M
    for cj in range(0, NCS):
        ci = C0 + NCS - 1 - cj
        t = ci * C + oc
        tm = t < T
        w = _load_rows(W + row_w, t, tm, od, D, s_t * D)
        a = _load_rows(al + row_m, t, tm, om, M, s_t * M).to(tl.float32)
        g = tl.load(GM + gb + t * s_t, mask=tm, other=0.0)
        lb = tl.load(LB + gb + t * s_t, mask=tm, other=0.0)
        # added here, where a dot uses it, the next chunk's dS_read is prefetched with the other loads
        nxt = dSR + (pid * NC + ci + 1) * M * D + loc  # (none after the last chunk)
        dS += tl.load(nxt, mask=smask & (ci + 1 < NC), other=0.0)
        tl.store(nxt, dS, mask=smask & (ci + 1 < NC))
        b, Gam, eb, b_c, to_end = _chunk_decays(lb, oc, C)
        dU = _load_rows(dUU + row_m, t, tm, om, M, s_t * M) - to_end[:, None] * _dot(w, tl.trans(dS), PREC)
        if PREP:  # chunk cj from the run's end in _code_prep_kernel's buffers
            run_ci = (tl.program_id(1) * tl.num_programs(0) + pid) * NCS + NCS - 1 - cj
            u, k1, s1, y, rsd, c0, c1, c2, L = _load_terms(PT, PR, PL, run_ci, oc, om, C, BM, EXACT)
            eb_prev = tl.exp(b - lb)
        else:
            S = tl.load(SS + (pid * NC + ci) * M * D + loc, mask=smask, other=0.0)
            U = _load_rows(UU + row_m, t, tm, om, M, s_t * M)
            Z, L, eb_prev = _forward_z(w, S, U, b, lb, oc, EXACT, PREC)
            u, k1, s1, y, rsd, c0, c1, c2 = _code_lin(Z, a, mm, M, PHI, EPS)
        if EXACT:
            dZ, da, dgv = _exact_codes_bwd(L, a, g, dU, u, k1, s1, y, rsd, c0, c1, c2, mm, M, PHI, C, PREC)
        else:
            dZ, da, dgv = _code_vjp_u(dU, g, u, k1, s1, y, a, rsd, c0, c1, c2, mm, M, PHI)
        _store_rows(dUU + row_m, dZ, t, tm, om, M, s_t * M)
        _store_rows(dal + row_m, da, t, tm, om, M, s_t * M)
        tl.store(dgm + gb + t * s_t, dgv, mask=tm)
        if EXACT:
            dZ = dZ * eb_prev[:, None]  # the gradient w.r.t. W Sᵀ
        dS = tl.exp(b_c) * dS + _dot(tl.trans(dZ), w, PREC)
    if C0 == 0:
        dS += tl.load(dSR + pid * NC * M * D + loc, mask=smask, other=0.0)  # chunk 0's reads
    tl.store(dS0 + pid * M * D + loc, dS, mask=smask)


@triton.jit
def _state_grads_kernel(k, v, LB, SK, SV, UK, UV, dZK, dZV, dSK, dSV, dKT, dVT, dk, dv, dkf, dvf, dlbK, dlbV,
                        dalK, dalV, dal, dgmK, dgmV, dgm, T, H, NC, DK, DV, M,
                        BD: tl.constexpr, BM: tl.constexpr, C: tl.constexpr, PREC: tl.constexpr,
                        EXACT: tl.constexpr, EVEN: tl.constexpr):
    """B2's dW and db, B4's dW, B5. Grid (NC, B*H, 2 passes), every chunk in parallel once
    _state_bwd_kernel has stored its dZ and the dS at its end: the state updates' share of dW,
    dZ S - (U ⊙ to_end) dS, added to the reads' (dk, dv) and stored in the inputs' dtype (dkf, dvf);
    d log beta (through e^{b_c}, to_end and, EXACT, through Z = diag(e^{b_{i-1}}) W Sᵀ - L U);
    the two passes' dα summed (key pass, in α's dtype) and dγ summed (value pass)."""
    if EVEN:  # every size equals its block: strides, masks and divisors are known when compiling
        DK, DV, M = BD, BD, BM
    ci, pid = tl.program_id(0), tl.program_id(1)
    if tl.program_id(2) == 0:
        W, SS, UU, dZZ, dSE, dST, dW, dWf, dlb, D = k, SK, UK, dZK, dSK, dKT, dk, dkf, dlbK, DK
    else:
        W, SS, UU, dZZ, dSE, dST, dW, dWf, dlb, D = v, SV, UV, dZV, dSV, dVT, dv, dvf, dlbV, DV
    gb, s_t, oc, t, tm = _chunk_rows(ci, pid, T, H, C)
    od, om = tl.arange(0, BD), tl.arange(0, BM)
    S, _, _ = _load_state(SS, pid * NC + ci, om, od, M, D)
    # dL/d(state at the chunk's end): the next chunk's start, or the final state
    smask, loc = (om[:, None] < M) & (od[None, :] < D), om[:, None] * D + od[None, :]
    dS = (tl.load(dSE + (pid * NC + ci + 1) * M * D + loc, mask=smask & (ci + 1 < NC), other=0.0)
          + tl.load(dST + pid * M * D + loc, mask=smask & (ci + 1 == NC), other=0.0))
    row_w, row_m = gb * D, gb * M
    w = _load_rows(W + row_w, t, tm, od, D, s_t * D)
    U = _load_rows(UU + row_m, t, tm, om, M, s_t * M)
    dZ = _load_rows(dZZ + row_m, t, tm, om, M, s_t * M)
    lb = tl.load(LB + gb + t * s_t, mask=tm, other=0.0)
    b, Gam, eb, b_c, to_end = _chunk_decays(lb, oc, C)
    dWc = _load_rows(dW + row_w, t, tm, od, D, s_t * D)
    if EXACT:
        b_prev, Gam_prev, L = _exact_lower(w, b, lb, oc, PREC)
        eb_prev = tl.exp(b_prev)
        dL = tl.where(oc[:, None] > oc[None, :], -_dot(dZ, tl.trans(U), PREC), 0.0)
        dWW = dL * Gam_prev
        dWc += _dot(dWW + tl.trans(dWW), w, PREC)  # through L = (W Wᵀ) ⊙ Γ'
        G = dL * L  # dΓ' ⊙ Γ'
        db_prev = tl.sum(dZ * _dot(w, tl.trans(S), PREC), 1) * eb_prev + tl.sum(G, 1)
        dZ = dZ * eb_prev[:, None]  # the gradient w.r.t. W Sᵀ
        db_extra = db_prev - tl.sum(G, 0)
    else:
        db_prev = tl.zeros([C], dtype=tl.float32)
        db_extra = db_prev
    dWc += _dot(dZ, S, PREC) - _dot(U * to_end[:, None], dS, PREC)
    _store_rows(dWf + row_w, dWc, t, tm, od, D, s_t * D)  # final: in the inputs' dtype
    gd = -tl.sum(U * _dot(w, tl.trans(dS), PREC), 1) * to_end  # through to_end = e^{b_c - b}
    db = tl.where(oc == C - 1, tl.sum(tl.sum(dS * S, 1), 0) * tl.exp(b_c) + tl.sum(gd, 0), 0.0) - gd + db_extra
    # d log beta_j = sum_{i>=j} db_i, less the b_{i-1} = b_i - log beta_i share
    tl.store(dlb + gb + t * s_t, tl.sum(db, 0) - tl.cumsum(db, 0) + db - db_prev, mask=tm)
    if tl.program_id(2) == 0:
        da = _load_rows(dalK + row_m, t, tm, om, M, s_t * M) + _load_rows(dalV + row_m, t, tm, om, M, s_t * M)
        _store_rows(dal + row_m, da, t, tm, om, M, s_t * M)  # the two passes' dα
    else:
        tl.store(dgm + gb + t * s_t, tl.load(dgmK + gb + t * s_t, mask=tm) + tl.load(dgmV + gb + t * s_t, mask=tm),
                 mask=tm)


# -----------------------------------------------------------------------------
# autograd wrapper


def _block(n):
    return max(16, triton.next_power_of_2(n))


def _launch_config(DK, DV, M, C, phi, f, phi_eps, f_eps, exact, prec, num_warps):
    """Launch keywords of the sequential (state) kernels, the read kernels, _state_grads_kernel and
    _code_prep_kernel. The sequential kernels prefetch the next chunk (2 stages) unless an [m, d]
    memory tile holds over 8192 entries, whose prefetched fp32 tiles would take 280-304 KB of
    shared memory (test_equivalence.py's kernel_shared_memory); the others have no loop to pipeline."""
    even = DK == DV == _block(DK) and M == _block(M)  # no padding: sizes known when compiling
    dims = dict(DK=DK, DV=DV, M=M, BM=_block(M), C=C, PREC=prec, EVEN=even)
    BD = max(_block(DK), _block(DV))
    seq = dict(dims, BD=BD, PHI=_PHI_ID[phi], EPS=phi_eps, EXACT=exact,
               num_warps=num_warps[0], num_stages=2 if _block(M) * BD <= 8192 else 1)
    par = dict(dims, BDK=_block(DK), BDV=_block(DV), F=_F_ID[f], EPS=f_eps, num_warps=num_warps[1], num_stages=1)
    grads = dict(dims, BD=seq["BD"], EXACT=exact, num_warps=num_warps[1], num_stages=1)
    prep = dict(dims, BD=BD, PHI=_PHI_ID[phi], EPS=phi_eps, EXACT=exact, num_warps=num_warps[1], num_stages=1)
    return seq, par, grads, prep


def _taken(fn, launch):
    """The launch keywords (from _launch_config) that kernel fn takes, with its warps and stages."""
    return {x: launch[x] for x in launch if x in fn.arg_names or x in ("num_warps", "num_stages")}


def _runs(NC, n):
    """Up to n consecutive runs of chunks (first chunk, count) covering chunks 0 .. NC - 1."""
    n = max(1, min(n, NC))
    edges = [NC * i // n for i in range(n + 1)]
    return [(a, b - a) for a, b in zip(edges, edges[1:])]


class TrellisChunkFn(torch.autograd.Function):
    """(q, k, v, alpha, log_beta, gamma, K0, V0) -> (o, K_T, V_T); q..alpha [B,T,H,*] contiguous,
    log_beta, gamma [B,T,H] fp32, K0, V0 [B,H,m,d] fp32. runs > 1: the backward's walk of a run, on
    a side stream, waits only for that run's reads (on the CPU the same launches run in order)."""

    @staticmethod
    def forward(ctx, q, k, v, alpha, log_beta, gamma, K0, V0, phi, f, phi_eps, f_eps, C, exact, prec, num_warps,
                runs):
        B, T, H, DK = q.shape
        DV, M = v.shape[-1], alpha.shape[-1]
        NC = triton.cdiv(T, C)
        f32 = dict(dtype=torch.float32, device=q.device)
        o = torch.empty_like(v)
        KT, VT = torch.empty_like(K0), torch.empty_like(V0)
        SK, SV = torch.empty(B, H, NC, M, DK, **f32), torch.empty(B, H, NC, M, DV, **f32)  # chunk-start states
        UK, UV = torch.empty(alpha.shape, **f32), torch.empty(alpha.shape, **f32)  # Ubar = γ code(Z, α)
        spans = _runs(NC, runs)  # the backward's runs of chunks: (first chunk, count) each
        prepped = len(spans) > 1  # the backward runs _code_prep_kernel
        seq, par, grads, prep = _launch_config(DK, DV, M, C, phi, f, phi_eps, f_eps, exact, prec, num_warps)
        _state_fwd_kernel[(B * H, 2)](k, v, alpha, log_beta, gamma, K0, V0, SK, SV, UK, UV, KT, VT, T, H, NC, **seq)
        YK = torch.empty(alpha.shape, **f32)  # the key pass's read yhat, kept for the backward
        _read_fwd_kernel[(NC, B * H)](q, k, v, log_beta, SK, SV, UK, UV, o, YK, T, H, NC, **par)
        ctx.save_for_backward(q, k, v, alpha, log_beta, gamma, SK, SV, UK, UV, YK)
        ctx.seq, ctx.par, ctx.grads, ctx.prep = seq, par, grads, prep
        ctx.NC, ctx.spans, ctx.prepped = NC, spans, prepped
        return o, KT, VT

    @staticmethod
    def backward(ctx, do, dKT, dVT):
        q, k, v, alpha, log_beta, gamma, SK, SV, UK, UV, YK = ctx.saved_tensors
        B, T, H, DK = q.shape
        M, DV, NC = alpha.shape[-1], v.shape[-1], ctx.NC
        f32 = dict(dtype=torch.float32, device=q.device)
        do = do.contiguous()
        dKT = torch.zeros(B, H, M, DK, **f32) if dKT is None else dKT.float().contiguous()
        dVT = torch.zeros(B, H, M, DV, **f32) if dVT is None else dVT.float().contiguous()
        dq = torch.empty_like(q)  # final after _read_bwd_key_kernel; dk, dv: the reads' shares, fp32
        dk, dv = torch.empty(k.shape, **f32), torch.empty(v.shape, **f32)
        dUK, dUV, dYK, dalK, dalV = (torch.empty(alpha.shape, **f32) for _ in range(5))
        dSK, dSV = torch.empty_like(SK), torch.empty_like(SV)  # per chunk, the reads' dL/dS
        dlb_read, dlbK, dlbV, dgmK, dgmV = (torch.empty_like(log_beta) for _ in range(5))
        spans = ctx.spans
        dKs = [torch.empty_like(dKT) for _ in spans] + [dKT]  # dL/d(state) where runs meet; dKs[0] = dL/dK0
        dVs = [torch.empty_like(dVT) for _ in spans] + [dVT]
        C = ctx.seq["C"]
        # the walks' stream: high priority, so that a multiprocessor freed by a read kernel's program
        # goes to the walk first (torch takes it from its pool of streams)
        side = torch.cuda.Stream(q.device, priority=-1) if q.is_cuda and len(spans) > 1 else None
        main = torch.cuda.current_stream(q.device) if side else None
        # _code_prep_kernel's terms, two runs' worth: run r writes buffer r % 2 once the walk of run r + 2,
        # which read it, is done
        most = max(n for _, n in spans) if ctx.prepped else 0
        PT = torch.empty(2, 2, B * H, most, 4, C, ctx.seq["BM"], **f32)
        PR = torch.empty(2, 2, B * H, most, 4, C, **f32)
        PL = torch.empty(2, 2, B * H, most if ctx.seq["EXACT"] else 0, C, C, **f32)  # the exact rule's L
        walked = {}
        for r in reversed(range(len(spans))):
            c0, n = spans[r]
            _read_bwd_value_kernel[(n, B * H)](v, log_beta, SV, UV, YK, do, dv, dUV, dSV, dYK, dlb_read, T, H, NC, c0,
                                               **_taken(_read_bwd_value_kernel, ctx.par))
            _read_bwd_key_kernel[(n, B * H)](q, k, log_beta, SK, UK, dYK, dq, dk, dUK, dSK, dlb_read, T, H, NC, c0,
                                             **_taken(_read_bwd_key_kernel, ctx.par))
            if ctx.prepped:
                if r + 2 in walked:
                    main.wait_event(walked[r + 2])
                _code_prep_kernel[(n, B * H, 2)](k, v, alpha, log_beta, SK, SV, UK, UV, PT[r % 2], PR[r % 2],
                                                 PL[r % 2], T, H, NC, c0, n, **ctx.prep)
            if side:
                side.wait_stream(main)  # this run's reads (and, the first time, every input)
            with torch.cuda.stream(side) if side else contextlib.nullcontext():
                _state_bwd_kernel[(B * H, 2)](k, v, alpha, log_beta, gamma, SK, SV, PT[r % 2], PR[r % 2],
                                              PL[r % 2], UK, UV, dUK, dUV, dSK, dSV, dKs[r + 1], dVs[r + 1], dalK,
                                              dalV, dgmK, dgmV, dKs[r], dVs[r], T, H, NC, c0, n, PREP=ctx.prepped,
                                              **ctx.seq)
            if side and ctx.prepped:
                walked[r] = torch.cuda.Event()
                walked[r].record(side)
        if side:
            main.wait_stream(side)
        # dUK, dUV now hold dZ and dSK, dSV (chunks 1 ..) the dS at each chunk's start. The final
        # gradients take the place of the buffers only the walks needed (peak memory)
        del PT, PR, PL, dYK
        dkf, dvf = (dk, dv) if k.dtype == torch.float32 else (torch.empty_like(k), torch.empty_like(v))
        dal, dgm = torch.empty_like(alpha), torch.empty_like(gamma)
        _state_grads_kernel[(NC, B * H, 2)](k, v, log_beta, SK, SV, UK, UV, dUK, dUV, dSK, dSV, dKT, dVT, dk, dv,
                                            dkf, dvf, dlbK, dlbV, dalK, dalV, dal, dgmK, dgmV, dgm, T, H, NC,
                                            **ctx.grads)
        return (dq, dkf, dvf, dal, dlb_read + dlbK + dlbV, dgm, dKs[0], dVs[0], None, None, None, None, None, None,
                None, None, None)


def default_warps(m):
    """(sequential, parallel) warps: 4; 8 for m > 128, whose [256, d] memory tiles need the
    registers of 8 warps (at 4 a thread would spill 1-4 KB in the backward; ptxas -v, sm_90a).
    The exact rule included: its sweeps at 8 warps were slower at every T (NOTES.md, section 4)."""
    return (8, 8) if m > 128 else (4, 4)


def default_runs(programs=None, sms=None):
    """Runs of chunks in the backward (TrellisChunkFn): 4 when the sequential kernels' `programs`
    (B*H*2) leave at least half of the GPU's `sms` multiprocessors to the read kernels (long
    sequences), else 1 (other counts: NOTES.md, section 4)."""
    return 4 if programs is not None and sms is not None and 2 * programs <= sms else 1


def unsupported(q, v, alpha, phi, f, chunk_size, sweeps):
    """Why the kernel cannot run this call (a sentence), or None when it can."""
    if phi not in SUPPORTED_PHI:
        return f"phi={phi!r} is not supported (supported: {SUPPORTED_PHI})"
    if f not in SUPPORTED_F:
        return f"f={f!r} is not supported (supported: {SUPPORTED_F})"
    if 0 < sweeps < chunk_size - 1:
        return (f"sweeps={sweeps} is not supported (0, the chunk-start rule, or >= chunk_size - 1, exact); "
                f"use impl='chunked' for partial refinement")
    if chunk_size not in (16, 32, 64):
        return f"chunk_size must be 16, 32 or 64, got {chunk_size}"
    d_k, d_v, m = q.shape[-1], v.shape[-1], alpha.shape[-1]
    for name, n in dict(d_k=d_k, d_v=d_v).items():
        if n > 128:
            return f"{name}={n} is not supported (at most 128)"
    if m > 256 or (m > 128 and (chunk_size != 16 or max(d_k, d_v) > 64)):
        return f"m={m} is not supported (at most 128, or 256 at chunk_size 16 with d_k, d_v <= 64)"
    for name, n in dict(d_k=d_k, d_v=d_v, m=m).items():
        if chunk_size == 64 and n > 64:  # the backward read kernels would need 262-394 KB of shared memory
            return f"{name}={n} needs chunk_size 16 or 32 (chunk_size 64 takes d_k, d_v, m up to 64)"
    if q.dtype == torch.float64:
        return "float64 is not supported (fp32, bf16, fp16); use impl='chunked'"
    if not q.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        return "tensors must be on a CUDA device (or set TRITON_INTERPRET=1 to interpret on the CPU)"
    return None


def trellis_op_triton(q, k, v, alpha, beta, gamma, K0=None, V0=None, *, phi, f, phi_eps, f_eps, chunk_size=64,
                      sweeps=0, precision=None, num_warps=None, runs=None):
    """The Triton form of trellis.trellis_op: the chunk-start rule (sweeps = 0) or the exact
    recurrence (sweeps >= C - 1). Inputs as there (trellis_op checks them before it calls
    this); phi_eps and f_eps are the LayerNorm epsilons of phi and f. precision "tf32" or
    "ieee" (None: DEFAULT_PRECISION) says how exact the dots are: fp32 operands in TF32 or IEEE,
    and, with bf16 inputs, the fp32 partner of a bf16 tile in two or three bf16 terms (_dot). num_warps:
    (sequential kernels, parallel kernels), None: default_warps(). runs: runs of chunks
    whose parallel kernels overlap the sequential ones (TrellisChunkFn), None: default_runs()."""
    why = unsupported(q, v, alpha, phi, f, chunk_size, sweeps)
    if why:
        raise ValueError("kernel: " + why)
    precision = precision or DEFAULT_PRECISION
    B, T, H, dk = q.shape
    m, dv = alpha.shape[-1], v.shape[-1]
    dt = q.dtype
    q, k, v, alpha = (t.to(dt).contiguous() for t in (q, k, v, alpha))
    log_beta = torch.log(beta.float().clamp_min(torch.finfo(torch.float32).tiny)).contiguous()
    gamma = gamma.float().contiguous()
    K0 = q.new_zeros(B, H, m, dk, dtype=torch.float32) if K0 is None else K0.float().contiguous()
    V0 = q.new_zeros(B, H, m, dv, dtype=torch.float32) if V0 is None else V0.float().contiguous()
    exact = sweeps >= chunk_size - 1 > 0  # the per-token recurrence inside each chunk
    sms = torch.cuda.get_device_properties(q.device).multi_processor_count if q.is_cuda else None
    if num_warps is None:
        num_warps = default_warps(m)
    if runs is None:
        runs = default_runs(B * H * 2, sms)
    o, KT, VT = TrellisChunkFn.apply(q, k, v, alpha, log_beta, gamma, K0, V0, phi, f, phi_eps, f_eps, chunk_size,
                                     exact, precision, num_warps, runs)
    return o.to(v.dtype), KT, VT


# -----------------------------------------------------------------------------
# the layer's short convolution: y = silu(causal depthwise conv of x over time, width W), and,
# for q and k, each head's d channels scaled to unit L2 norm, y / sqrt(||y||^2 + d 1e-12) (as
# trellis.l2_normalize), in one pass each way. PyTorch's depthwise conv1d copies a transpose each
# way and computes its weight gradient slowly; trellis.ShortConv is the reference and uses this
# on CUDA.


@triton.jit
def _conv_pre(x, w, t, tm0, T, oc, cm, s_t, j0: tl.constexpr, W: tl.constexpr, BT: tl.constexpr,
              BC: tl.constexpr):
    """The convolution before the SiLU at rows t + j0 (x points at the batch's row 0)."""
    acc = tl.zeros([BT, BC], dtype=tl.float32)
    for j in tl.static_range(W):  # tap j sees row t + j0 - (W - 1) + j
        r = t + j0 - (W - 1) + j
        xm = (r >= 0) & (r < T) & tm0
        xj = tl.load(x + r[:, None] * s_t + oc[None, :], mask=xm[:, None] & cm[None, :], other=0.0)
        acc += xj.to(tl.float32) * tl.load(w + oc * W + j, mask=cm, other=0.0)[None, :]
    return acc


@triton.jit
def _conv_block(pg, G, CH, BC: tl.constexpr):
    """Channel group pg (G channels: a head when normalizing) in a block of BC >= G lanes."""
    oc = pg * G + tl.arange(0, BC)
    return oc, (tl.arange(0, BC) < G) & (oc < CH)


@triton.jit
def _short_conv_fwd_kernel(x, w, y, T, CH, G, s_b, s_t, W: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr,
                           NORM: tl.constexpr):
    """Grid (T blocks, channel groups, B). x [B,T,CH] with row stride s_t (channels contiguous),
    w [CH, W] fp32; y [B,T,CH] contiguous in x's dtype. NORM: each group of G channels at unit norm."""
    t = tl.program_id(0) * BT + tl.arange(0, BT)
    oc, cm = _conv_block(tl.program_id(1), G, CH, BC)
    bi = tl.program_id(2)
    tm = t < T
    z = _conv_pre(x + bi * s_b, w, t, tm, T, oc, cm, s_t, 0, W, BT, BC)
    out = z * tl.sigmoid(z)
    if NORM:
        out = out / tl.sqrt(tl.sum(out * out, 1) + G * 1e-12)[:, None]
    tl.store(y + bi * T * CH + t[:, None] * CH + oc[None, :], out.to(y.dtype.element_ty),
             mask=tm[:, None] & cm[None, :])


@triton.jit
def _short_conv_bwd_kernel(x, w, dy, dx, dwp, T, CH, G, s_b, s_t, W: tl.constexpr, BT: tl.constexpr,
                           BC: tl.constexpr, NORM: tl.constexpr, ONE: tl.constexpr):
    """Grid as the forward; dy, dx [B,T,CH] contiguous. With s = silu(z) (z recomputed) and, NORM,
    n = s / |s|: ds = (dy - n (n . dy)) / |s| (else dy), dz = ds silu'(z),
    dx_r = sum_j w_j dz_{r + W - 1 - j}, and this block's share of dw_j = sum_t dz_t x_{t - W + 1 + j},
    stored in dwp [B * T blocks, CH, W] (summed in PyTorch: no atomics, a fixed order)."""
    pt, bi = tl.program_id(0), tl.program_id(2)
    t = pt * BT + tl.arange(0, BT)
    oc, cm = _conv_block(tl.program_id(1), G, CH, BC)
    tm = t < T
    xb, dyb = x + bi * s_b, dy + bi * T * CH
    acc = tl.zeros([BT, BC], dtype=tl.float32)
    for s in tl.static_range(W):  # dz at rows t + s feeds dx_t through tap W - 1 - s
        r = t + s
        rm = (r < T) & tm
        z = _conv_pre(xb, w, t, tm, T, oc, cm, s_t, s, W, BT, BC)
        sg = tl.sigmoid(z)
        g = tl.load(dyb + r[:, None] * CH + oc[None, :], mask=rm[:, None] & cm[None, :], other=0.0).to(tl.float32)
        if NORM:
            a = z * sg
            rn = 1.0 / tl.sqrt(tl.sum(a * a, 1) + G * 1e-12)
            if ONE:  # one-channel heads: d/ds of s / sqrt(s^2 + 1e-12), without the projection's cancellation
                g = g * (1e-12 * rn * rn * rn)[:, None]
            else:
                n = a * rn[:, None]
                g = (g - n * tl.sum(n * g, 1)[:, None]) * rn[:, None]
        dz = g * sg * (1 + z * (1 - sg))
        acc += dz * tl.load(w + oc * W + (W - 1 - s), mask=cm, other=0.0)[None, :]
        if s == 0:  # this block's rows: their share of dw
            for j in tl.static_range(W):
                rj = t - (W - 1) + j
                xm = (rj >= 0) & tm
                xj = tl.load(xb + rj[:, None] * s_t + oc[None, :], mask=xm[:, None] & cm[None, :], other=0.0)
                part = tl.sum(dz * xj.to(tl.float32), 0)  # [BC]
                tl.store(dwp + ((bi * tl.num_programs(0) + pt) * CH + oc) * W + j, part, mask=cm)
    tl.store(dx + bi * T * CH + t[:, None] * CH + oc[None, :], acc.to(dx.dtype.element_ty),
             mask=tm[:, None] & cm[None, :])


class ShortConvFn(torch.autograd.Function):
    """(x [B,T,CH], weight [CH, W], head) -> silu(causal depthwise conv1d(x, weight)) over time,
    [B,T,CH] in x's dtype, each group of `head` channels (a head of q or k) scaled to unit L2 norm
    unless head is None. x may have any strides with its channels contiguous."""

    BT = 64

    @staticmethod
    def forward(ctx, x, weight, head):
        x = x if x.stride(-1) == 1 else x.contiguous()
        B, T, CH = x.shape
        w = weight.float().contiguous()
        G = head or 64
        kw = dict(W=w.shape[1], BT=ShortConvFn.BT, BC=_block(G), NORM=head is not None)
        grid = (triton.cdiv(T, ShortConvFn.BT), triton.cdiv(CH, G), B)
        y = torch.empty(B, T, CH, dtype=x.dtype, device=x.device)
        _short_conv_fwd_kernel[grid](x, w, y, T, CH, G, x.stride(0), x.stride(1), **kw)
        ctx.save_for_backward(x, w)
        ctx.weight_dtype, ctx.grid, ctx.G, ctx.kw = weight.dtype, grid, G, dict(kw, ONE=head == 1)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, w = ctx.saved_tensors
        B, T, CH = x.shape
        dx = torch.empty(B, T, CH, dtype=x.dtype, device=x.device)
        dwp = torch.empty(B * ctx.grid[0], CH, w.shape[1], dtype=torch.float32, device=x.device)
        _short_conv_bwd_kernel[ctx.grid](x, w, dy.contiguous(), dx, dwp, T, CH, ctx.G, x.stride(0), x.stride(1),
                                         **ctx.kw)
        return dx, dwp.sum(0).to(ctx.weight_dtype), None


def short_conv_silu(x, weight, head=None):
    return ShortConvFn.apply(x, weight, head)  # a function, for head's default (apply takes none)


# -----------------------------------------------------------------------------
# python kernel.py: check on the GPU against the PyTorch chunked form, then benchmark


def _inputs(B, T, H, dk, dv, m, dtype, device, seed=0):
    """Model-like inputs: unit q, k, v; beta ~ 0.95, gamma ~ 0.5; random initial memories."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    rn = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    unit = lambda *s: torch.nn.functional.normalize(rn(*s), dim=-1)  # noqa: E731
    ins = [unit(B, T, H, dk), unit(B, T, H, dk), unit(B, T, H, dv), rn(B, T, H, m),
           torch.sigmoid(rn(B, T, H) + 3), torch.sigmoid(rn(B, T, H)), rn(B, H, m, dk) / dk**0.5,
           rn(B, H, m, dv) / dv**0.5]
    return [t.to(device, dtype if i < 4 else torch.float32) for i, t in enumerate(ins)]


def _model_eps():  # the model's default LayerNorm epsilons (TrellisConfig)
    import trellis

    cfg = trellis.TrellisConfig()
    return dict(phi_eps=cfg.phi_eps, f_eps=cfg.f_eps)


def _fwd_bwd(fn, ins, seed=1):
    """(o, K, V) and the gradients of a random linear function of them w.r.t. every input."""
    ins = [t.detach().clone().requires_grad_(True) for t in ins]
    outs = fn(*ins)
    g = torch.Generator(device="cpu").manual_seed(seed)
    cot = [torch.randn(o.shape, generator=g).bfloat16().to(o.device, o.dtype) for o in outs]  # same in every dtype
    grads = torch.autograd.grad(outs, ins, cot)
    return [o.detach() for o in outs] + list(grads)


CHECK_CASES = {  # label: (dtype, precision, (B, T, H, d_k, d_v, m, C, phi, f, exact))
    "fp32 tf32": (torch.float32, "tf32", (2, 300, 4, 64, 64, 64, 64, "norm_silu", "norm_silu", False)),
    "fp32 ieee": (torch.float32, "ieee", (2, 300, 4, 64, 64, 64, 64, "norm_silu", "norm_silu", False)),
    "bf16 tf32": (torch.bfloat16, "tf32", (2, 300, 4, 64, 64, 64, 64, "norm_silu", "norm_silu", False)),
    "fp32 ieee odd": (torch.float32, "ieee", (3, 77, 2, 40, 24, 48, 32, "silu", "l2_silu", False)),
    "fp32 ieee id": (torch.float32, "ieee", (1, 1000, 2, 128, 128, 128, 16, "identity", "norm_silu", False)),
    "bf16 tf32 1k": (torch.bfloat16, "tf32", (4, 1024, 8, 64, 64, 64, 64, "norm_silu", "norm_silu", False)),
    "bf16 one run": (torch.bfloat16, "tf32", (8, 300, 8, 64, 64, 64, 64, "norm_silu", "norm_silu", False)),
    "exact fp32 ieee": (torch.float32, "ieee", (2, 300, 4, 64, 64, 64, 64, "norm_silu", "norm_silu", True)),
    "exact odd": (torch.float32, "ieee", (3, 77, 2, 40, 24, 48, 32, "silu", "l2_silu", True)),
    "exact bf16 tf32": (torch.bfloat16, "tf32", (2, 300, 4, 64, 64, 64, 64, "norm_silu", "norm_silu", True)),
    "m 256 C16 ieee": (torch.float32, "ieee", (2, 300, 2, 64, 64, 256, 16, "norm_silu", "norm_silu", False)),
    "exact m 256 C16": (torch.float32, "ieee", (2, 300, 2, 64, 64, 256, 16, "norm_silu", "norm_silu", True)),
}
CHECKED = ["o", "K", "V", "dq", "dk", "dv", "dalpha", "dbeta", "dgamma", "dK0", "dV0"]


def _check_case(device, label):
    """max |x - ref| / max |ref| for each of CHECKED: the kernel against the float64 PyTorch
    chunked form (for exact, C - 1 sweeps: the per-token loop, tested) on the same inputs."""
    import trellis as tr

    dtype, prec, (B, T, H, dk, dv, m, C, phi, f, exact) = CHECK_CASES[label]
    ins, eps, sw = _inputs(B, T, H, dk, dv, m, dtype, device), _model_eps(), C - 1 if exact else 0
    ref = _fwd_bwd(lambda *a: tr.trellis_op(*a, phi=phi, f=f, chunk_size=C, sweeps=sw, impl="chunked", **eps),
                   [t.double() for t in ins])
    got = _fwd_bwd(lambda *a: trellis_op_triton(*a, phi=phi, f=f, chunk_size=C, sweeps=sw, precision=prec, **eps), ins)
    return [((x.double() - r).abs().max() / r.abs().max().clamp_min(1e-30)).item() for x, r in zip(got, ref)]


def check(device="cuda", only=None, parallel=False):
    """Prints and returns (label: worst error) every case of CHECK_CASES (or those in `only`);
    "bf16 one run" (B*H*2 = 128) is the one whose backward walks its chunks in one run (default_runs).
    parallel: each case in a process of its own (a process compiles one kernel at a time)."""
    unknown = set(only or ()) - set(CHECK_CASES)
    if unknown:
        raise ValueError(f"check: no case named {sorted(unknown)}; the cases: {list(CHECK_CASES)}")
    labels = [label for label in CHECK_CASES if only is None or label in only]
    print(f"{'case':16s} " + " ".join(f"{n:>8s}" for n in CHECKED))
    worst = {}
    pool = (concurrent.futures.ProcessPoolExecutor(len(labels), mp_context=multiprocessing.get_context("spawn"))
            if parallel else None)
    with pool or contextlib.nullcontext():  # map: results in the cases' order
        for label, errs in zip(labels, (pool.map if pool else map)(_check_case, [device] * len(labels), labels)):
            print(f"{label:16s} " + " ".join(f"{e:8.1e}" for e in errs), flush=True)
            worst[label] = max(errs) if all(math.isfinite(e) for e in errs) else math.nan
    return worst


def _peak_mib(fn):
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def bench(device="cuda", Ts=(1024, 4096, 16384), tokens=32768, H=8, d=64, m=64, C=64, against=None, rounds=3):
    """fwd and fwd+bwd ms, tokens/s (fwd+bwd) and peak memory above the inputs, bf16 inputs: the
    best of `rounds` interleaved rounds of do_bench medians. against: paths of other copies of
    kernel.py (another commit's, or one with a piece of machinery replaced), timed in the same
    rounds (rows marked *1, *2, ...), for a same-run A/B."""
    import importlib.util

    import torch.nn.functional as F
    from triton.testing import do_bench

    median_ms = lambda fn: do_bench(fn, warmup=25, rep=200, return_mode="median")  # noqa: E731
    if not all(isinstance(T, int) and 1 <= T <= tokens for T in Ts):
        raise ValueError(f"bench: every T must be an int in [1, tokens = {tokens}], got {list(Ts)}")
    ops = {"": trellis_op_triton}
    for i, path in enumerate(against or (), 1):
        spec = importlib.util.spec_from_file_location(f"kernel_against_{i}", path)
        other = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(other)
        ops[f"*{i}"] = other.trellis_op_triton
        print(f"*{i}: {path}")
    eps = dict(_model_eps(), phi="norm_silu", f="norm_silu")
    rows = []
    for T in Ts:
        B = tokens // T
        ins = [t.requires_grad_(True) for t in _inputs(B, T, H, d, d, m, torch.bfloat16, device)]
        impls = {}  # name: (leaves, function of the leaves returning o)
        # the exact rule's sweeps take longer at these inputs' gamma ~ 0.5 than at the model's (<= 0.1)
        for name, sw in (("kernel", 0), ("kernel exact", C - 1)):
            for mark, op in ops.items():
                impls[name + mark] = (ins, (lambda op, sw: lambda *a: op(*a, chunk_size=C, sweeps=sw,
                                                                         precision="tf32", **eps)[0])(op, sw))
        sdpa = [torch.randn(B, H, T, d, device=device, dtype=torch.bfloat16, requires_grad=True) for _ in range(3)]
        impls["sdpa causal"] = (sdpa, lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True))
        timed = {}
        for _ in range(rounds):
            for name, (leaves, fn) in impls.items():
                fwd = (lambda fn, leaves: lambda: fn(*leaves))(fn, leaves)
                o0 = fwd().detach()
                both = (lambda fwd, leaves, o0: lambda: torch.autograd.grad(fwd(), leaves, o0))(fwd, leaves, o0)
                with torch.no_grad():
                    t_f = median_ms(fwd)
                t = timed.setdefault(name, [math.inf, math.inf, both])
                t[:2] = min(t[0], t_f), min(t[1], median_ms(both))
        for name, (t_f, t_b, both) in timed.items():
            mem = _peak_mib(both)
            rows.append((T, B, name, t_f, t_b, tokens / t_b * 1e3, mem))
            print(f"T={T:6d} B={B:3d} {name:16s} fwd {t_f:9.3f} ms  fwd+bwd {t_b:9.3f} ms  "
                  f"{tokens / t_b * 1e3 / 1e6:8.2f} Mtok/s  peak {mem:8.0f} MiB", flush=True)
    return rows


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description="check and benchmark the Trellis kernels on a GPU")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--skip-check", action="store_true")
    ap.add_argument("--T", default="1024,4096,16384", help="sequence lengths, B*T = 32768 (default: 1024,4096,16384)")
    ap.add_argument("--against", metavar="PATH", nargs="+", help="other kernel.py files to time in the same rounds")
    a = ap.parse_args()
    try:
        lengths = [int(t) for t in a.T.split(",") if t]
    except ValueError:
        lengths = [0]
    if not lengths or not all(1 <= t <= 32768 for t in lengths):
        ap.exit(2, f"kernel.py: --T takes comma-separated sequence lengths in [1, 32768] such as 1024,4096, "
                   f"got {a.T!r}\n")
    for path in a.against or ():
        if not os.path.isfile(path):
            ap.exit(2, f"kernel.py: --against {path!r} is not a file; give the paths of other kernel.py files, "
                       f"e.g. git show 3748fdd:kernel.py > /tmp/kernel_old.py\n")
    if not torch.cuda.is_available():
        ap.exit(2, f"kernel.py: --device {a.device} needs a CUDA GPU, and torch sees none; the tests run the "
                   "kernels on the CPU (README)\n")
    props = torch.cuda.get_device_properties(a.device)
    print(f"{props.name}, torch {torch.__version__}, triton {triton.__version__}")
    if not a.skip_check:
        check(a.device, parallel=True)
    bench(a.device, Ts=lengths, against=a.against)
