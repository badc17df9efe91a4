"""Trellis: key-value memory compressed into m slots by online gradient descent.

Karami, Behrouz, Kacham, Mirrokni, "Trellis: Learning to Compress Key-Value Memory in
Attention Models", COLM 2025 (arXiv 2512.23852). The equations are reconstructed in
../shared/TRELLIS.md; NOTES.md maps each one to the code below.

Read top to bottom, in the paper's order:
  1. phi and its error codes u = J_phi(z)^T (phi(z) - a)      (TRELLIS.md section 3)
  2. one memory pass, per-token loop                          (sections 3-4)
  3. one memory pass, chunked-parallel form with refinement   (section 6)
  4. the two-pass Trellis operator                            (section 4)
  5. the layer and the language model, generation             (section 8)

Glossary (code symbol -> paper symbol):
  W, w      write vectors w_t (k_t in the key pass, v_t in the value pass)
  A, a      slot codes alpha_t (the regression target), m per token
  S         a memory M (m x d): K (key memory) or V (value memory)
  z         M_{t-1} w_t, the memory's prediction of a_t
  u         error code J_phi(z)^T (phi(z) - a);  Ubar = diag(gamma) u
  beta      forget gate beta_t in (0, 1);  b = cumulative log beta inside a chunk
  gamma     inner step size gamma_t
  X         what a pass reads with: q_t (key pass, read M q) or r_t (value pass, M^T r)

Tensor layout of the public operator: [B, T, H, D] (batch, time, head, feature), as in
FlashAttention and fla. Memories are [B, H, m, d]. Gates beta, gamma are [B, T, H].
Inside the passes we use [B, H, T, D] so that heads act as batch for matmuls.
"""

import math

import torch
import torch.nn.functional as F

# eps of the LayerNorm inside normalized SiLU. At z = 0 (e.g. a zero memory) SiLU(z) has
# zero variance and the error code is scaled by 1/sqrt(eps); 1e-3 caps that gain at ~32
# instead of ~316 for LayerNorm's usual 1e-5. See NOTES.md, "zero-variance point".
NORM_EPS = 1e-3

# -----------------------------------------------------------------------------
# 1. phi, f and the error codes (TRELLIS.md section 3)


def silu_prime(z):
    """d silu / dz = sigma(z) (1 + z (1 - sigma(z)))."""
    s = torch.sigmoid(z)
    return s * (1 + z * (1 - s))


def norm_silu(z, eps=NORM_EPS):
    """LayerNorm(SiLU(z)) over the last (slot) dimension, no affine weights."""
    s = F.silu(z)
    mu = s.mean(-1, keepdim=True)
    var = (s - mu).pow(2).mean(-1, keepdim=True)
    return (s - mu) / torch.sqrt(var + eps)


def l2_silu(z, eps=1e-6):
    """SiLU(z) / ||SiLU(z)||_2 over the last dimension (the paper's other form of f)."""
    s = F.silu(z)
    return s * torch.rsqrt(s.pow(2).sum(-1, keepdim=True) + eps)


def code_identity(z, a):
    """phi = identity: u = z - a."""
    return z - a


def code_silu(z, a):
    """phi = SiLU (elementwise): u = silu'(z) * (silu(z) - a)."""
    return silu_prime(z) * (F.silu(z) - a)


def code_norm_silu(z, a, eps=NORM_EPS):
    """phi = LayerNorm(SiLU): u = silu'(z) * (e - mean(e) - y mean(e y)) / sigma_s."""
    s = F.silu(z)
    mu = s.mean(-1, keepdim=True)
    sd = torch.sqrt((s - mu).pow(2).mean(-1, keepdim=True) + eps)
    y = (s - mu) / sd
    e = y - a
    g = e - e.mean(-1, keepdim=True) - y * (e * y).mean(-1, keepdim=True)
    return silu_prime(z) * g / sd


# name -> (phi itself, its closed-form error code). phi itself is only used by the tests
# (the closed form must equal autograd of 1/2 ||phi(z) - a||^2).
PHI = {
    "identity": (lambda z: z, code_identity),
    "silu": (F.silu, code_silu),
    "norm_silu": (norm_silu, code_norm_silu),
}
# the map between the two passes, r_t = f(yhat_t) (TRELLIS.md section 4)
F_MAP = {"norm_silu": norm_silu, "l2_silu": l2_silu}


def error_code(phi, z, a):
    return PHI[phi][1](z, a)


# -----------------------------------------------------------------------------
# 2. One memory pass, per-token loop: the readable definition (sections 3-4)
#
#   z_t = M_anchor w_t                 anchor = M_{t-1} (exact) or the chunk-start state
#   u_t = gamma_t code(z_t, a_t)
#   M_t = beta_t M_{t-1} - u_t w_t^T   (write ...)
#   y_t = M_t x_t  or  M_t^T x_t       (... before read)


def pass_loop(W, A, beta, gamma, S, X, read, phi, chunk_size=1):
    """W [B,H,T,d], A [B,H,T,m], beta/gamma [B,H,T], S [B,H,m,d],
    X [B,H,T,d] if read == "q" (y = M x, m out) or [B,H,T,m] if read == "r" (y = M^T x).
    Returns Y [B,H,T,m or d] and the final memory [B,H,m,d]."""
    ys = []
    for t in range(W.shape[2]):
        if t % chunk_size == 0:
            anchor = S  # chunk_size = 1: the previous state, i.e. the exact recurrence
        w, a, x = W[:, :, t], A[:, :, t], X[:, :, t]  # [B,H,d], [B,H,m], [B,H,d|m]
        z = (anchor @ w[..., None])[..., 0]  # [B,H,m]
        u = gamma[:, :, t, None] * error_code(phi, z, a)  # [B,H,m]
        S = beta[:, :, t, None, None] * S - u[..., :, None] * w[..., None, :]
        if read == "q":
            ys.append((S @ x[..., None])[..., 0])  # [B,H,m]
        else:
            ys.append((S.transpose(-1, -2) @ x[..., None])[..., 0])  # [B,H,d]
    return torch.stack(ys, dim=2), S


# -----------------------------------------------------------------------------
# 3. One memory pass, chunked-parallel form (section 6)
#
# For a chunk with start state S, rows i = 1..c, b_i = sum_{j<=i} log beta_j:
#   Z    = W S^T,   Ubar = diag(gamma) code(Z, A)
#   Gam_ij = exp(b_i - b_j) (j <= i)
#   read q:  Y = diag(e^b) X S^T - ((X W^T) . Gam) Ubar
#   read r:  Y = diag(e^b) X S   - ((X Ubar^T) . Gam) W
#   S_end = e^{b_c} S - (Ubar . e^{b_c - b})^T W
# Refinement sweeps recompute Z from the rows above (exact after c - 1 sweeps):
#   Z <- diag(e^{b_{i-1}}) W S^T - ((W W^T) . Gam') Ubar,  Gam'_ij = exp(b_{i-1} - b_j) (j < i)


def _decay_matrix(row, col, mask):
    """exp(row_i - col_j) where mask, else 0; only non-positive exponents are evaluated."""
    diff = row[..., :, None] - col[..., None, :]  # [..., c, c]
    return torch.where(mask, torch.exp(diff.masked_fill(~mask, 0.0)), 0.0)


def pass_chunked(W, A, beta, gamma, S, X, read, phi, chunk_size=64, sweeps=0):
    """Same signature and result as pass_loop(..., chunk_size) when sweeps = 0;
    with sweeps >= chunk_size - 1 it equals the exact recurrence."""
    T = W.shape[2]
    log_beta = torch.log(beta)  # [B,H,T]; the caller keeps beta > 0
    ys = []
    for t0 in range(0, T, chunk_size):
        t1 = min(t0 + chunk_size, T)  # the last chunk may be partial
        c = t1 - t0
        w, a, x = W[:, :, t0:t1], A[:, :, t0:t1], X[:, :, t0:t1]  # [B,H,c,*]
        g = gamma[:, :, t0:t1, None]  # [B,H,c,1]
        lb = log_beta[:, :, t0:t1]  # [B,H,c]
        b = lb.cumsum(-1)  # [B,H,c]   b_i
        le = torch.ones(c, c, dtype=torch.bool, device=W.device).tril()
        Gam = _decay_matrix(b, b, le)  # [B,H,c,c]

        Z = w @ S.transpose(-1, -2)  # [B,H,c,m]   the chunk-start rule
        U = g * error_code(phi, Z, a)  # [B,H,c,m]   Ubar
        if sweeps > 0:
            b_prev = b - lb  # b_{i-1}, with b_0 = 0
            WW = (w @ w.transpose(-1, -2)) * _decay_matrix(b_prev, b, le.tril(-1))  # [B,H,c,c]
            Z0 = torch.exp(b_prev)[..., None] * Z
            for _ in range(min(sweeps, c - 1)):
                U = g * error_code(phi, Z0 - WW @ U, a)

        eb = torch.exp(b)[..., None]  # [B,H,c,1]
        if read == "q":
            y = eb * (x @ S.transpose(-1, -2)) - ((x @ w.transpose(-1, -2)) * Gam) @ U  # [B,H,c,m]
        else:
            y = eb * (x @ S) - ((x @ U.transpose(-1, -2)) * Gam) @ w  # [B,H,c,d]
        ys.append(y)
        to_end = torch.exp(b[..., -1:] - b)[..., None]  # [B,H,c,1]  e^{b_c - b_i}
        S = torch.exp(b[..., -1])[..., None, None] * S - (U * to_end).transpose(-1, -2) @ w
    return torch.cat(ys, dim=2), S


# -----------------------------------------------------------------------------
# 4. The two-pass Trellis operator (section 4)
#
#   key pass:   K_t from (k_t, alpha_t),  yhat_t = K_t q_t
#   between:    r_t = f(yhat_t)
#   value pass: V_t from (v_t, alpha_t),  o_t = V_t^T r_t


def _check_operator_args(q, k, v, alpha, beta, gamma, K0, V0, phi, f, chunk_size, sweeps):
    """Raise ValueError naming the argument and the expected shape."""
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


def trellis_op(q, k, v, alpha, beta, gamma, K0=None, V0=None, *, phi="norm_silu", f="norm_silu",
               chunk_size=64, sweeps=0, impl="chunked"):
    """The two-pass Trellis operator.

    q, k [B,T,H,d_k]; v [B,T,H,d_v]; alpha [B,T,H,m]; beta, gamma [B,T,H];
    K0 [B,H,m,d_k], V0 [B,H,m,d_v] (None = zeros).
    impl: "loop" (per-token; chunk_size sets the chunk-start rule, 1 = exact) or
          "chunked" (matrix form; sweeps refine toward exact) or "kernel" (Triton).
    Returns o [B,T,H,d_v] in v's dtype and the final memories K, V in float32
    (float64 if any input is float64).
    """
    _check_operator_args(q, k, v, alpha, beta, gamma, K0, V0, phi, f, chunk_size, sweeps)
    if impl == "kernel":
        import kernel  # only needed on this path; keeps trellis.py importable without triton

        return kernel.trellis_op_triton(q, k, v, alpha, beta, gamma, K0, V0, phi=phi, f=f,
                                        chunk_size=chunk_size, sweeps=sweeps)
    if impl not in ("loop", "chunked"):
        raise ValueError(f"impl must be 'loop', 'chunked' or 'kernel', got {impl!r}")

    B, T, H, dk = q.shape
    dv, m = v.shape[-1], alpha.shape[-1]
    tensors = [q, k, v, alpha, beta, gamma] + [t for t in (K0, V0) if t is not None]
    dt = torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32

    def heads_first(t):  # [B,T,H,*] -> [B,H,T,*] in the compute dtype (memories and gates fp32+)
        return t.to(dt).transpose(1, 2)

    qh, kh, vh, ah = map(heads_first, (q, k, v, alpha))  # [B,H,T,d_k|d_v|m]
    # beta is clamped away from 0 so that log beta is finite (sigmoid underflows below -88)
    bh = beta.to(dt).clamp_min(torch.finfo(dt).tiny).transpose(1, 2)  # [B,H,T]
    gh = gamma.to(dt).transpose(1, 2)  # [B,H,T]
    K = q.new_zeros(B, H, m, dk, dtype=dt) if K0 is None else K0.to(dt)
    V = q.new_zeros(B, H, m, dv, dtype=dt) if V0 is None else V0.to(dt)

    if impl == "loop":
        run = lambda *a: pass_loop(*a, chunk_size=chunk_size)  # noqa: E731
    else:
        run = lambda *a: pass_chunked(*a, chunk_size=chunk_size, sweeps=sweeps)  # noqa: E731
    yhat, K = run(kh, ah, bh, gh, K, qh, "q", phi)  # [B,H,T,m]
    r = F_MAP[f](yhat)  # [B,H,T,m]
    o, V = run(vh, ah, bh, gh, V, r, "r", phi)  # [B,H,T,d_v]
    return o.transpose(1, 2).to(v.dtype), K, V  # o: [B,T,H,d_v]
