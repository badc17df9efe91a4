"""Triton kernels for the chunked two-pass Trellis operator, forward and backward.

Same signature and semantics as trellis.trellis_op(..., impl="chunked") with sweeps = 0
(the paper's chunk-start rule); trellis.py dispatches here on CUDA.

Design (see NOTES.md, "kernel"): one program per (batch, head) walks the chunks in order
and does both passes per chunk, so the key pass's read Yhat feeds f and the value pass
without leaving the chip:

    key pass:   Zk = k Kᵀ, Uk = γ code(Zk, α), Yhat = e^b q Kᵀ - ((q kᵀ) ⊙ Γ) Uk
    between:    R = f(Yhat)
    value pass: Zv = v Vᵀ, Uv = γ code(Zv, α), O = e^b R V - ((R Uvᵀ) ⊙ Γ) v
    both:       S <- e^{b_C} S - (U ⊙ e^{b_C - b})ᵀ W

The forward stores each chunk's start states (fp32); the backward walks the chunks in
reverse carrying dK, dV, recomputes the chunk's forward from its start states and applies
the hand-derived gradients (TRELLIS.md section 7), including the path through z = W Sᵀ.

    python kernel.py                  # GPU: check against PyTorch, then the benchmark table
    python kernel.py --device cpu     # CPU: the PyTorch loop vs chunked table
"""

import argparse
import math
import os
import time

import torch
import triton
import triton.language as tl

import trellis as tr

SUPPORTED_PHI = ("identity", "silu", "norm_silu")
SUPPORTED_F = ("norm_silu", "l2_silu")
_PHI_ID = {name: i for i, name in enumerate(SUPPORTED_PHI)}
_F_ID = {name: i for i, name in enumerate(SUPPORTED_F)}

# -----------------------------------------------------------------------------
# row-wise pieces (each row is one token's m slots; `mm` masks padded slots)


@triton.jit
def _silu_parts(z):
    """silu(z), silu'(z), silu''(z)."""
    sg = tl.sigmoid(z)
    return z * sg, sg * (1 + z * (1 - sg)), sg * (1 - sg) * (2 + z * (1 - 2 * sg))


@triton.jit
def _norm_stats(s, mm, M: tl.constexpr, EPS: tl.constexpr):
    """LayerNorm over the real slots: (y, sd) with y zero on padded slots."""
    s = tl.where(mm, s, 0.0)
    mu = tl.sum(s, 1) / M
    c = tl.where(mm, s - mu[:, None], 0.0)
    sd = tl.sqrt(tl.sum(c * c, 1) / M + EPS)
    return c / sd[:, None], sd


@triton.jit
def _code_fwd(z, a, mm, M: tl.constexpr, PHI: tl.constexpr, EPS: tl.constexpr):
    """u = J_phi(z)ᵀ (phi(z) - a)."""
    if PHI == 0:
        u = z - a
    elif PHI == 1:
        s, s1, _ = _silu_parts(z)
        u = s1 * (s - a)
    else:
        s, s1, _ = _silu_parts(z)
        y, sd = _norm_stats(s, mm, M, EPS)
        e = tl.where(mm, y - a, 0.0)
        g = e - (tl.sum(e, 1) / M)[:, None] - y * (tl.sum(e * y, 1) / M)[:, None]
        u = s1 * g / sd[:, None]
    return tl.where(mm, u, 0.0)


@triton.jit
def _code_bwd(z, a, du, mm, M: tl.constexpr, PHI: tl.constexpr, EPS: tl.constexpr):
    """(u, dz, da) for the vector-Jacobian product of u = code(z, a) with du."""
    if PHI == 0:
        u = z - a
        dz = du
        da = -du
    elif PHI == 1:
        s, s1, s2 = _silu_parts(z)
        u = s1 * (s - a)
        dz = du * (s2 * (s - a) + s1 * s1)
        da = -du * s1
    else:
        s, s1, s2 = _silu_parts(z)
        y, sd = _norm_stats(s, mm, M, EPS)
        rsd = 1.0 / sd[:, None]
        e = tl.where(mm, y - a, 0.0)
        ey = (tl.sum(e * y, 1) / M)[:, None]
        h = (e - (tl.sum(e, 1) / M)[:, None] - y * ey) * rsd  # u = silu'(z) h
        u = s1 * h
        p = tl.where(mm, du * s1, 0.0)  # d h
        py = (tl.sum(p * y, 1) / M)[:, None]
        w = tl.where(mm, (1 - ey) * p - py * (y + e), 0.0)
        jw = (w - (tl.sum(w, 1) / M)[:, None] - y * (tl.sum(w * y, 1) / M)[:, None]) * rsd  # J_y w
        ds = (jw - (tl.sum(p * h, 1) / M)[:, None] * y) * rsd
        dz = du * h * s2 + ds * s1
        da = -(p - (tl.sum(p, 1) / M)[:, None] - y * py) * rsd  # -J_y p
    return tl.where(mm, u, 0.0), tl.where(mm, dz, 0.0), tl.where(mm, da, 0.0)


@triton.jit
def _f_fwd(yh, mm, M: tl.constexpr, F: tl.constexpr, EPS: tl.constexpr):
    """r = f(yhat): LayerNorm(SiLU) (F = 0) or SiLU / ||SiLU|| (F = 1)."""
    s, _, _ = _silu_parts(yh)
    if F == 0:
        r, _ = _norm_stats(s, mm, M, EPS)
    else:
        s = tl.where(mm, s, 0.0)
        r = s / tl.sqrt(tl.sum(s * s, 1) + 1e-6)[:, None]
    return r


@triton.jit
def _f_bwd(yh, dr, mm, M: tl.constexpr, F: tl.constexpr, EPS: tl.constexpr):
    """d yhat from d r."""
    s, s1, _ = _silu_parts(yh)
    dr = tl.where(mm, dr, 0.0)
    if F == 0:
        y, sd = _norm_stats(s, mm, M, EPS)
        ds = (dr - (tl.sum(dr, 1) / M)[:, None] - y * (tl.sum(dr * y, 1) / M)[:, None]) / sd[:, None]
    else:
        s = tl.where(mm, s, 0.0)
        n = tl.sqrt(tl.sum(s * s, 1) + 1e-6)[:, None]
        r = s / n
        ds = (dr - r * tl.sum(r * dr, 1)[:, None]) / n
    return tl.where(mm, ds * s1, 0.0)


# -----------------------------------------------------------------------------
# chunk loads shared by both kernels


@triton.jit
def _load_rows(ptr, t, tm, offs, real: tl.constexpr, s_t):
    """[C, block] tile of rows t (time) of one (batch, head), as fp32, zero where masked."""
    mask = tm[:, None] & (offs[None, :] < real)
    return tl.load(ptr + t[:, None] * s_t + offs[None, :], mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _chunk_decays(lb, offs_c, C: tl.constexpr):
    """b (cumulative log beta), Gamma (lower triangle, exp(b_i - b_j)), e^b, b_C, e^{b_C - b}."""
    b = tl.cumsum(lb, 0)
    tri = offs_c[:, None] >= offs_c[None, :]
    gam = tl.exp(tl.where(tri, b[:, None] - b[None, :], float("-inf")))  # only exponents <= 0
    b_c = tl.sum(tl.where(offs_c == C - 1, b, 0.0), 0)  # padded rows have log beta = 0
    return b, gam, tl.exp(b), b_c, tl.exp(b_c - b)


# -----------------------------------------------------------------------------
# forward


@triton.jit
def _fwd_kernel(q, k, v, al, lb, gm, K0, V0, o, KT, VT, SK, SV,
                T, H, NC,
                DK: tl.constexpr, DV: tl.constexpr, M: tl.constexpr,
                BDK: tl.constexpr, BDV: tl.constexpr, BM: tl.constexpr, C: tl.constexpr,
                PHI: tl.constexpr, F: tl.constexpr, EPS: tl.constexpr, PREC: tl.constexpr):
    pid = tl.program_id(0)
    bi, h = pid // H, pid % H
    s_b, s_t = T * H, H  # contiguous [B,T,H,*]: row (b, t, h) starts at (b T H + t H + h) * width
    gb = bi * s_b + h  # gates [B,T,H]: (b, t, h) at gb + t * s_t
    oc, odk, odv, om = tl.arange(0, C), tl.arange(0, BDK), tl.arange(0, BDV), tl.arange(0, BM)
    mm = (om < M)[None, :]
    kmask = (om[:, None] < M) & (odk[None, :] < DK)
    vmask = (om[:, None] < M) & (odv[None, :] < DV)
    loc_k = om[:, None] * DK + odk[None, :]  # [BM, BDK] offsets inside one m x d_k state
    loc_v = om[:, None] * DV + odv[None, :]
    st_k, st_v = pid * M * DK + loc_k, pid * M * DV + loc_v  # in a [B,H,m,d] state
    Ks = tl.load(K0 + st_k, mask=kmask, other=0.0)
    Vs = tl.load(V0 + st_v, mask=vmask, other=0.0)
    qb, kb = q + bi * s_b * DK + h * DK, k + bi * s_b * DK + h * DK  # row t at + t * s_t * d
    vb, ob = v + bi * s_b * DV + h * DV, o + bi * s_b * DV + h * DV
    ab = al + bi * s_b * M + h * M
    for ci in range(0, NC):
        tl.store(SK + (pid * NC + ci) * M * DK + loc_k, Ks, mask=kmask)  # [B,H,NC,m,d_k]
        tl.store(SV + (pid * NC + ci) * M * DV + loc_v, Vs, mask=vmask)
        t = ci * C + oc
        tm = t < T
        qq = _load_rows(qb, t, tm, odk, DK, s_t * DK)
        kk = _load_rows(kb, t, tm, odk, DK, s_t * DK)
        vv = _load_rows(vb, t, tm, odv, DV, s_t * DV)
        aa = _load_rows(ab, t, tm, om, M, s_t * M)
        lbb = tl.load(lb + gb + t * s_t, mask=tm, other=0.0)
        gg = tl.load(gm + gb + t * s_t, mask=tm, other=0.0)
        b, gam, eb, b_c, dec = _chunk_decays(lbb, oc, C)
        # key pass: write with k, read with q
        Uk = gg[:, None] * _code_fwd(tl.dot(kk, tl.trans(Ks), input_precision=PREC), aa, mm, M, PHI, EPS)
        Pk = tl.dot(qq, tl.trans(kk), input_precision=PREC) * gam
        Yk = eb[:, None] * tl.dot(qq, tl.trans(Ks), input_precision=PREC) - tl.dot(Pk, Uk, input_precision=PREC)
        R = _f_fwd(Yk, mm, M, F, EPS)
        # value pass: write with v, read with R
        Uv = gg[:, None] * _code_fwd(tl.dot(vv, tl.trans(Vs), input_precision=PREC), aa, mm, M, PHI, EPS)
        Pv = tl.dot(R, tl.trans(Uv), input_precision=PREC) * gam
        O = eb[:, None] * tl.dot(R, Vs, input_precision=PREC) - tl.dot(Pv, vv, input_precision=PREC)
        tl.store(ob + t[:, None] * s_t * DV + odv[None, :], O.to(o.dtype.element_ty),
                 mask=tm[:, None] & (odv[None, :] < DV))
        # chunk-end states
        Ks = tl.exp(b_c) * Ks - tl.dot(tl.trans(Uk * dec[:, None]), kk, input_precision=PREC)
        Vs = tl.exp(b_c) * Vs - tl.dot(tl.trans(Uv * dec[:, None]), vv, input_precision=PREC)
    tl.store(KT + st_k, Ks, mask=kmask)
    tl.store(VT + st_v, Vs, mask=vmask)


# -----------------------------------------------------------------------------
# backward


@triton.jit
def _bwd_value_kernel(q, k, v, al, lb, gm, SK, SV, do, dVT, dYk_out, dv, dal, dlb, dgm, dV0,
                      T, H, NC,
                      DK: tl.constexpr, DV: tl.constexpr, M: tl.constexpr,
                      BDK: tl.constexpr, BDV: tl.constexpr, BM: tl.constexpr, C: tl.constexpr,
                      PHI: tl.constexpr, F: tl.constexpr, EPS: tl.constexpr, PREC: tl.constexpr):
    """Value pass, chunks in reverse carrying dV; writes d yhat for the key-pass kernel."""
    pid = tl.program_id(0)
    bi, h = pid // H, pid % H
    s_b, s_t = T * H, H
    gb = bi * s_b + h
    oc, odk, odv, om = tl.arange(0, C), tl.arange(0, BDK), tl.arange(0, BDV), tl.arange(0, BM)
    mm = (om < M)[None, :]
    kmask = (om[:, None] < M) & (odk[None, :] < DK)
    vmask = (om[:, None] < M) & (odv[None, :] < DV)
    loc_k = om[:, None] * DK + odk[None, :]
    loc_v = om[:, None] * DV + odv[None, :]
    dVs = tl.load(dVT + pid * M * DV + loc_v, mask=vmask, other=0.0)  # dL/d(V at the chunk's end)
    row_k, row_v, row_m = bi * s_b * DK + h * DK, bi * s_b * DV + h * DV, bi * s_b * M + h * M
    for cj in range(0, NC):
        ci = NC - 1 - cj
        t = ci * C + oc
        tm = t < T
        Ks = tl.load(SK + (pid * NC + ci) * M * DK + loc_k, mask=kmask, other=0.0)
        Vs = tl.load(SV + (pid * NC + ci) * M * DV + loc_v, mask=vmask, other=0.0)
        qq = _load_rows(q + row_k, t, tm, odk, DK, s_t * DK)
        kk = _load_rows(k + row_k, t, tm, odk, DK, s_t * DK)
        vv = _load_rows(v + row_v, t, tm, odv, DV, s_t * DV)
        aa = _load_rows(al + row_m, t, tm, om, M, s_t * M)
        dO = _load_rows(do + row_v, t, tm, odv, DV, s_t * DV)
        lbb = tl.load(lb + gb + t * s_t, mask=tm, other=0.0)
        gg = tl.load(gm + gb + t * s_t, mask=tm, other=0.0)
        b, gam, eb, b_c, dec = _chunk_decays(lbb, oc, C)

        # recompute the key pass's read and R = f(yhat), and the value pass's codes
        Uk = gg[:, None] * _code_fwd(tl.dot(kk, tl.trans(Ks), input_precision=PREC), aa, mm, M, PHI, EPS)
        Pk = tl.dot(qq, tl.trans(kk), input_precision=PREC) * gam
        Yk = eb[:, None] * tl.dot(qq, tl.trans(Ks), input_precision=PREC) - tl.dot(Pk, Uk, input_precision=PREC)
        R = _f_fwd(Yk, mm, M, F, EPS)
        Zv = tl.dot(vv, tl.trans(Vs), input_precision=PREC)
        Uv = gg[:, None] * _code_fwd(Zv, aa, mm, M, PHI, EPS)
        Pv = tl.dot(R, tl.trans(Uv), input_precision=PREC)

        # O = e^b R V - ((R Uvᵀ) ⊙ Γ) v,   V_end = e^{b_C} V - (Uv ⊙ dec)ᵀ v
        dPv = -tl.dot(dO, tl.trans(vv), input_precision=PREC) * gam  # dL/d(R Uvᵀ)
        dR = eb[:, None] * tl.dot(dO, tl.trans(Vs), input_precision=PREC) + tl.dot(dPv, Uv, input_precision=PREC)
        vdS = tl.dot(vv, tl.trans(dVs), input_precision=PREC)  # v dV_endᵀ
        dUv = tl.dot(tl.trans(dPv), R, input_precision=PREC) - dec[:, None] * vdS
        dvv = -tl.dot(tl.trans(Pv * gam), dO, input_precision=PREC) \
            - tl.dot(Uv * dec[:, None], dVs, input_precision=PREC)
        uv, dZv, dav = _code_bwd(Zv, aa, gg[:, None] * dUv, mm, M, PHI, EPS)
        dvv += tl.dot(dZv, Vs, input_precision=PREC)  # through z = v Vᵀ
        G = dPv * Pv  # dΓ ⊙ Γ
        gd = -tl.sum(Uv * vdS, 1) * dec
        RS = tl.dot(R, Vs, input_precision=PREC)
        db = tl.sum(dO * RS, 1) * eb + tl.sum(G, 1) - tl.sum(G, 0) - gd
        db_c = tl.sum(tl.sum(dVs * Vs, 1), 0) * tl.exp(b_c) + tl.sum(gd, 0)
        db += tl.where(oc == C - 1, db_c, 0.0)
        dVs = tl.exp(b_c) * dVs + tl.dot(tl.trans(R * eb[:, None]), dO, input_precision=PREC) \
            + tl.dot(tl.trans(dZv), vv, input_precision=PREC)

        rows_m = row_m + t[:, None] * s_t * M + om[None, :]
        tl.store(dYk_out + rows_m, _f_bwd(Yk, dR, mm, M, F, EPS), mask=tm[:, None] & mm)
        tl.store(dv + row_v + t[:, None] * s_t * DV + odv[None, :], dvv, mask=tm[:, None] & (odv[None, :] < DV))
        tl.store(dal + rows_m, dav, mask=tm[:, None] & mm)
        tl.store(dlb + gb + t * s_t, tl.sum(db, 0) - tl.cumsum(db, 0) + db, mask=tm)  # sum over i >= j
        tl.store(dgm + gb + t * s_t, tl.sum(dUv * uv, 1), mask=tm)
    tl.store(dV0 + pid * M * DV + loc_v, dVs, mask=vmask)


@triton.jit
def _bwd_key_kernel(q, k, al, lb, gm, SK, dYk_in, dKT, dq, dk, dal, dlb, dgm, dK0,
                    T, H, NC,
                    DK: tl.constexpr, M: tl.constexpr, BDK: tl.constexpr, BM: tl.constexpr, C: tl.constexpr,
                    PHI: tl.constexpr, EPS: tl.constexpr, PREC: tl.constexpr):
    """Key pass, chunks in reverse carrying dK; adds its share to dalpha, dlog beta, dgamma."""
    pid = tl.program_id(0)
    bi, h = pid // H, pid % H
    s_b, s_t = T * H, H
    gb = bi * s_b + h
    oc, odk, om = tl.arange(0, C), tl.arange(0, BDK), tl.arange(0, BM)
    mm = (om < M)[None, :]
    kmask = (om[:, None] < M) & (odk[None, :] < DK)
    loc_k = om[:, None] * DK + odk[None, :]
    dKs = tl.load(dKT + pid * M * DK + loc_k, mask=kmask, other=0.0)
    row_k, row_m = bi * s_b * DK + h * DK, bi * s_b * M + h * M
    for cj in range(0, NC):
        ci = NC - 1 - cj
        t = ci * C + oc
        tm = t < T
        Ks = tl.load(SK + (pid * NC + ci) * M * DK + loc_k, mask=kmask, other=0.0)
        qq = _load_rows(q + row_k, t, tm, odk, DK, s_t * DK)
        kk = _load_rows(k + row_k, t, tm, odk, DK, s_t * DK)
        aa = _load_rows(al + row_m, t, tm, om, M, s_t * M)
        dYk = _load_rows(dYk_in + row_m, t, tm, om, M, s_t * M)
        lbb = tl.load(lb + gb + t * s_t, mask=tm, other=0.0)
        gg = tl.load(gm + gb + t * s_t, mask=tm, other=0.0)
        b, gam, eb, b_c, dec = _chunk_decays(lbb, oc, C)

        Zk = tl.dot(kk, tl.trans(Ks), input_precision=PREC)
        Uk = gg[:, None] * _code_fwd(Zk, aa, mm, M, PHI, EPS)
        Pk = tl.dot(qq, tl.trans(kk), input_precision=PREC)

        # Yhat = e^b q Kᵀ - ((q kᵀ) ⊙ Γ) Uk,   K_end = e^{b_C} K - (Uk ⊙ dec)ᵀ k
        dPk = -tl.dot(dYk, tl.trans(Uk), input_precision=PREC) * gam  # dL/d(q kᵀ)
        dqq = eb[:, None] * tl.dot(dYk, Ks, input_precision=PREC) + tl.dot(dPk, kk, input_precision=PREC)
        kdS = tl.dot(kk, tl.trans(dKs), input_precision=PREC)  # k dK_endᵀ
        dUk = -tl.dot(tl.trans(Pk * gam), dYk, input_precision=PREC) - dec[:, None] * kdS
        dkk = tl.dot(tl.trans(dPk), qq, input_precision=PREC) - tl.dot(Uk * dec[:, None], dKs, input_precision=PREC)
        uk, dZk, dak = _code_bwd(Zk, aa, gg[:, None] * dUk, mm, M, PHI, EPS)
        dkk += tl.dot(dZk, Ks, input_precision=PREC)  # through z = k Kᵀ
        G = dPk * Pk
        gd = -tl.sum(Uk * kdS, 1) * dec
        QS = tl.dot(qq, tl.trans(Ks), input_precision=PREC)
        db = tl.sum(dYk * QS, 1) * eb + tl.sum(G, 1) - tl.sum(G, 0) - gd
        db_c = tl.sum(tl.sum(dKs * Ks, 1), 0) * tl.exp(b_c) + tl.sum(gd, 0)
        db += tl.where(oc == C - 1, db_c, 0.0)
        dKs = tl.exp(b_c) * dKs + tl.dot(tl.trans(dYk * eb[:, None]), qq, input_precision=PREC) \
            + tl.dot(tl.trans(dZk), kk, input_precision=PREC)

        rows_m = row_m + t[:, None] * s_t * M + om[None, :]
        tl.store(dq + row_k + t[:, None] * s_t * DK + odk[None, :], dqq, mask=tm[:, None] & (odk[None, :] < DK))
        tl.store(dk + row_k + t[:, None] * s_t * DK + odk[None, :], dkk, mask=tm[:, None] & (odk[None, :] < DK))
        mrow = tm[:, None] & mm
        tl.store(dal + rows_m, tl.load(dal + rows_m, mask=mrow, other=0.0) + dak, mask=mrow)
        dlbb = tl.sum(db, 0) - tl.cumsum(db, 0) + db
        tl.store(dlb + gb + t * s_t, tl.load(dlb + gb + t * s_t, mask=tm, other=0.0) + dlbb, mask=tm)
        dgg = tl.sum(dUk * uk, 1)
        tl.store(dgm + gb + t * s_t, tl.load(dgm + gb + t * s_t, mask=tm, other=0.0) + dgg, mask=tm)
    tl.store(dK0 + pid * M * DK + loc_k, dKs, mask=kmask)


# -----------------------------------------------------------------------------
# autograd wrapper


def _block(n):
    return max(16, triton.next_power_of_2(n))


class TrellisChunkFn(torch.autograd.Function):
    """(q, k, v, alpha, log_beta, gamma, K0, V0) -> (o, K_T, V_T); q..alpha [B,T,H,*] contiguous,
    log_beta, gamma [B,T,H] fp32, K0, V0 [B,H,m,d] fp32."""

    @staticmethod
    def forward(ctx, q, k, v, alpha, log_beta, gamma, K0, V0, phi, f, C, prec, num_warps):
        B, T, H, DK = q.shape
        DV, M = v.shape[-1], alpha.shape[-1]
        NC = triton.cdiv(T, C)
        o = torch.empty_like(v)
        KT, VT = torch.empty_like(K0), torch.empty_like(V0)
        SK = K0.new_empty(B, H, NC, M, DK)  # chunk-start states, kept for the backward
        SV = V0.new_empty(B, H, NC, M, DV)
        meta = dict(DK=DK, DV=DV, M=M, BDK=_block(DK), BDV=_block(DV), BM=_block(M), C=C,
                    PHI=_PHI_ID[phi], F=_F_ID[f], EPS=tr.NORM_EPS, PREC=prec, num_warps=num_warps,
                    num_stages=1)  # deeper software pipelining overflows shared memory (NOTES.md)
        _fwd_kernel[(B * H,)](q, k, v, alpha, log_beta, gamma, K0, V0, o, KT, VT, SK, SV,
                              T, H, NC, **meta)
        ctx.save_for_backward(q, k, v, alpha, log_beta, gamma, SK, SV)
        ctx.meta, ctx.NC = meta, NC
        return o, KT, VT

    @staticmethod
    def backward(ctx, do, dKT, dVT):
        q, k, v, alpha, log_beta, gamma, SK, SV = ctx.saved_tensors
        B, T, H, DK = q.shape
        M, DV = alpha.shape[-1], v.shape[-1]
        do = do.contiguous()
        dKT = SK.new_zeros(B, H, M, DK) if dKT is None else dKT.float().contiguous()
        dVT = SV.new_zeros(B, H, M, DV) if dVT is None else dVT.float().contiguous()
        f32 = dict(dtype=torch.float32, device=q.device)
        dq, dk = torch.empty(q.shape, **f32), torch.empty(k.shape, **f32)
        dv, dal = torch.empty(v.shape, **f32), torch.empty(alpha.shape, **f32)
        dlb, dgm = torch.empty_like(log_beta), torch.empty_like(gamma)
        dK0, dV0 = torch.empty_like(dKT), torch.empty_like(dVT)
        dYk = torch.empty(alpha.shape, **f32)  # d yhat, from the value pass to the key pass
        meta = ctx.meta
        _bwd_value_kernel[(B * H,)](q, k, v, alpha, log_beta, gamma, SK, SV, do, dVT, dYk, dv, dal, dlb, dgm, dV0,
                                    T, H, ctx.NC, **meta)
        key_meta = {n: meta[n] for n in ("DK", "M", "BDK", "BM", "C", "PHI", "EPS", "PREC", "num_warps", "num_stages")}
        _bwd_key_kernel[(B * H,)](q, k, alpha, log_beta, gamma, SK, dYk, dKT, dq, dk, dal, dlb, dgm, dK0,
                                  T, H, ctx.NC, **key_meta)
        return (dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dal.to(alpha.dtype), dlb, dgm, dK0, dV0,
                None, None, None, None, None)


def unsupported(q, v, alpha, phi, f, chunk_size, sweeps):
    """Why the kernel cannot run this call (a sentence), or None when it can."""
    if phi not in SUPPORTED_PHI:
        return f"phi={phi!r} is not supported (supported: {SUPPORTED_PHI})"
    if f not in SUPPORTED_F:
        return f"f={f!r} is not supported (supported: {SUPPORTED_F})"
    if sweeps != 0:
        return f"sweeps={sweeps} is not supported (only 0, the chunk-start rule); use impl='chunked' for sweeps"
    if chunk_size not in (16, 32, 64):
        return f"chunk_size must be 16, 32 or 64, got {chunk_size}"
    for name, n in dict(d_k=q.shape[-1], d_v=v.shape[-1], m=alpha.shape[-1]).items():
        if n > 128:
            return f"{name}={n} is not supported (at most 128)"
    if q.dtype == torch.float64:
        return "float64 is not supported (fp32, bf16, fp16); use impl='chunked'"
    if not q.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        return "tensors must be on a CUDA device (or set TRITON_INTERPRET=1 to interpret on the CPU)"
    return None


def trellis_op_triton(q, k, v, alpha, beta, gamma, K0=None, V0=None, *, phi="norm_silu", f="norm_silu",
                      chunk_size=64, sweeps=0, precision="tf32", num_warps=4):
    """The Triton form of trellis.trellis_op (chunk-start rule). Inputs as there; validate
    with trellis._check_operator_args first (trellis_op does). precision: "tf32" or "ieee"
    for the fp32 dots."""
    why = unsupported(q, v, alpha, phi, f, chunk_size, sweeps)
    if why:
        raise ValueError("kernel: " + why)
    B, T, H, dk = q.shape
    m, dv = alpha.shape[-1], v.shape[-1]
    dt = q.dtype
    q, k, v, alpha = (t.to(dt).contiguous() for t in (q, k, v, alpha))
    log_beta = torch.log(beta.float().clamp_min(torch.finfo(torch.float32).tiny)).contiguous()
    gamma = gamma.float().contiguous()
    K0 = q.new_zeros(B, H, m, dk, dtype=torch.float32) if K0 is None else K0.float().contiguous()
    V0 = q.new_zeros(B, H, m, dv, dtype=torch.float32) if V0 is None else V0.float().contiguous()
    o, KT, VT = TrellisChunkFn.apply(q, k, v, alpha, log_beta, gamma, K0, V0, phi, f, chunk_size,
                                     precision, num_warps)
    return o.to(v.dtype), KT, VT


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


def _fwd_bwd(fn, ins, seed=1):
    """(o, K, V) and the gradients of a random linear function of them w.r.t. every input."""
    ins = [t.detach().clone().requires_grad_(True) for t in ins]
    outs = fn(*ins)
    g = torch.Generator(device="cpu").manual_seed(seed)
    cot = [torch.randn(o.shape, generator=g).bfloat16().to(o.device, o.dtype) for o in outs]  # same in every dtype
    grads = torch.autograd.grad(outs, ins, cot)
    return [o.detach() for o in outs] + list(grads)


def check(device="cuda"):
    """Max relative error (max |x - ref| / max |ref|) per tensor, kernel vs the float64
    PyTorch chunked form on the same inputs."""
    names = ["o", "K", "V", "dq", "dk", "dv", "dalpha", "dbeta", "dgamma", "dK0", "dV0"]
    cases = [  # (label, dtype, precision, shape B, T, H, dk, dv, m, C, phi, f)
        ("fp32 tf32", torch.float32, "tf32", (2, 300, 4, 64, 64, 64, 64, "norm_silu", "norm_silu")),
        ("fp32 ieee", torch.float32, "ieee", (2, 300, 4, 64, 64, 64, 64, "norm_silu", "norm_silu")),
        ("bf16 tf32", torch.bfloat16, "tf32", (2, 300, 4, 64, 64, 64, 64, "norm_silu", "norm_silu")),
        ("fp32 ieee odd", torch.float32, "ieee", (3, 77, 2, 40, 24, 48, 32, "silu", "l2_silu")),
        ("fp32 ieee id", torch.float32, "ieee", (1, 1000, 2, 128, 128, 128, 16, "identity", "norm_silu")),
        ("bf16 tf32 1k", torch.bfloat16, "tf32", (4, 1024, 8, 64, 64, 64, 64, "norm_silu", "norm_silu")),
    ]
    print(f"{'case':14s} " + " ".join(f"{n:>8s}" for n in names))
    worst = {}
    for label, dtype, prec, (B, T, H, dk, dv, m, C, phi, f) in cases:
        ins = _inputs(B, T, H, dk, dv, m, dtype, device)
        ref = _fwd_bwd(lambda *a: tr.trellis_op(*a, phi=phi, f=f, chunk_size=C, impl="chunked"),
                       [t.double() for t in ins])
        got = _fwd_bwd(lambda *a: trellis_op_triton(*a, phi=phi, f=f, chunk_size=C, precision=prec), ins)
        errs = [((x.double() - r).abs().max() / r.abs().max().clamp_min(1e-30)).item() for x, r in zip(got, ref)]
        ok = all(math.isfinite(e) for e in errs)
        worst[label] = max(errs) if ok else float("nan")
        print(f"{label:14s} " + " ".join(f"{e:8.1e}" for e in errs), flush=True)
    return worst


def _time(fn, reps_ms=200):
    from triton.testing import do_bench

    return do_bench(fn, warmup=25, rep=reps_ms, return_mode="median")


def _peak_mib(fn):
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def bench(device="cuda", Ts=(1024, 4096, 16384), tokens=32768, H=8, d=64, m=64, C=64, num_warps=(4, 8)):
    """fwd and fwd+bwd ms (median), tokens/s (fwd+bwd) and peak memory, bf16 inputs."""
    import torch.nn.functional as F

    rows = []
    for T in Ts:
        B = tokens // T
        ins = _inputs(B, T, H, d, d, m, torch.bfloat16, device)
        leaves = [t.requires_grad_(True) for t in ins]
        impls = {f"kernel (w{w})": (lambda w: lambda *a: trellis_op_triton(*a, chunk_size=C, num_warps=w))(w)
                 for w in num_warps}
        impls["pytorch chunked"] = lambda *a: tr.trellis_op(*a, chunk_size=C, impl="chunked")
        if T == 1024:
            impls["per-token loop"] = lambda *a: tr.trellis_op(*a, chunk_size=1, impl="loop")
        qs, ks, vs = (torch.randn(B, H, T, d, device=device, dtype=torch.bfloat16, requires_grad=True)
                      for _ in range(3))
        for name, fn in list(impls.items()) + [("sdpa causal", None)]:
            if fn is None:
                fwd = lambda: F.scaled_dot_product_attention(qs, ks, vs, is_causal=True)  # noqa: E731
                o0 = fwd()
                both = lambda: torch.autograd.grad(fwd(), (qs, ks, vs), o0)  # noqa: E731
            else:
                fwd = (lambda fn: lambda: fn(*leaves))(fn)
                o0 = fwd()[0]
                both = (lambda fwd, o0: lambda: torch.autograd.grad(fwd()[0], leaves, o0))(fwd, o0)
            slow = name in ("pytorch chunked", "per-token loop")
            with torch.no_grad():
                t_f = _time(lambda: fwd(), 50 if slow else 200)
            t_b = _time(both, 50 if slow else 200)
            mem = _peak_mib(both)
            rows.append((T, B, name, t_f, t_b, tokens / t_b * 1e3, mem))
            print(f"T={T:6d} B={B:3d} {name:16s} fwd {t_f:9.3f} ms  fwd+bwd {t_b:9.3f} ms  "
                  f"{tokens / t_b * 1e3 / 1e6:8.2f} Mtok/s  peak {mem:8.0f} MiB", flush=True)
    return rows


def cpu_table(B=1, T=2048, H=4, d=64, m=64, C=64):
    """The PyTorch forms on the CPU (float32): per-token loop vs chunked, fwd and fwd+bwd."""
    ins = _inputs(B, T, H, d, d, m, torch.float32, "cpu")[:6]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; B={B} T={T} H={H} d={d} m={m}")
    for name, kw in [("loop, exact (C=1)", dict(impl="loop", chunk_size=1)),
                     ("loop, chunk-start C=64", dict(impl="loop", chunk_size=C)),
                     ("chunked C=64, sweeps=0", dict(impl="chunked", chunk_size=C)),
                     ("chunked C=64, sweeps=63", dict(impl="chunked", chunk_size=C, sweeps=C - 1))]:
        times = []
        for bwd in (False, True):
            xs = [t.clone().requires_grad_(bwd) for t in ins]
            best = float("inf")
            for _ in range(1 if bwd else 3):
                t0 = time.perf_counter()
                with torch.set_grad_enabled(bwd):
                    o, K, V = tr.trellis_op(*xs, **kw)
                    if bwd:
                        (o.sum() + K.sum() + V.sum()).backward()
                best = min(best, time.perf_counter() - t0)
            times.append(best * 1e3)
        print(f"{name:26s} fwd {times[0]:9.1f} ms   fwd+bwd {times[1]:9.1f} ms", flush=True)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description="check and benchmark the Trellis kernels")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--skip-check", action="store_true")
    ap.add_argument("--T", default="1024,4096,16384", help="sequence lengths (B*T = 32768)")
    a = ap.parse_args()
    if a.device == "cpu":
        cpu_table()
    else:
        props = torch.cuda.get_device_properties(0)
        print(f"{props.name}, torch {torch.__version__}, triton {triton.__version__}")
        if not a.skip_check:
            check(a.device)
        bench(a.device, Ts=[int(t) for t in a.T.split(",")])
