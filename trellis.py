"""Trellis: a Transformer whose KV cache is m memory slots written by online gradient descent.

Karami, Behrouz, Kacham, Mirrokni, "Trellis: Learning to Compress Key-Value Memory in
Attention Models", COLM 2025, arXiv 2512.23852. This file derives the model and builds it in
the paper's order; NOTES.md maps each step to the paper and records the choices the paper
leaves open. Where the paper's equation numbers are known they are cited as "paper, Eq. N":
the update rule is Eqs. 5-6, the two passes Eqs. (13)-(14). The derivations in these
comments are this file's own; where they go beyond the paper (the exact chunked form, the
backward) they say so.

  1. one memory, one token: the online-regression step and phi's error codes (paper, Eqs. 5-6)
  2. the two passes, as a per-token loop, the definition (paper, Eqs. (13)-(14))
  3. the chunked-parallel form of one pass, and its exact refinement
  3b. the backward of the chunked form (what kernel.py implements)
  4. the two-pass operator, trellis_op (one place that picks the implementation)
  5. the layer and the language model
  6. generation with a constant-size state
  7. argument checks

Glossary (code symbol: paper symbol, shape for one batch element and one head)
  m           number of memory slots (64 by default)
  S           a memory M_t, [m, d]: K (key memory, d = d_k) or V (value memory, d = d_v)
  W, w        write vectors w_t, [T, d]: k_t in the key pass, v_t in the value pass
  A, a        slot codes alpha_t, [T, m]: the regression target, alpha_t = W_alpha x_t
  phi         the nonlinearity inside the regression loss ("write" nonlinearity)
  f           the map between the passes, r_t = f(yhat_t)
  z, Z        the memory's prediction z_t = M w_t, [m] per token, [C, m] per chunk (Z = W S^T)
  u           error code u_t = J_phi(z_t)^T (phi(z_t) - a_t), [m]
  U           Ubar = diag(gamma) u per chunk, [C, m]
  beta        forget gate beta_t in (0, 1];  lb = log beta
  gamma       inner step size gamma_t > 0
  lam         the L2 weight lambda_t, implied by beta_t = 1 - gamma_t lambda_t, never computed
  q, yhat     query q_t [d_k] and the key pass's read yhat_t = K_t q_t [m]
  r, o        r_t = f(yhat_t) [m] and the value pass's read o_t = V_t^T r_t [d_v]
  X           what a pass reads with: q_t (key pass) or r_t (value pass)
  C, c        chunk size, and the length of one (possibly partial) chunk
  b           b_i = sum_{j<=i} log beta_j inside a chunk;  b_prev = b_{i-1}, b_0 = 0
  Gam         Gamma_ij = exp(b_i - b_j) for j <= i, else 0           [C, C]
  Gam_prev    Gamma'_ij = exp(b_{i-1} - b_j) for j < i, else 0        [C, C]
  L           (W W^T) . Gamma', strictly lower triangular             [C, C]
  Z0          diag(e^{b_prev}) W S^T, the part of Z the chunk's own writes do not touch
  to_end      e^{b_c - b_i}, the decay from row i to the chunk's end   [C]
  sweeps      refinement sweeps of Z = Z0 - L Ubar(Z); 0 = the paper's chunk-start rule
  phi_eps     the epsilon of phi's LayerNorm (normalized SiLU);  f_eps: the same for f
  sd, rsd     the LayerNorm's standard deviation sqrt(var + eps), and 1 / sd (kernel.py)
  rows        a chunk's rows are counted i = 1..c here and in kernel.py's comments

Layout of the public operator: [B, T, H, D] (batch, time, head, feature), as in
FlashAttention and fla. Memories are [B, H, m, d]; the gates beta and gamma are [B, T, H].
The passes work in [B, H, T, D], so that heads act as a batch dimension for matmuls.
"""

import math
from dataclasses import dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

# -----------------------------------------------------------------------------
# 1. One memory, one token: the online-regression step (paper, Eqs. 5-6)
#
# A memory M [m, d] should map a write vector w_t [d] to a slot code a_t [m] through phi.
# Each token contributes the regression loss
#
#     L_t(M) = 1/2 ||phi(M w_t) - a_t||^2 + lam_t/2 ||M||_F^2
#
# With z = M w (so dz = dM w), its gradient is J_phi(z)^T (phi(z) - a) w^T + lam M. One
# gradient step of size gamma_t, taken at the previous memory M_{t-1}, is
#
#     z_t = M_{t-1} w_t
#     u_t = J_phi(z_t)^T (phi(z_t) - a_t)                  (the "error code", [m])
#     M_t = M_{t-1} - gamma_t (u_t w_t^T + lam_t M_{t-1})
#         = beta_t M_{t-1} - gamma_t u_t w_t^T,            beta_t = 1 - gamma_t lam_t
#
# So the L2 penalty is a multiplicative forget gate. Since beta_t and gamma_t enter the step
# separately, the model gives beta_t a gate of its own (a sigmoid of the token) and never
# computes lam_t: the memory can forget without changing how fast it learns.
#
# Error codes in closed form, one per phi:
#   identity:  J = I, so u = z - a.
#   SiLU:      J = diag(silu'(z)), so u = silu'(z) * (silu(z) - a),
#              silu'(z) = sigma(z) (1 + z (1 - sigma(z))).
#   normalized SiLU, phi(z) = LayerNorm(SiLU(z)) over the m slots, no affine weights:
#              s = silu(z), mu = mean(s), sd = sqrt(mean((s - mu)^2) + eps), y = (s - mu) / sd.
#              Differentiating, d(sd) = mean((s - mu) ds) / sd = mean(y ds) (mean(s - mu) = 0), so
#                  dy = (ds - mean(ds) - y mean(y ds)) / sd,
#              i.e. dy = J ds with the symmetric J = (I - 1 1^T / m - y y^T / m) / sd. With
#              e = y - a, J^T e = J e gives
#                  u = silu'(z) * (e - mean(e) - y mean(e y)) / sd.
#              At z = 0 (a zero memory) s is constant, sd = sqrt(eps) and u is scaled by
#              1/sqrt(eps): eps bounds the gain of the write (NOTES.md, "decisions").
#
# phi = identity gives the delta rule. Then u_t = M_{t-1} w_t - a_t and
#
#     M_t = beta_t M_{t-1} - gamma_t (M_{t-1} w_t - a_t) w_t^T
#         = M_{t-1} (beta_t I - gamma_t w_t w_t^T) + gamma_t a_t w_t^T.
#
# With beta_t = 1 this is the delta rule (Widrow and Hoff 1960; Schlag et al. 2021; DeltaNet,
# Yang et al. 2024), S_t = S_{t-1} (I - gamma k k^T) + gamma v k^T, with key w_t, "value" a_t and
# state M. With beta_t < 1 it is a gated delta rule that decays only the old memory (Gated
# DeltaNet, Yang et al. 2025, decays the erase term too: S_t = beta S_{t-1}(I - gamma k k^T) + ...).
# For the delta rule (phi = identity) the step contracts the memory along w_t when
# 0 < gamma_t ||w_t||^2 < 2; the layer L2-normalizes w, as DeltaNet does, and keeps
# gamma_t <= gamma_max (0.1 by default). With a nonlinear phi the step on z is also scaled by
# J_phi (for normalized SiLU up to silu'(z) / sd), so gamma ||w||^2 < 2 is then necessary, not
# sufficient: phi_eps bounds 1 / sd, and the small gamma_max leaves room for J and for the C
# steps that the chunk-start rule computes at one memory.


def silu_prime(z):
    """d silu / dz = sigma(z) (1 + z (1 - sigma(z)))."""
    s = torch.sigmoid(z)
    return s * (1 + z * (1 - s))


def norm_silu(z, eps):
    """LayerNorm(SiLU(z)) over the last (slot) dimension, no affine weights."""
    s = F.silu(z)
    mu = s.mean(-1, keepdim=True)
    var = (s - mu).pow(2).mean(-1, keepdim=True)
    return (s - mu) / torch.sqrt(var + eps)


L2_EPS = 1e-6  # keeps SiLU(z) / ||SiLU(z)|| finite at SiLU(z) = 0


def l2_silu(z, eps=None):
    """SiLU(z) / ||SiLU(z)||_2 over the last dimension (the paper's other form of f).
    Its epsilon is L2_EPS; the argument exists so that every f takes (z, eps)."""
    s = F.silu(z)
    return s * torch.rsqrt(s.pow(2).sum(-1, keepdim=True) + L2_EPS)


def code_identity(z, a, eps=None):
    """phi = identity: u = z - a."""
    return z - a


def code_silu(z, a, eps=None):
    """phi = SiLU (elementwise): u = silu'(z) * (silu(z) - a)."""
    return silu_prime(z) * (F.silu(z) - a)


def code_norm_silu(z, a, eps):
    """phi = LayerNorm(SiLU): u = silu'(z) * (e - mean(e) - y mean(e y)) / sd."""
    s = F.silu(z)
    mu = s.mean(-1, keepdim=True)
    sd = torch.sqrt((s - mu).pow(2).mean(-1, keepdim=True) + eps)
    y = (s - mu) / sd
    e = y - a
    h = e - e.mean(-1, keepdim=True) - y * (e * y).mean(-1, keepdim=True)
    return silu_prime(z) * h / sd


# name -> (phi(z, eps), its error code (z, a, eps)). phi itself is only needed by the tests:
# its code must equal autograd of 1/2 ||phi(z) - a||^2.
PHI = {
    "identity": (lambda z, eps=None: z, code_identity),
    "silu": (lambda z, eps=None: F.silu(z), code_silu),
    "norm_silu": (norm_silu, code_norm_silu),
}
# the map between the passes, r_t = f(yhat_t, eps)
F_MAP = {"norm_silu": norm_silu, "l2_silu": l2_silu}


def error_code(phi, z, a, eps):
    return PHI[phi][1](z, a, eps)


# -----------------------------------------------------------------------------
# 2. The two passes, as a per-token loop (paper, Eqs. (13)-(14))
#
# Trellis keeps two memories per head and runs the step of section 1 on each, with the
# same slot codes and gates:
#
#     key pass:    M = K, w_t = k_t, a_t = alpha_t       read  yhat_t = K_t q_t      [m]
#     between:     r_t = f(yhat_t)                                                  [m]
#     value pass:  M = V, w_t = v_t, a_t = alpha_t       read  o_t = V_t^T r_t       [d_v]
#
# The query addresses the slots through the key memory; f turns those scores into slot
# weights (as a softmax does in ABC and GSA, whose additive writes the regression step
# replaces); the weights read the value memory. Each token is written before it is read
# (reads use M_t), and the gradient step is taken at M_{t-1}. The memories evolve from
# (w, alpha, beta, gamma) alone, never from the reads, so only the value pass's read waits
# for the key pass.
#
# pass_loop is the definition. Its chunk_size argument anchors z_t at the memory of the
# chunk's start instead of M_{t-1}: the paper's chunk-start rule of section 3, written as a
# loop so that the chunked form can be tested against it (chunk_size = 1 is the exact
# recurrence). Its sweeps argument is section 3's refinement, also token by token: sweep k's
# codes are read from a memory written with sweep k-1's codes (section 3 derives this), so the
# loop carries one memory per level. The same loop, one token at a time, is generation
# (section 6): whatever rule the model was trained with, it decodes that rule.


def loop_levels(chunk_size, sweeps):
    """(chunk length, number of memories) that pass_loop carries for a rule. The exact rule
    (sweeps >= chunk_size - 1) is the chunk-start rule with chunks of one token: one memory.
    Otherwise level 0 is the chunk's start memory and levels 1 .. sweeps + 1 are written with
    the codes of sweeps 0 .. sweeps; the last level is the memory M_t."""
    if sweeps >= chunk_size - 1:
        return 1, 1
    return chunk_size, sweeps + 2


def pass_loop(W, A, beta, gamma, S, X, read, phi, phi_eps, chunk_size=1, sweeps=0, pos=0):
    """One memory pass, token by token.
    W [B,H,T,d], A [B,H,T,m], beta/gamma [B,H,T], X [B,H,T,d] if read == "q" (y = M x, [m])
    or [B,H,T,m] if read == "r" (y = M^T x, [d]). S: the initial memory [B,H,m,d], or the
    levels [n,B,H,m,d] that a previous call returned (loop_levels); pos: the position of the
    first token in the sequence (where chunks start). Returns Y [B,H,T,m or d] and the levels
    after the last token (the memory is levels[-1])."""
    C, n = loop_levels(chunk_size, sweeps)
    levels = S if S.dim() == 5 else S.expand(n, *S.shape)  # [n,B,H,m,d]
    ys = []
    for t in range(W.shape[2]):
        if (pos + t) % C == 0:  # a chunk starts: every level restarts from the memory
            levels = levels[-1].expand_as(levels)
        w, a, x = W[:, :, t], A[:, :, t], X[:, :, t]  # [B,H,d], [B,H,m], [B,H,d|m]
        src = levels[:-1] if n > 1 else levels  # the memories the codes are read from
        z = (src @ w[..., None])[..., 0]  # [n-1,B,H,m] (n = 1: [1,B,H,m], z_t = M_{t-1} w_t)
        u = gamma[:, :, t, None] * error_code(phi, z, a, phi_eps)  # gamma_t u_t per level
        written = beta[:, :, t, None, None] * levels[-len(u):] - u[..., :, None] * w[..., None, :]  # write ...
        levels = torch.cat([levels[:n - len(u)], written])  # level 0 (the chunk's start) is kept
        M = levels[-1]
        if read == "q":  # ... before read
            ys.append((M @ x[..., None])[..., 0])  # [B,H,m]
        else:
            ys.append((M.transpose(-1, -2) @ x[..., None])[..., 0])  # [B,H,d]
    return torch.stack(ys, dim=2), levels


# -----------------------------------------------------------------------------
# 3. The chunked-parallel form of one pass
#
# Split time into chunks of C tokens. In a chunk with start memory S, rows i = 1..c, write
# Ubar_i = gamma_i u_i and b_i = sum_{j<=i} log beta_j. Unrolling M_i = beta_i M_{i-1} - Ubar_i w_i^T
# from S gives
#
#     M_i = e^{b_i} S - sum_{j<=i} e^{b_i - b_j} Ubar_j w_j^T,
#
# and with Gam_ij = exp(b_i - b_j) for j <= i (else 0) the chunk's reads and its end state are
# matrix products over the chunk's rows:
#
#     read with q:  Yhat = diag(e^b) Q S^T - ((Q W^T) . Gam) Ubar       [c, m]   (yhat_i = M_i q_i)
#     read with r:  O    = diag(e^b) R S   - ((R Ubar^T) . Gam) W       [c, d_v] (o_i = M_i^T r_i)
#     end state:    S   <- e^{b_c} S - (Ubar . to_end)^T W,  to_end_i = e^{b_c - b_i}
#
# b restarts at every chunk and only differences b_i - b_j <= 0 are exponentiated, so
# nothing overflows however small beta gets (no cumulative product of beta is formed).
#
# What is not linear is Ubar itself: u_i needs z_i = M_{i-1} w_i. The paper's chunk-start rule
# takes every z_i of a chunk from the start memory, Z = W S^T, so that all of a chunk's codes
# come from one matrix product. It is an approximation (a different function, not a rounding)
# that becomes exact at C = 1.
#
# The exact z_i follows from the same unrolling, at i - 1:
#
#     z_i = e^{b_{i-1}} S w_i - sum_{j<i} e^{b_{i-1} - b_j} (w_j . w_i) Ubar_j
#     Z   = Z0 - L Ubar(Z),   Z0 = diag(e^{b_prev}) W S^T,   L = (W W^T) . Gam_prev,
#
# with Gam_prev_ij = exp(b_{i-1} - b_j) for j < i. This is a fixed point in Z. L is strictly
# lower triangular, so row i depends only on rows j < i: sweeping Z <- Z0 - L Ubar(Z) from the
# chunk-start codes makes one more row exact per sweep (row 1 already is: b_0 = 0), and
# C - 1 sweeps give the exact recurrence. The sweeps argument is therefore a knob from the
# paper's rule (0) to the exact model (C - 1). This refinement is this project's addition.
#
# Token by token, sweep k + 1 reads row i's z from a memory: with Ubar^(k) the codes of sweep
# k, Z^(k+1)_i = e^{b_{i-1}} S w_i - sum_{j<i} e^{b_{i-1} - b_j} (w_j . w_i) Ubar^(k)_j = M^(k)_{i-1} w_i,
# where M^(k) is the memory written from S with sweep k's codes (and sweep 0 reads S itself).
# pass_loop carries these memories, one per sweep, so that generation can decode any rule.


def _decay_matrix(row, col, mask):
    """exp(row_i - col_j) where mask, else 0; masked entries are zeroed before exp, so they
    can neither overflow nor send NaN into the gradient."""
    diff = row[..., :, None] - col[..., None, :]  # [..., c, c]
    return torch.where(mask, torch.exp(diff.masked_fill(~mask, 0.0)), 0.0)


def pass_chunked(W, A, beta, gamma, S, X, read, phi, phi_eps, chunk_size=64, sweeps=0):
    """Same arguments and result as pass_loop(..., chunk_size) when sweeps = 0;
    with sweeps >= chunk_size - 1 it equals the exact recurrence."""
    T = W.shape[2]
    log_beta = torch.log(beta)  # [B,H,T]; trellis_op keeps beta > 0
    ys = []
    for t0 in range(0, T, chunk_size):
        t1 = min(t0 + chunk_size, T)  # the last chunk may be partial
        c = t1 - t0
        w, a, x = W[:, :, t0:t1], A[:, :, t0:t1], X[:, :, t0:t1]  # [B,H,c,*]
        g = gamma[:, :, t0:t1, None]  # [B,H,c,1]
        lb = log_beta[:, :, t0:t1]  # [B,H,c]
        b = lb.cumsum(-1)  # [B,H,c]
        le = torch.ones(c, c, dtype=torch.bool, device=W.device).tril()
        Gam = _decay_matrix(b, b, le)  # [B,H,c,c]

        Z = w @ S.transpose(-1, -2)  # [B,H,c,m]   the chunk-start rule
        U = g * error_code(phi, Z, a, phi_eps)  # [B,H,c,m]   Ubar
        if sweeps > 0:
            b_prev = b - lb  # b_{i-1}, with b_0 = 0
            L = (w @ w.transpose(-1, -2)) * _decay_matrix(b_prev, b, le.tril(-1))  # [B,H,c,c]
            Z0 = torch.exp(b_prev)[..., None] * Z  # [B,H,c,m]
            for _ in range(min(sweeps, c - 1)):
                U = g * error_code(phi, Z0 - L @ U, a, phi_eps)

        eb = torch.exp(b)[..., None]  # [B,H,c,1]
        if read == "q":
            y = eb * (x @ S.transpose(-1, -2)) - ((x @ w.transpose(-1, -2)) * Gam) @ U  # [B,H,c,m]
        else:
            y = eb * (x @ S) - ((x @ U.transpose(-1, -2)) * Gam) @ w  # [B,H,c,d]
        ys.append(y)
        to_end = torch.exp(b[..., -1:] - b)[..., None]  # [B,H,c,1]
        S = torch.exp(b[..., -1])[..., None, None] * S - (U * to_end).transpose(-1, -2) @ w
    return torch.cat(ys, dim=2), S


# -----------------------------------------------------------------------------
# 3b. The backward of the chunked form
#
# Training differentiates through everything, the codes' dependence on the memory included.
# PyTorch's autograd does this for pass_chunked; kernel.py does it by hand, and this section is
# the derivation it implements, for one chunk of one pass (rows i = 1..c, start memory S).
# The forward, labelled:
#
#   (F1) Z = W S^T                       (exact rule: Z = Z0 - L Ubar, section 3)
#   (F2) Ubar = diag(gamma) u,  u = code(Z, A)
#   (F3) b = cumsum(log beta),  Gam_ij = e^{b_i - b_j} (j <= i),  to_end_i = e^{b_c - b_i}
#   (F4) read with q:  Yhat = diag(e^b) Q S^T - (P . Gam) Ubar,  P = Q W^T
#        read with r:  O    = diag(e^b) R S   - (P . Gam) W,     P = R Ubar^T
#   (F5) S' = e^{b_c} S - (Ubar . to_end)^T W
#
# Given dY (the loss's gradient w.r.t. the chunk's reads) and dS' (w.r.t. its end memory),
# the chunk's gradients follow F5 .. F1 backwards. dP is the gradient w.r.t. P, and
# G = dP . P the one w.r.t. Gam times Gam (its b_i - b_j exponent):
#
#   (B1) the reads (no dS' needed: every chunk in parallel once S and Ubar are stored)
#        q:  dP = -(dY Ubar^T) . Gam,  dQ = diag(e^b) dY S + dP W,   dW = dP^T Q,
#            dUbar = -(P . Gam)^T dY,  dS_read = (diag(e^b) dY)^T Q,  db_i = e^{b_i} <dY_i, (Q S^T)_i>
#        r:  dP = -(dY W^T) . Gam,     dR = diag(e^b) dY S^T + dP Ubar, dUbar = dP^T R,
#            dW = -(P . Gam)^T dY,     dS_read = (diag(e^b) R)^T dY,  db_i = e^{b_i} <dY_i, (R S)_i>
#        and for both  db_i += sum_j G_ij - sum_j G_ji
#   (B2) the end memory:  dUbar -= to_end . (W dS'^T),  dW -= (Ubar . to_end) dS',
#        db_i -= gd_i and db_c += e^{b_c} <dS', S> + sum_i gd_i,  gd_i = -to_end_i <Ubar_i, (W dS'^T)_i>
#   (B3) the code:  dgamma_i = <dUbar_i, u_i>,  (dZ, dA) = J_code(Z, A)^T (gamma . dUbar)  (code_vjp)
#   (B4) the memory through Z = W S^T:  dW += dZ S, and the step from chunk to chunk
#            dS = e^{b_c} dS' + dS_read + dZ^T W
#        The last term is the codes' dependence on the memory: a first-order shortcut drops
#        it and no longer computes the gradient of the function the forward computes.
#   (B5) d log beta_j = sum_{i >= j} db_i, a reverse cumulative sum (b_i = sum_{j<=i} log beta_j)
#   (B6) the exact rule, Z = Z0 - L Ubar(Z) at its fixed point. With dUbar from B1-B2 (every
#        use of Ubar but the one in Z), the gradient w.r.t. Z solves
#            dZ = J_code^T (gamma . (dUbar - L^T dZ)),
#        L^T strictly upper triangular: sweeps from dZ = 0 make one more row exact each, last
#        row first, and c sweeps solve it. B3's dgamma and dA then take dUbar - L^T dZ, and
#        Z0 = diag(e^{b_prev}) W S^T and L = (W W^T) . Gam_prev carry dZ on:
#            dS += (diag(e^{b_prev}) dZ)^T W,  dW += diag(e^{b_prev}) dZ S + (dL' + dL'^T) W,
#            dL = -dZ Ubar^T,  dL' = dL . Gam_prev,  db_prev_i = e^{b_prev_i} <dZ_i, (W S^T)_i>
#              + sum_j (dL . L)_ij,  db_j -= sum_i (dL . L)_ij,
#        and b_prev = b - log beta sends db_prev to b and its negative to log beta directly.
#
# code_vjp is B3's product for each phi. For normalized SiLU (section 1: s = silu(z), s1 its
# derivative, s2 the second, y = LayerNorm(s) with standard deviation sd, e = y - a,
# h = J_y e, u = s1 . h, and J_y v = (v - mean(v) - y mean(y v)) / sd symmetric), with
# p = du . s1 the gradient reaching h:
#
#     da = -J_y p
#     dy = J_y p - (p mean(e y) + e mean(p y)) / sd     (y enters e and the term y mean(e y))
#     d sd = -<p, h> / sd                                 (h's explicit 1 / sd)
#     ds = J_y dy + d sd * y / m                          (d sd / ds = y / m)
#     dz = s1 . ds + s2 . h . du
#
# kernel.py's _code_vjp expands this into three row sums of q = dUbar . s1 (alone, with y and
# with a), using the LayerNorm's mean(y) = 0 and mean(y^2) = 1 - eps / sd^2; since
# h = ((1 - mean(e y)) y - a - mean(e)) / sd, B3's dgamma = <dUbar, s1 . h> comes from the same sums.


def code_vjp(phi, z, a, du, eps):
    """(dz, da) = J_code(z, a)^T du for u = error_code(phi, z, a, eps) (B3)."""
    if phi == "identity":
        return du, -du
    sg = torch.sigmoid(z)
    s, s1 = z * sg, silu_prime(z)
    s2 = sg * (1 - sg) * (2 + z * (1 - 2 * sg))  # silu''(z)
    if phi == "silu":
        return du * (s2 * (s - a) + s1 * s1), -du * s1

    def mean(t):
        return t.mean(-1, keepdim=True)

    sd = torch.sqrt(mean((s - mean(s)) ** 2) + eps)
    y = (s - mean(s)) / sd

    def J(t):  # J_y t
        return (t - mean(t) - y * mean(y * t)) / sd

    e = y - a
    h = J(e)
    p = du * s1
    dy = J(p) - (p * mean(e * y) + e * mean(p * y)) / sd
    d_sd = -(p * h).sum(-1, keepdim=True) / sd
    ds = J(dy) + d_sd * y / z.shape[-1]
    return s1 * ds + s2 * h * du, -J(p)


def pass_chunked_grads(W, A, beta, gamma, S, X, read, phi, phi_eps, chunk_size, exact, dY, dS):
    """The gradients of pass_chunked (sweeps = 0, or exact) by B1-B6, in plain PyTorch: what the
    kernel computes, written for reading and for the test against autograd. dY, dS: the loss's
    gradient w.r.t. the pass's reads and final memory. Returns dW, dA, d log beta, dgamma, dS0, dX."""
    log_beta = torch.log(beta)
    spans = [(t0, min(t0 + chunk_size, W.shape[2])) for t0 in range(0, W.shape[2], chunk_size)]
    saved = []  # the forward again, keeping each chunk's start memory, Z and codes
    for t0, t1 in spans:
        w, a, g, b = W[:, :, t0:t1], A[:, :, t0:t1], gamma[:, :, t0:t1, None], log_beta[:, :, t0:t1].cumsum(-1)
        Z = w @ S.transpose(-1, -2)  # F1
        u = error_code(phi, Z, a, phi_eps)
        if exact:  # section 3's sweeps, all c - 1 of them
            low = torch.ones(t1 - t0, t1 - t0, dtype=torch.bool, device=W.device).tril(-1)
            L = (w @ w.transpose(-1, -2)) * _decay_matrix(b - log_beta[:, :, t0:t1], b, low)
            Z0 = torch.exp(b - log_beta[:, :, t0:t1])[..., None] * Z
            for _ in range(t1 - t0 - 1):
                Z = Z0 - L @ (g * u)
                u = error_code(phi, Z, a, phi_eps)
        saved.append((S, Z, u))
        to_end = torch.exp(b[..., -1:] - b)[..., None]
        S = torch.exp(b[..., -1])[..., None, None] * S - (g * u * to_end).transpose(-1, -2) @ w  # F5
    dW, dA, dlb, dg, dX = (torch.zeros_like(t) for t in (W, A, beta, gamma, X))
    for (t0, t1), (S, Z, u) in reversed(list(zip(spans, saved))):
        c = t1 - t0
        w, a, x, dy = W[:, :, t0:t1], A[:, :, t0:t1], X[:, :, t0:t1], dY[:, :, t0:t1]
        g, lb = gamma[:, :, t0:t1, None], log_beta[:, :, t0:t1]
        U = g * u
        b = lb.cumsum(-1)
        eb, b_c = torch.exp(b)[..., None], b[..., -1]  # [B,H,c,1], [B,H]
        Gam = _decay_matrix(b, b, torch.ones(c, c, dtype=torch.bool, device=W.device).tril())
        to_end = torch.exp(b_c[..., None] - b)[..., None]  # [B,H,c,1]
        if read == "q":  # B1
            P = x @ w.transpose(-1, -2)
            dP = -(dy @ U.transpose(-1, -2)) * Gam
            dx, dw = eb * (dy @ S) + dP @ w, dP.transpose(-1, -2) @ x
            dU, dS_read = -(P * Gam).transpose(-1, -2) @ dy, (eb * dy).transpose(-1, -2) @ x
            db = eb[..., 0] * (dy * (x @ S.transpose(-1, -2))).sum(-1)
        else:
            P = x @ U.transpose(-1, -2)
            dP = -(dy @ w.transpose(-1, -2)) * Gam
            dx, dU = eb * (dy @ S.transpose(-1, -2)) + dP @ U, dP.transpose(-1, -2) @ x
            dw, dS_read = -(P * Gam).transpose(-1, -2) @ dy, (eb * x).transpose(-1, -2) @ dy
            db = eb[..., 0] * (dy * (x @ S)).sum(-1)
        G = dP * P
        db = db + G.sum(-1) - G.sum(-2)
        WdS = w @ dS.transpose(-1, -2)  # B2
        dU, dw = dU - to_end * WdS, dw - (U * to_end) @ dS
        gd = -(U * WdS).sum(-1) * to_end[..., 0]
        db = db - gd
        db[..., -1] += torch.exp(b_c) * (dS * S).sum((-1, -2)) + gd.sum(-1)
        dS = torch.exp(b_c)[..., None, None] * dS + dS_read  # B4, less the code's term
        if exact:  # B6
            b_prev = b - lb
            Gam_prev = _decay_matrix(b_prev, b, torch.ones(c, c, dtype=torch.bool, device=W.device).tril(-1))
            L = (w @ w.transpose(-1, -2)) * Gam_prev
            dZ = torch.zeros_like(Z)
            for _ in range(c):
                dZ, da = code_vjp(phi, Z, a, g * (dU - L.transpose(-1, -2) @ dZ), phi_eps)
            dU = dU - L.transpose(-1, -2) @ dZ
            e_prev = torch.exp(b_prev)[..., None]
            dL = -dZ @ U.transpose(-1, -2)
            dS = dS + (e_prev * dZ).transpose(-1, -2) @ w
            dw = dw + e_prev * (dZ @ S) + (dL * Gam_prev + (dL * Gam_prev).transpose(-1, -2)) @ w
            db_prev = e_prev[..., 0] * (dZ * (w @ S.transpose(-1, -2))).sum(-1) + (dL * L).sum(-1)
            db = db - (dL * L).sum(-2) + db_prev
        else:  # B3, B4
            dZ, da = code_vjp(phi, Z, a, g * dU, phi_eps)
            dS, dw, db_prev = dS + dZ.transpose(-1, -2) @ w, dw + dZ @ S, 0
        dg[:, :, t0:t1], dA[:, :, t0:t1], dW[:, :, t0:t1], dX[:, :, t0:t1] = (dU * u).sum(-1), da, dw, dx
        dlb[:, :, t0:t1] = db.flip(-1).cumsum(-1).flip(-1) - db_prev  # B5
    return dW, dA, dlb, dg, dS, dX


# -----------------------------------------------------------------------------
# 4. The two-pass operator
#
# trellis_op runs the key pass, f, then the value pass, in one of these implementations:
#   "loop"     pass_loop, token by token (the definition)
#   "chunked"  pass_chunked, chunk by chunk (the same function for every chunk_size and sweeps)
#   "kernel"   kernel.py's Triton kernels (CUDA, or the Triton interpreter; sweeps 0 or >= C - 1)
#   "auto"     the kernel when it supports the call, else "chunked"
# Memories and gates are kept in float32 (float64 if any input is float64) whatever the
# inputs' dtype and the caller's autocast: a bf16 memory would round every one of T updates.


def trellis_op(q, k, v, alpha, beta, gamma, K0=None, V0=None, *, phi="norm_silu", f="norm_silu",
               chunk_size=64, sweeps=0, phi_eps=1.0, f_eps=1e-3, impl="chunked", check_values=True):
    """The two-pass Trellis operator.

    q, k [B,T,H,d_k]; v [B,T,H,d_v]; alpha [B,T,H,m]; beta in [0, 1], gamma in [0, 2) [B,T,H];
    K0 [B,H,m,d_k], V0 [B,H,m,d_v] (None = zeros). phi_eps, f_eps: the LayerNorm epsilons of
    normalized SiLU in phi and in f. Returns o [B,T,H,d_v] in v's dtype and the final
    memories K, V in float32 (float64 if any input is float64).

    check_values refuses non-finite inputs and gates out of range with a ValueError; it costs
    one host sync, so the layer, whose gates are in range by construction, turns it off. (A NaN
    is not kept causal: the chunked form's masked products 0 * NaN spread it to earlier rows.)"""
    _check_operator_args(q, k, v, alpha, beta, gamma, K0, V0, phi, f, chunk_size, sweeps, phi_eps, f_eps, impl)
    if check_values:
        _check_operator_values(q, k, v, alpha, beta, gamma, K0, V0)
    impl = _choose_impl(impl, q, v, alpha, phi, f, chunk_size, sweeps)
    if impl == "kernel":
        import kernel  # only this path needs triton

        return kernel.trellis_op_triton(q, k, v, alpha, beta, gamma, K0, V0, phi=phi, f=f, chunk_size=chunk_size,
                                        sweeps=sweeps, phi_eps=phi_eps, f_eps=f_eps)
    B, T, H, dk = q.shape
    dv, m = v.shape[-1], alpha.shape[-1]
    tensors = [q, k, v, alpha, beta, gamma] + [t for t in (K0, V0) if t is not None]
    dt = torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32
    K = q.new_zeros(B, H, m, dk, dtype=dt) if K0 is None else K0.to(dt)  # [B,H,m,d_k]
    V = q.new_zeros(B, H, m, dv, dtype=dt) if V0 is None else V0.to(dt)  # [B,H,m,d_v]
    o, K, V = _two_passes(q, k, v, alpha, beta, gamma, K, V, impl, phi, f, chunk_size, sweeps, phi_eps, f_eps)
    if impl == "loop":
        K, V = K[-1], V[-1]  # the memories are the loop's last levels
    return o, K, V


def _two_passes(q, k, v, alpha, beta, gamma, K, V, impl, phi, f, chunk_size, sweeps, phi_eps, f_eps, pos=0):
    """The PyTorch forms: key pass, f, value pass, in the dtype of the memories K, V (for the
    loop, also the levels of loop_levels; pos: where the loop's first token sits in its chunk)."""
    dt = K.dtype

    def heads_first(t):  # [B,T,H,*] -> [B,H,T,*] in the compute dtype
        return t.to(dt).transpose(1, 2)

    qh, kh, vh, ah = map(heads_first, (q, k, v, alpha))  # [B,H,T,d_k|d_v|m]
    # beta is clamped away from 0 so that log beta is finite (sigmoid underflows below -88)
    bh = beta.to(dt).clamp_min(torch.finfo(dt).tiny).transpose(1, 2)  # [B,H,T]
    gh = gamma.to(dt).transpose(1, 2)  # [B,H,T]
    if impl == "loop":
        one_pass, opts = pass_loop, dict(pos=pos)
    else:
        one_pass, opts = pass_chunked, {}
    with torch.autocast(q.device.type, enabled=False):
        yhat, K = one_pass(kh, ah, bh, gh, K, qh, "q", phi, phi_eps, chunk_size, sweeps, **opts)  # yhat [B,H,T,m]
        r = F_MAP[f](yhat, f_eps)  # [B,H,T,m]
        o, V = one_pass(vh, ah, bh, gh, V, r, "r", phi, phi_eps, chunk_size, sweeps, **opts)  # o [B,H,T,d_v]
    return o.transpose(1, 2).to(v.dtype), K, V  # o: [B,T,H,d_v]


def _choose_impl(impl, q, v, alpha, phi, f, chunk_size, sweeps):
    """Resolve "auto": the Triton kernel on CUDA when it supports the call, else "chunked"."""
    if impl != "auto":
        return impl
    if q.is_cuda:
        import kernel

        if kernel.unsupported(q, v, alpha, phi, f, chunk_size, sweeps) is None:
            return "kernel"
    return "chunked"


# -----------------------------------------------------------------------------
# 5. The layer and the language model
#
# A pre-norm residual block, x += Mixer(RMSNorm(x)); x += SwiGLU(RMSNorm(x)), with no
# positional encoding in the Trellis mixer (the recurrence is ordered). The mixer makes
# q, k, v (a short causal convolution on q and k), L2-normalizes them per head, projects
# alpha, beta and gamma from the token, runs trellis_op, and gates the normalized output.
# Every choice the paper leaves open is a TrellisConfig field; NOTES.md gives the evidence.


@dataclass
class TrellisConfig:
    vocab_size: int = 50304  # GPT-2's 50257 padded to a multiple of 64
    n_layer: int = 4
    n_embd: int = 256
    n_head: int = 4  # head size n_embd / n_head = 64
    mixer: str = "trellis"  # "trellis" or "attention" (the same shell with causal softmax attention)
    dropout: float = 0.0
    # the Trellis mixer
    slots: int = 64  # m
    phi: str = "norm_silu"  # write nonlinearity phi
    f: str = "norm_silu"  # map between the passes
    phi_eps: float = 1.0  # LayerNorm eps in phi: bounds the write's gain, 1/sqrt(eps)
    f_eps: float = 1e-3  # LayerNorm eps in f: f only feeds a read, so a near-exact LayerNorm
    chunk_size: int = 64
    sweeps: int = 0  # 0 = the paper's chunk-start rule, chunk_size - 1 = exact
    impl: str = "auto"  # trellis_op's implementation: "auto", "kernel", "chunked" or "loop"
    short_conv: bool = True  # causal depthwise conv (width 4) + SiLU on q and k
    forget_gate: bool = True  # False: beta = 1 (the ablation)
    beta_init: float = 0.95  # initial forget gate, through the bias of its sigmoid
    gamma_max: float = 0.1  # gamma = gamma_max * sigmoid(.): bounds the C stale steps of a chunk
    gamma_init: float = 0.05  # initial inner step size, through the bias
    learned_init_memory: bool = True  # learned K0, V0 (else zeros)
    alpha_norm: bool = False  # True: each token's target alpha LayerNorm-ed over the slots (see TrellisMixer)

    def __post_init__(self):
        positive = ("vocab_size", "n_layer", "n_embd", "n_head", "slots", "chunk_size")
        for name in positive:
            if not isinstance(getattr(self, name), int) or getattr(self, name) <= 0:
                raise ValueError(f"TrellisConfig.{name} must be a positive int, got {getattr(self, name)!r}")
        if self.n_embd % self.n_head:
            raise ValueError(f"TrellisConfig.n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        choices = dict(mixer=("trellis", "attention"), phi=tuple(PHI), f=tuple(F_MAP),
                       impl=("auto", "kernel", "chunked", "loop"))
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"TrellisConfig.{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if not isinstance(self.sweeps, int) or self.sweeps < 0:
            raise ValueError(f"TrellisConfig.sweeps must be an int >= 0, got {self.sweeps!r}")
        for name in ("phi_eps", "f_eps"):
            if not 0 < getattr(self, name) < math.inf:
                raise ValueError(f"TrellisConfig.{name} must be a positive number, got {getattr(self, name)!r}")
        if not 0 < self.beta_init < 1:
            raise ValueError(f"TrellisConfig.beta_init must be in (0, 1), got {self.beta_init!r}")
        if not 0 < self.gamma_max < 2:  # the delta rule's bound for unit writes (section 1)
            raise ValueError(f"TrellisConfig.gamma_max must be in (0, 2), got {self.gamma_max!r}")
        if not 0 < self.gamma_init < self.gamma_max:
            raise ValueError(f"TrellisConfig.gamma_init must be in (0, gamma_max = {self.gamma_max}), "
                             f"got {self.gamma_init!r}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"TrellisConfig.dropout must be in [0, 1), got {self.dropout!r}")


def rms_norm(x, weight, eps=1e-6):
    # the weight in x's dtype: PyTorch fuses the norm only when the two match (bf16 o under autocast)
    return F.rms_norm(x, (x.shape[-1],), weight.to(x.dtype), eps)


class RMSNorm(nn.Module):
    def __init__(self, n):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(n))

    def forward(self, x):
        return rms_norm(x, self.weight)


class ShortConv(nn.Module):
    """Causal depthwise convolution over time (width 4) and a SiLU, with a carried state of the
    last width - 1 inputs, so prefill and one-token steps compute the same thing; with `head`,
    each group of that many channels (a head of q or k) then scaled to unit L2 norm. On CUDA a
    sequence without a carried state takes kernel.short_conv_silu (the same sums, one pass) while
    use_kernel is True (train_tiny.py --bench-train times the model without it too)."""

    use_kernel = True

    def __init__(self, n, width=4):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n, 1, width).uniform_(-width**-0.5, width**-0.5))

    def forward(self, x, cache=None, head=None):  # x [B,T,C], cache [B,width-1,C] or None (zeros)
        B, T, C = x.shape
        width = self.weight.shape[-1]
        fused = self.use_kernel and x.is_cuda and x.dtype in (torch.bfloat16, torch.float16, torch.float32)
        if cache is None and fused:
            import kernel  # only this path needs triton

            last = F.pad(x[:, -(width - 1):], (0, 0, max(0, width - 1 - T), 0))  # [B,width-1,C]
            return kernel.short_conv_silu(x, self.weight[:, 0], head), last
        if cache is None:
            cache = x.new_zeros(B, width - 1, C)
        xp = torch.cat([cache.to(x.dtype), x], dim=1)  # [B, width-1+T, C]
        y = F.silu(F.conv1d(xp.transpose(1, 2), self.weight.to(x.dtype), groups=C).transpose(1, 2))  # [B,T,C]
        if head is not None:
            y = l2_normalize(y.reshape(B, T, C // head, head)).reshape(B, T, C)
        return y, xp[:, -(width - 1):]


def l2_normalize(x):
    """x / sqrt(||x||^2 + d 1e-12) over the last dim (size d): PyTorch's fused RMSNorm with the
    constant weight d^-1/2, one kernel each way, in float32, returned in x's dtype (also under
    autocast)."""
    d = x.shape[-1]
    with torch.autocast(x.device.type, enabled=False):
        return F.rms_norm(x, (d,), torch.full((d,), d**-0.5, dtype=x.dtype, device=x.device), eps=1e-12)


def _gate(lin, x):
    """sigmoid(lin(x)) in float32 (float64 for a float64 model), also under bf16 autocast."""
    dt = torch.promote_types(x.dtype, torch.float32)
    with torch.autocast(x.device.type, enabled=False):
        return torch.sigmoid(F.linear(x.to(dt), lin.weight.to(dt), lin.bias.to(dt)))


class TrellisMixer(nn.Module):
    """x -> (q, k, v, alpha, beta, gamma) -> two-pass Trellis operator -> gated output.
    state (generation): memories K, V [B,H,m,d] and the short convolution's last inputs.

    alpha_norm: the paper projects the target alpha = W_alpha x with nothing to bound it, but a
    normalized-SiLU phi can only output rows of mean 0 and mean square 1 - eps / sd^2 < 1: a
    target outside that set is never reached, e = y - a never vanishes, and training is free to
    grow alpha, which steepens the code's Jacobian (its extreme eigenvalues grow with the largest
    |alpha_k|) and so the step the chunk-start rule takes with stale codes. LayerNorm over the
    slots (no affine weights) puts every target in that set's closure. An option to measure, not
    the default: the paper's target is kept. (For phi = identity every target is reachable.)"""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        n, H, m = cfg.n_embd, cfg.n_head, cfg.slots
        d = n // H
        # one matrix for q, k, v, the output gate g and alpha: x is read (and cast) once
        self.in_proj = nn.Linear(n, 4 * n + H * m, bias=False)
        self.qk_conv = ShortConv(2 * n) if cfg.short_conv else None
        self.gate_proj = nn.Linear(n, 2 * H)  # the logits of beta and gamma / gamma_max
        # learned initial memories: rows ~ N(0, 1/d) so that z = K0 k ~ N(0, 1) for unit k
        init = lambda: nn.Parameter(torch.randn(H, m, d) * d**-0.5)  # noqa: E731
        self.K0, self.V0 = (init(), init()) if cfg.learned_init_memory else (None, None)
        self.o_norm = RMSNorm(d)
        self.o_proj = nn.Linear(n, n, bias=False)

    def init_gates(self):
        """Set after the generic init: beta and gamma start at their configured values."""
        logit = lambda p: math.log(p / (1 - p))  # noqa: E731
        H = self.cfg.n_head
        nn.init.zeros_(self.gate_proj.weight)
        nn.init.constant_(self.gate_proj.bias[:H], logit(self.cfg.beta_init))
        nn.init.constant_(self.gate_proj.bias[H:], logit(self.cfg.gamma_init / self.cfg.gamma_max))

    def operator_inputs(self, x, conv_state=None):
        """x [B,T,n] -> q, k, v [B,T,H,d], alpha [B,T,H,m], beta, gamma [B,T,H], the output
        gate g [B,T,n] and the short convolution's state."""
        cfg = self.cfg
        B, T, n = x.shape
        H, m = cfg.n_head, cfg.slots
        d = n // H
        qk, v, g, alpha = self.in_proj(x).split([2 * n, n, n, H * m], dim=-1)  # [B,T,2n|n|n|H*m]
        # q, k, v L2-normalized per head: gamma ||w||^2 = gamma <= gamma_max (section 1's bound)
        if self.qk_conv is not None:
            qk, conv_state = self.qk_conv(qk, conv_state, head=d)
        else:
            qk = l2_normalize(qk.reshape(B, T, 2 * H, d))
        q, k = qk.reshape(B, T, 2, H, d).unbind(2)  # 2 x [B,T,H,d]
        v = l2_normalize(v.reshape(B, T, H, d))  # [B,T,H,d]
        alpha = alpha.reshape(B, T, H, m)  # [B,T,H,m]
        if cfg.alpha_norm:  # the target put in normalized SiLU's range (the class docstring says why)
            alpha = F.layer_norm(alpha.to(torch.promote_types(alpha.dtype, torch.float32)), (m,)).to(alpha.dtype)
        beta, gamma = _gate(self.gate_proj, x).view(B, T, 2, H).unbind(2)  # 2 x [B,T,H]
        if not cfg.forget_gate:
            beta = torch.ones_like(beta)
        return q, k, v, alpha, beta, cfg.gamma_max * gamma, g, conv_state

    def forward(self, x, state=None):
        cfg = self.cfg
        B, T, n = x.shape
        H, m = cfg.n_head, cfg.slots
        d = n // H
        tracked = state is not None  # decoding: carry the state to the next call
        state = dict(state or {})
        q, k, v, alpha, beta, gamma, g, conv_state = self.operator_inputs(x, state.get("qk_conv"))
        new_state = {} if conv_state is None else {"qk_conv": conv_state}
        ops = dict(phi=cfg.phi, f=cfg.f, chunk_size=cfg.chunk_size, sweeps=cfg.sweeps, phi_eps=cfg.phi_eps,
                   f_eps=cfg.f_eps, impl=cfg.impl)
        K0, V0 = (None if M is None else M.expand(B, H, m, d) for M in (self.K0, self.V0))
        if not tracked:  # training and evaluation: the whole sequence in one call
            o, _, _ = trellis_op(q, k, v, alpha, beta, gamma, K0, V0, check_values=False, **ops)
            return self.o_proj(self.o_norm(o).reshape(B, T, n) * F.silu(g)), None
        if "K" not in state:  # a new sequence starts at the learned (or zero) memories
            dt = torch.promote_types(x.dtype, torch.float32)
            zeros = x.new_zeros(B, H, m, d, dtype=dt)
            state.update(K=zeros if K0 is None else K0.to(dt), V=zeros if V0 is None else V0.to(dt), pos=0)
        o, carried = trellis_continue(q, k, v, alpha, beta, gamma, state, **ops)  # section 6
        new_state.update(carried)
        y = self.o_norm(o).reshape(B, T, n) * F.silu(g)  # [B,T,H,d] -> [B,T,n]
        return self.o_proj(y), new_state


def rotary(x, pos0):
    """Rotary position embedding on x [B,T,H,d], positions pos0 .. pos0 + T - 1."""
    B, T, H, d = x.shape
    inv = 10000.0 ** (-torch.arange(0, d, 2, device=x.device, dtype=torch.float32) / d)  # [d/2]
    ang = torch.arange(pos0, pos0 + T, device=x.device, dtype=torch.float32)[:, None] * inv  # [T, d/2]
    cos, sin = ang.cos()[None, :, None], ang.sin()[None, :, None]  # [1,T,1,d/2]
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)


class AttentionMixer(nn.Module):
    """Causal softmax attention (SDPA) with rotary positions; state = the KV cache."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.qkv_proj = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=False)
        self.o_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=False)

    def forward(self, x, state=None):
        B, T, n = x.shape
        H = self.cfg.n_head
        q, k, v = self.qkv_proj(x).view(B, T, 3, H, n // H).unbind(2)  # 3 x [B,T,H,d]
        pos0 = 0 if not state else state["k"].shape[2]
        q, k = rotary(q, pos0), rotary(k, pos0)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [B,H,T,d]
        if state:
            k, v = torch.cat([state["k"], k], 2), torch.cat([state["v"], v], 2)  # [B,H,pos0+T,d]
            # query i sees cached positions up to pos0 + i. Written out rather than SDPA, whose
            # backend choice may be re-planned for every new cache length
            dt = torch.promote_types(q.dtype, torch.float32)
            att = (q.to(dt) @ k.to(dt).transpose(-1, -2)) * q.shape[-1] ** -0.5  # [B,H,T,pos0+T]
            seen = torch.ones(T, pos0 + T, dtype=torch.bool, device=x.device).tril(pos0)  # [T,pos0+T]
            y = (att.masked_fill(~seen, -math.inf).softmax(-1) @ v.to(dt)).to(v.dtype)  # [B,H,T,d]
        else:
            p = self.cfg.dropout if self.training else 0.0
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=p)  # [B,H,T,d]
        new_state = {"k": k, "v": v} if state is not None else None
        return self.o_proj(y.transpose(1, 2).reshape(B, T, n)), new_state


def _mlp_hidden(cfg):
    """SwiGLU width 8/3 n_embd (rounded up to 32). The attention shell gets the extra width
    that makes its non-embedding parameter count match the Trellis shell's."""
    n = cfg.n_embd
    hidden = 32 * math.ceil(8 * n / 3 / 32)
    if cfg.mixer == "attention":
        count = lambda mod: sum(p.numel() for p in mod.parameters())  # noqa: E731
        extra = count(TrellisMixer(replace(cfg, mixer="trellis"))) - count(AttentionMixer(cfg))
        hidden += round(extra / (3 * n))
    return hidden


class SwiGLU(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        h = _mlp_hidden(cfg)
        self.w1 = nn.Linear(cfg.n_embd, h, bias=False)
        self.w3 = nn.Linear(cfg.n_embd, h, bias=False)
        self.w2 = nn.Linear(h, cfg.n_embd, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    """Pre-norm residual block: x += Mixer(RMSNorm(x)); x += SwiGLU(RMSNorm(x))."""

    def __init__(self, cfg):
        super().__init__()
        self.norm1, self.norm2 = RMSNorm(cfg.n_embd), RMSNorm(cfg.n_embd)
        self.mixer = TrellisMixer(cfg) if cfg.mixer == "trellis" else AttentionMixer(cfg)
        self.mlp = SwiGLU(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x, state=None):
        y, state = self.mixer(self.norm1(x), state)
        x = x + self.drop(y)
        return x + self.drop(self.mlp(self.norm2(x))), state


class TrellisLM(nn.Module):
    """Token embeddings (tied with the output head), n_layer blocks, a final RMSNorm."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.norm_f = RMSNorm(cfg.n_embd)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # tied
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # nanoGPT: residual projections scaled by depth
            if name.endswith(("o_proj.weight", "w2.weight")):
                nn.init.normal_(p, 0.0, 0.02 / math.sqrt(2 * cfg.n_layer))
        for blk in self.blocks:
            if isinstance(blk.mixer, TrellisMixer):
                blk.mixer.init_gates()

    @staticmethod
    def _init_weights(mod):
        if isinstance(mod, (nn.Linear, nn.Embedding)):
            nn.init.normal_(mod.weight, 0.0, 0.02)
            if getattr(mod, "bias", None) is not None:
                nn.init.zeros_(mod.bias)

    def num_params(self, non_embedding=False):
        n = sum(p.numel() for p in self.parameters())  # the tied head is counted once
        return n - self.wte.weight.numel() if non_embedding else n

    def forward(self, idx, targets=None, state=None, at=None):
        """idx [B,T] -> logits [B,T,V], the mean cross-entropy if targets are given, and the
        generation state. With state=None (training, evaluation) no state is kept and the third
        value is None; with state=model.initial_state() a sequence starts, and with the state a
        call returned, that sequence continues. at: flat positions (into B*T) whose logits and
        loss alone are computed, [len(at), V] (the recall tasks' answers: the loss ignores the rest)."""
        if idx.dim() != 2 or idx.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"idx must be [B, T] integer token ids, got {tuple(idx.shape)} {idx.dtype}")
        x = self.wte(idx)  # [B,T,n]
        new_state = []
        for i, blk in enumerate(self.blocks):
            x, s = blk(x, None if state is None else state[i])
            new_state.append(s)
        x = self.norm_f(x)
        if at is not None:
            x = x.view(-1, x.shape[-1])[at]  # [N,n]
            targets = None if targets is None else targets.reshape(-1)[at]  # [N]
        logits = self.lm_head(x)  # [B,T,V] or [N,V]
        loss = None
        if targets is not None:
            wide = logits.to(torch.promote_types(logits.dtype, torch.float32))  # bf16 up, float64 kept
            loss = F.cross_entropy(wide.view(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-1)
        return logits, loss, new_state

    def initial_state(self):
        """The state of an empty sequence: each layer starts at its initial memories."""
        return [{} for _ in self.blocks]

    # -------------------------------------------------------------------------
    # 6. Generation with a constant-size state
    #
    # Generation computes, token by token, the function that training computed over the whole
    # sequence. Each layer carries what pass_loop carries (section 2): the exact rule needs only
    # the memories K and V, 2 m d numbers per head; the chunk-start rule also needs the memories
    # at the current chunk's start, twice that (sweeps s < C - 1: s + 2 memories each), plus the
    # position and the short convolutions' last inputs. None of it grows with the context;
    # attention carries a KV cache that grows by one token per step. trellis_continue (below
    # the model) absorbs a prompt's whole chunks with trellis_op (the kernel on CUDA) and steps
    # through the rest with pass_loop.

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, cuda_graph=True):
        """Absorb the prompt idx [B,T] and sample max_new_tokens tokens one at a time.
        On CUDA the Trellis step of an eval-mode model is replayed as a CUDA graph
        (DecodeGraph: the same kernels, no dropout)."""
        V = self.cfg.vocab_size
        if not isinstance(idx, torch.Tensor) or idx.dim() != 2 or idx.shape[1] == 0 or idx.is_floating_point():
            raise ValueError(f"idx must be a non-empty [B, T] tensor of token ids, got "
                             f"{tuple(idx.shape) if isinstance(idx, torch.Tensor) else type(idx).__name__}")
        if idx.min() < 0 or idx.max() >= V:
            raise ValueError(f"idx holds token ids outside [0, {V}) (min {idx.min().item()}, max {idx.max().item()}): "
                             f"encode the prompt with the model's tokenizer")
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
        if not (isinstance(temperature, (int, float)) and 0 < temperature < math.inf):
            raise ValueError(f"temperature must be a positive number, got {temperature!r}")
        if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
            raise ValueError(f"top_k must be None or an int >= 1, got {top_k!r}")
        logits, _, state = self(idx, state=self.initial_state())
        out, graph = [idx], None
        use_graph = cuda_graph and idx.is_cuda and self.cfg.mixer == "trellis" and not self.training
        for _ in range(max_new_tokens):
            logits = logits[:, -1, :].float() / temperature  # [B,V]
            if top_k is not None:
                kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
                logits = logits.masked_fill(logits < kth, -float("inf"))
            nxt = torch.multinomial(F.softmax(logits, dim=-1), 1)  # [B,1]
            out.append(nxt)
            if use_graph and graph is None:
                graph = DecodeGraph(self, nxt, state)
            if graph is not None:
                logits = graph.step(nxt)  # [B,1,V], overwritten by the next replay
            else:
                logits, _, state = self(nxt, state=state)
        return torch.cat(out, dim=1)


def trellis_continue(q, k, v, alpha, beta, gamma, state, *, chunk_size, sweeps, impl, **eps_phi_f):
    """Continue the sequence held in state = dict(K, V: levels [n,B,H,m,d] or a memory
    [B,H,m,d], pos: tokens so far) by the T tokens of q .. gamma ([B,T,H,*], as trellis_op).
    Returns o [B,T,H,d_v] and the new state. Whole chunks that start on a chunk boundary go
    through trellis_op; the tokens before and after them through pass_loop."""
    C, n = loop_levels(chunk_size, sweeps)
    K, V, pos = state["K"], state["V"], state["pos"]
    T = q.shape[1]
    head = min(T, -pos % C)  # tokens up to the next chunk boundary
    body = (T - head) // C * C  # whole chunks from there (the exact rule: C = 1, every token)
    if body < chunk_size:  # too short to gain from the chunked form: all token by token
        head, body = T, 0
    outs, t0 = [], 0
    opts = dict(chunk_size=chunk_size, sweeps=sweeps, **eps_phi_f)
    for t1, how in ((head, "loop"), (head + body, impl), (T, "loop")):
        if t1 > t0:
            part = [t[:, t0:t1] for t in (q, k, v, alpha, beta, gamma)]
            if how == "loop":
                o, K, V = _two_passes(*part, K, V, "loop", pos=pos + t0, **opts)
            else:  # at a chunk boundary every level holds the memory
                K, V = (S[-1] if S.dim() == 5 else S for S in (K, V))
                o, K, V = trellis_op(*part, K, V, impl=how, check_values=False, **opts)
            outs.append(o)
        t0 = t1
    K, V = (S if S.dim() == 5 else S.expand(n, *S.shape) for S in (K, V))  # [n,B,H,m,d]
    return torch.cat(outs, 1), dict(K=K, V=V, pos=pos + T)


class DecodeGraph:
    """One Trellis decode step captured as a CUDA graph and replayed for every new token.
    Possible because the state has the same shapes at every position (a growing KV cache
    would need a new graph per length); it removes the ~700 small launches of an eager step.
    Usage: g = DecodeGraph(model, tok, state); logits = g.step(tok) (the state lives in g)."""

    @torch.no_grad()
    def __init__(self, model, tok, state):
        if model.cfg.mixer != "trellis" or not tok.is_cuda:
            raise ValueError("DecodeGraph needs a Trellis model and tensors on a CUDA device")
        self.chunk = loop_levels(model.cfg.chunk_size, model.cfg.sweeps)[0]
        self.pos = state[0]["pos"]
        self.tok = tok.clone()  # [B,1]
        self.state = [{k: t.clone(memory_format=torch.contiguous_format) for k, t in layer.items() if k != "pos"}
                      for layer in state]
        # captured at a position inside a chunk, so the graph holds no chunk start: step() does it
        inside = [dict(layer, pos=1) for layer in self.state]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # one eager step first: lazy allocations stay out of the graph
            model(self.tok, state=inside)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits, _, new = model(self.tok, state=inside)  # [B,1,V]
            for layer, new_layer in zip(self.state, new):  # the step writes its state in place
                for k, t in layer.items():
                    t.copy_(new_layer[k])
        for layer in self.state:
            layer["pos"] = self.pos

    def step(self, tok):
        if self.pos % self.chunk == 0:  # a chunk starts: every level restarts from the memory (as in pass_loop)
            for layer in self.state:
                for S in (layer["K"], layer["V"]):
                    S[:-1].copy_(S[-1:].expand_as(S[:-1]))
        self.tok.copy_(tok)
        self.graph.replay()
        self.pos += 1
        for layer in self.state:
            layer["pos"] = self.pos
        return self.logits


def state_numel(state):
    """Numbers held by a generation state (list over layers of dicts of tensors)."""
    return sum(t.numel() for layer in state for t in layer.values() if isinstance(t, torch.Tensor))


# -----------------------------------------------------------------------------
# 7. Argument checks of trellis_op


def _check_operator_values(q, k, v, alpha, beta, gamma, K0, V0):
    """Raise ValueError for a non-finite input or a gate out of range (one host sync)."""
    named = dict(q=q, k=k, v=v, alpha=alpha, beta=beta, gamma=gamma, K0=K0, V0=V0)
    named = {name: t for name, t in named.items() if t is not None}
    with torch.no_grad():
        stats = torch.stack([t.isfinite().all() for t in named.values()] +
                            [(beta >= 0).all() & (beta <= 1).all(), (gamma >= 0).all() & (gamma < 2).all()]).tolist()
    bad = [name for ok, name in zip(stats[:len(named)], named) if not ok]
    if bad:
        raise ValueError(f"{', '.join(bad)} hold(s) NaN or inf: the operator needs finite inputs (check the values "
                         f"that produced them)")
    if not stats[-2]:
        raise ValueError(f"beta must lie in [0, 1] (a forget gate), got values in "
                         f"[{beta.min().item():.4g}, {beta.max().item():.4g}]: pass a sigmoid of the gate's logit")
    if not stats[-1]:
        raise ValueError(f"gamma must lie in [0, 2) (the step size; gamma ||w||^2 < 2 keeps a write contractive), "
                         f"got values in [{gamma.min().item():.4g}, {gamma.max().item():.4g}]")


def _check_operator_args(q, k, v, alpha, beta, gamma, K0, V0, phi, f, chunk_size, sweeps, phi_eps, f_eps, impl):
    """Raise ValueError naming the argument and the expected shape or value."""
    named = dict(q=q, k=k, v=v, alpha=alpha, beta=beta, gamma=gamma)
    for name, t in named.items():
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
    if q.dim() != 4:
        raise ValueError(f"q must be [B, T, H, d_k], got shape {tuple(q.shape)}")
    B, T, H, dk = q.shape
    dv = v.shape[-1] if v.dim() == 4 else None
    m = alpha.shape[-1] if alpha.dim() == 4 else None
    expected = dict(
        k=((B, T, H, dk), "[B, T, H, d_k] like q"),
        v=((B, T, H, dv), "[B, T, H, d_v]"),
        alpha=((B, T, H, m), "[B, T, H, m]"),
        beta=((B, T, H), "[B, T, H] (one forget gate per token and head)"),
        gamma=((B, T, H), "[B, T, H] (one step size per token and head)"),
    )
    for name, (shape, text) in expected.items():
        t = named[name]
        if None in shape or tuple(t.shape) != shape:
            want = tuple("?" if s is None else s for s in shape)
            raise ValueError(f"{name} must be {text} = {want}, got shape {tuple(t.shape)}")
    if T == 0 or dk == 0 or dv == 0 or m == 0:
        raise ValueError(f"empty dimension: T={T}, d_k={dk}, d_v={dv}, m={m} must all be >= 1")
    for name, t, d in (("K0", K0, dk), ("V0", V0, dv)):
        if t is None:
            continue
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor or None")
        if tuple(t.shape) != (B, H, m, d):
            raise ValueError(f"{name} must be [B, H, m, d] = {(B, H, m, d)}, got shape {tuple(t.shape)}")
    if phi not in PHI:
        raise ValueError(f"phi must be one of {sorted(PHI)}, got {phi!r}")
    if f not in F_MAP:
        raise ValueError(f"f must be one of {sorted(F_MAP)}, got {f!r}")
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be an int >= 1, got {chunk_size!r}")
    if not isinstance(sweeps, int) or sweeps < 0:
        raise ValueError(f"sweeps must be an int >= 0, got {sweeps!r}")
    for name, eps in (("phi_eps", phi_eps), ("f_eps", f_eps)):
        if not (isinstance(eps, (int, float)) and 0 < eps < math.inf):
            raise ValueError(f"{name} must be a positive number, got {eps!r}")
    if impl not in ("auto", "loop", "chunked", "kernel"):
        raise ValueError(f"impl must be 'auto', 'loop', 'chunked' or 'kernel', got {impl!r}")
