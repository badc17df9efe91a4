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
from dataclasses import dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

# eps of the LayerNorm inside normalized SiLU, for f (between the passes) and for phi (the
# write's error code). LayerNorm is scale-invariant, so its Jacobian grows like 1/sigma as the
# memory's prediction z flattens (a decaying memory does this); 1/sqrt(eps) caps that gain.
# For phi the cap decides whether the write is a contraction: with eps = 1e-3 (gain up to ~32)
# gradients through the recurrence overflowed in training; eps = 1 keeps gamma J < 2. f only
# feeds a read, so it keeps a near-exact LayerNorm. NOTES.md, "the stall at context 1024".
NORM_EPS = 1e-3  # f
PHI_EPS = 1.0  # phi

# -----------------------------------------------------------------------------
# 1. phi, f and the error codes (TRELLIS.md section 3)


def silu_prime(z):
    """d silu / dz = sigma(z) (1 + z (1 - sigma(z)))."""
    s = torch.sigmoid(z)
    return s * (1 + z * (1 - s))


def norm_silu(z, eps=None):
    """LayerNorm(SiLU(z)) over the last (slot) dimension, no affine weights (eps: NORM_EPS)."""
    eps = NORM_EPS if eps is None else eps
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


def code_norm_silu(z, a, eps=None):
    """phi = LayerNorm(SiLU): u = silu'(z) * (e - mean(e) - y mean(e y)) / sigma_s (eps: PHI_EPS)."""
    eps = PHI_EPS if eps is None else eps
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
    "norm_silu": (lambda z: norm_silu(z, PHI_EPS), code_norm_silu),
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
    # the caller's autocast would run these matmuls in bf16: the memories must stay fp32
    with torch.autocast(q.device.type, enabled=False):
        yhat, K = run(kh, ah, bh, gh, K, qh, "q", phi)  # [B,H,T,m]
        r = F_MAP[f](yhat)  # [B,H,T,m]
        o, V = run(vh, ah, bh, gh, V, r, "r", phi)  # [B,H,T,d_v]
    return o.transpose(1, 2).to(v.dtype), K, V  # o: [B,T,H,d_v]


# -----------------------------------------------------------------------------
# 5. The layer and the language model (section 8)

@dataclass
class TrellisConfig:
    vocab_size: int = 50304  # GPT-2's 50257 padded to a multiple of 64
    n_layer: int = 4
    n_embd: int = 256
    n_head: int = 4  # head size n_embd / n_head = 64
    mixer: str = "trellis"  # "trellis" or "attention" (the same shell with causal softmax attention)
    dropout: float = 0.0
    # Trellis mixer; every default is justified in NOTES.md section 2
    slots: int = 64  # m
    phi: str = "norm_silu"  # write nonlinearity phi
    f: str = "norm_silu"  # map between the passes
    chunk_size: int = 64
    sweeps: int = 0  # 0 = the paper's chunk-start rule, chunk_size - 1 = exact
    impl: str = "auto"  # "auto" (kernel on CUDA, else chunked), "kernel", "chunked", "loop"
    short_conv: bool = True  # causal depthwise conv (width 4) + SiLU on q and k
    forget_gate: bool = True  # False: beta = 1 (the ablation)
    beta_init: float = 0.95  # initial forget gate, through the bias of its sigmoid
    gamma_max: float = 0.1  # gamma = gamma_max * sigmoid(.): bounds the C stale steps of a chunk
    gamma_init: float = 0.05  # initial inner step size, through the bias
    learned_init_memory: bool = True  # learned K0, V0 (else zeros)

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
        if not 0 < self.beta_init < 1:
            raise ValueError(f"TrellisConfig.beta_init must be in (0, 1), got {self.beta_init!r}")
        if not 0 < self.gamma_max < 2:  # gamma ||w||^2 < 2 for unit writes (TRELLIS.md section 5)
            raise ValueError(f"TrellisConfig.gamma_max must be in (0, 2), got {self.gamma_max!r}")
        if not 0 < self.gamma_init < self.gamma_max:
            raise ValueError(f"TrellisConfig.gamma_init must be in (0, gamma_max = {self.gamma_max}), "
                             f"got {self.gamma_init!r}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"TrellisConfig.dropout must be in [0, 1), got {self.dropout!r}")


def rms_norm(x, weight, eps=1e-6):
    return F.rms_norm(x, (x.shape[-1],), weight, eps)


class RMSNorm(nn.Module):
    def __init__(self, n):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(n))

    def forward(self, x):
        return rms_norm(x, self.weight)


class ShortConv(nn.Module):
    """Causal depthwise convolution over time (width 4) with a carried state of the last
    width - 1 inputs, so prefill and one-token steps compute the same thing."""

    def __init__(self, n, width=4):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n, 1, width).uniform_(-width**-0.5, width**-0.5))

    def forward(self, x, cache=None):  # x [B,T,n], cache [B,width-1,n] or None (zeros)
        width = self.weight.shape[-1]
        if cache is None:
            cache = x.new_zeros(x.shape[0], width - 1, x.shape[2])
        xp = torch.cat([cache.to(x.dtype), x], dim=1)  # [B, width-1+T, n]
        y = F.conv1d(xp.transpose(1, 2), self.weight.to(x.dtype), groups=x.shape[2])  # [B,n,T]
        return F.silu(y.transpose(1, 2)), xp[:, -(width - 1):]


def _operator_impl(impl, q, v, alpha, cfg):
    """"auto": the Triton kernel on CUDA when it supports the call, else the PyTorch chunked form."""
    if impl != "auto":
        return impl
    if q.is_cuda:
        import kernel

        if kernel.unsupported(q, v, alpha, cfg.phi, cfg.f, cfg.chunk_size, cfg.sweeps) is None:
            return "kernel"
    return "chunked"


def _gate(lin, x):
    """sigmoid(lin(x)) in float32 (float64 for a float64 model), also under bf16 autocast."""
    dt = torch.promote_types(x.dtype, torch.float32)
    with torch.autocast(x.device.type, enabled=False):
        return torch.sigmoid(F.linear(x.to(dt), lin.weight.to(dt), lin.bias.to(dt)))


class TrellisMixer(nn.Module):
    """x -> (q, k, v, alpha, beta, gamma) -> two-pass Trellis operator -> gated output.
    state (generation): memories K, V [B,H,m,d] and the two short-conv caches."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        n, H, m = cfg.n_embd, cfg.n_head, cfg.slots
        d = n // H
        self.q_proj, self.k_proj, self.v_proj = (nn.Linear(n, n, bias=False) for _ in range(3))
        self.q_conv = ShortConv(n) if cfg.short_conv else None
        self.k_conv = ShortConv(n) if cfg.short_conv else None
        self.alpha_proj = nn.Linear(n, H * m, bias=False)
        self.beta_proj = nn.Linear(n, H)
        self.gamma_proj = nn.Linear(n, H)
        # learned initial memories: rows ~ N(0, 1/d) so that z = K0 k ~ N(0, 1) for unit k
        init = lambda: nn.Parameter(torch.randn(H, m, d) * d**-0.5)  # noqa: E731
        self.K0, self.V0 = (init(), init()) if cfg.learned_init_memory else (None, None)
        self.o_norm = RMSNorm(d)
        self.g_proj = nn.Linear(n, n, bias=False)
        self.o_proj = nn.Linear(n, n, bias=False)

    def init_gates(self):
        """Set after the generic init: beta and gamma start at their configured values."""
        logit = lambda p: math.log(p / (1 - p))  # noqa: E731
        nn.init.zeros_(self.beta_proj.weight)
        nn.init.constant_(self.beta_proj.bias, logit(self.cfg.beta_init))
        nn.init.zeros_(self.gamma_proj.weight)
        nn.init.constant_(self.gamma_proj.bias, logit(self.cfg.gamma_init / self.cfg.gamma_max))

    def forward(self, x, state=None):
        cfg = self.cfg
        B, T, n = x.shape
        H, m = cfg.n_head, cfg.slots
        d = n // H
        state = state or {}
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)  # [B,T,n]
        new_state = {}
        if self.q_conv is not None:
            q, new_state["q_conv"] = self.q_conv(q, state.get("q_conv"))
            k, new_state["k_conv"] = self.k_conv(k, state.get("k_conv"))
        # L2-normalized per head: gamma ||w||^2 = gamma < 1 keeps every write a contraction
        q = F.normalize(q.view(B, T, H, d), dim=-1)  # [B,T,H,d]
        k = F.normalize(k.view(B, T, H, d), dim=-1)  # [B,T,H,d]
        v = F.normalize(v.view(B, T, H, d), dim=-1)  # [B,T,H,d]
        alpha = self.alpha_proj(x).view(B, T, H, m)  # [B,T,H,m]
        beta = _gate(self.beta_proj, x) if cfg.forget_gate else x.new_ones(B, T, H, dtype=torch.float32)
        gamma = self.cfg.gamma_max * _gate(self.gamma_proj, x)  # [B,T,H]
        if "K" in state:
            K0, V0 = state["K"], state["V"]
        elif self.K0 is not None:
            K0, V0 = self.K0.expand(B, H, m, d), self.V0.expand(B, H, m, d)
        else:
            K0 = V0 = None
        if "K" in state and T == 1:  # generation: the exact per-token update
            impl, C, sweeps = "loop", 1, 0
        else:
            impl, C, sweeps = _operator_impl(cfg.impl, q, v, alpha, cfg), cfg.chunk_size, cfg.sweeps
        o, new_state["K"], new_state["V"] = trellis_op(q, k, v, alpha, beta, gamma, K0, V0, phi=cfg.phi, f=cfg.f,
                                                       chunk_size=C, sweeps=sweeps, impl=impl)
        y = self.o_norm(o).reshape(B, T, n) * F.silu(self.g_proj(x))  # [B,T,H,d] -> [B,T,n]
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
            if T > 1:
                raise ValueError("AttentionMixer: extend a KV cache one token at a time")
            k, v = torch.cat([state["k"], k], 2), torch.cat([state["v"], v], 2)  # [B,H,pos0+1,d]
            # one query sees every cached position. Written out: SDPA may pick a backend that
            # re-plans for every new cache length (seen on an H100: ~55 ms per token, NOTES.md)
            dt = torch.promote_types(q.dtype, torch.float32)
            att = (q.to(dt) @ k.to(dt).transpose(-1, -2)) * q.shape[-1] ** -0.5  # [B,H,1,pos0+1]
            y = (att.softmax(-1) @ v.to(dt)).to(v.dtype)  # [B,H,1,d]
        else:
            p = self.cfg.dropout if self.training else 0.0
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=p)  # [B,H,T,d]
        return self.o_proj(y.transpose(1, 2).reshape(B, T, n)), {"k": k, "v": v}


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

    def forward(self, idx, targets=None, state=None):
        """idx [B,T] -> logits [B,T,V] (and the mean cross-entropy if targets are given).
        With state (from a previous call) the sequence continues; the new state is returned
        as the third value."""
        if idx.dim() != 2 or idx.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"idx must be [B, T] integer token ids, got {tuple(idx.shape)} {idx.dtype}")
        x = self.wte(idx)  # [B,T,n]
        new_state = []
        for i, blk in enumerate(self.blocks):
            x, s = blk(x, state[i] if state else None)
            new_state.append(s)
        logits = self.lm_head(self.norm_f(x))  # [B,T,V]
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().view(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-1)
        return logits, loss, new_state

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, cuda_graph=True):
        """Absorb the prompt idx [B,T] in chunked form, then sample one token at a time from
        the carried state: constant size for Trellis, a growing KV cache for attention.
        On CUDA the Trellis step of an eval-mode model is replayed as a CUDA graph (DecodeGraph:
        the same kernels, no dropout)."""
        logits, _, state = self(idx)
        out, graph = [idx], None
        use_graph = cuda_graph and idx.is_cuda and self.cfg.mixer == "trellis" and not self.training
        for _ in range(max_new_tokens):
            logits = logits[:, -1, :].float() / max(temperature, 1e-6)  # [B,V]
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


class DecodeGraph:
    """One Trellis decode step captured as a CUDA graph and replayed for every new token.
    Possible because the state has the same shapes at every position (a growing KV cache
    would need a new graph per length); it removes the ~700 small launches of an eager step.
    Usage: g = DecodeGraph(model, tok, state); logits = g.step(tok) (the state lives in g)."""

    @torch.no_grad()
    def __init__(self, model, tok, state):
        if model.cfg.mixer != "trellis" or not tok.is_cuda:
            raise ValueError("DecodeGraph needs a Trellis model and tensors on a CUDA device")
        self.tok = tok.clone()  # [B,1]
        self.state = [{k: t.clone() for k, t in layer.items()} for layer in state]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # one eager step first: lazy allocations stay out of the graph
            model(self.tok, state=self.state)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits, _, new = model(self.tok, state=self.state)  # [B,1,V]
            for layer, new_layer in zip(self.state, new):  # the step writes its state in place
                for k, t in layer.items():
                    t.copy_(new_layer[k])

    def step(self, tok):
        self.tok.copy_(tok)
        self.graph.replay()
        return self.logits


def state_numel(state):
    """Numbers held by a generation state (list over layers of dicts of tensors)."""
    return sum(t.numel() for layer in state for t in layer.values())
