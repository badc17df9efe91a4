"""Property tests: the forms of the Trellis operator agree, and the rest.

The sections follow trellis.py: (1) phi's error codes and the delta rule, (2)-(3) the per-token
loop and the chunked form with its refinement, (4) the operator's properties, (5) the model,
(6) generation, then the Triton kernels (kernel.py) and the training script (train_tiny.py).
Each test's docstring states the claim it checks.

    python -m pytest -q test_equivalence.py                        # CPU; the kernels in Triton's interpreter
    HYPOTHESIS_PROFILE=soak python -m pytest -q test_equivalence.py   # ten times the random examples
    TRITON_INTERPRET=0 python -m pytest -q test_equivalence.py -k kernel   # GPU: the compiled kernels
"""

import json
import math
import os
from dataclasses import dataclass, replace

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import trellis as tr

PHIS = sorted(tr.PHI)
FS = sorted(tr.F_MAP)

# -----------------------------------------------------------------------------
# random problems


@dataclass
class Problem:
    B: int
    T: int
    H: int
    dk: int
    dv: int
    m: int
    gates: str  # how beta is drawn: uniform, near0, near1, one, mixed
    zero_init: bool
    seed: int


@st.composite
def problems(draw, min_T=1, max_T=20, max_d=5):
    return Problem(
        B=draw(st.integers(1, 2)), T=draw(st.integers(min_T, max_T)), H=draw(st.integers(1, 2)),
        dk=draw(st.integers(1, max_d)), dv=draw(st.integers(1, max_d)), m=draw(st.integers(2, max_d)),
        gates=draw(st.sampled_from(["uniform", "near0", "near1", "one", "mixed"])),
        zero_init=draw(st.booleans()), seed=draw(st.integers(0, 2**31 - 1)),
    )


def draw_beta(gates, shape, g, dtype):
    u = torch.rand(shape, generator=g, dtype=dtype)
    choices = {
        "uniform": 0.05 + 0.95 * u,
        "near0": 10 ** (-8 + 6 * u),  # 1e-8 .. 1e-2
        "near1": 1 - 10 ** (-8 + 6 * u),
        "one": torch.ones(shape, dtype=dtype),
    }
    if gates != "mixed":
        return choices[gates]
    pick = torch.randint(0, 4, shape, generator=g)
    return torch.stack(list(choices.values()), -1).gather(-1, pick[..., None])[..., 0]


def make_inputs(p, dtype=torch.float64, requires_grad=False):
    """q, k, v, alpha, beta, gamma, K0, V0 for problem p; write vectors L2-normalized and
    scaled into (0.5, 1.2) so that gamma ||w||^2 < 2 (trellis.py, section 1)."""
    g = torch.Generator().manual_seed(p.seed)
    B, T, H = p.B, p.T, p.H

    def rn(*s):
        return torch.randn(*s, generator=g, dtype=dtype)

    def unit(*s):
        scale = 0.5 + 0.7 * torch.rand(*s[:-1], 1, generator=g, dtype=dtype)
        return F.normalize(rn(*s), dim=-1) * scale

    q, k, v = rn(B, T, H, p.dk), unit(B, T, H, p.dk), unit(B, T, H, p.dv)
    alpha = rn(B, T, H, p.m)
    beta = draw_beta(p.gates, (B, T, H), g, dtype)
    gamma = 0.02 + 0.96 * torch.rand(B, T, H, generator=g, dtype=dtype)
    K0 = torch.zeros(B, H, p.m, p.dk, dtype=dtype) if p.zero_init else 0.5 * rn(B, H, p.m, p.dk)
    V0 = torch.zeros(B, H, p.m, p.dv, dtype=dtype) if p.zero_init else 0.5 * rn(B, H, p.m, p.dv)
    ins = [q, k, v, alpha, beta, gamma, K0, V0]
    return [t.requires_grad_(requires_grad) for t in ins]


NAMES = ["q", "k", "v", "alpha", "beta", "gamma", "K0", "V0"]


GRAD_NAMES = ["dq", "dk", "dv", "dalpha", "dlogbeta", "dgamma", "dK0", "dV0"]


def outputs_and_grads(ins, seed, op=None, **kw):
    """(o, K, V) and the gradients of a random linear function of (o, K, V) w.r.t. every input,
    through op (default trellis_op)."""
    ins = [t.detach().clone().requires_grad_(True) for t in ins]
    outs = (op or tr.trellis_op)(*ins, **kw)
    g = torch.Generator().manual_seed(seed + 1)
    # cotangents drawn in float64 and rounded to bf16: the same numbers in every dtype
    loss = sum((o * torch.randn(o.shape, generator=g, dtype=torch.float64).bfloat16().to(o.device, o.dtype)).sum()
               for o in outs)
    grads = list(torch.autograd.grad(loss, ins))
    # beta enters the chunked form as log beta, so d beta = d(log beta) / beta carries an
    # absolute error ~ eps / beta at tiny beta. The model only uses beta dbeta (beta = sigmoid(x)
    # gives dx = dbeta beta (1 - beta)), so compare the gradient w.r.t. log beta.
    grads[4] = grads[4] * ins[4].detach()
    return [o.detach() for o in outs], grads


def assert_close(got, want, tol, what=""):
    """max |got - want| <= tol * max(1, max |want|): relative for large tensors, absolute near 0."""
    assert got.shape == want.shape, (what, got.shape, want.shape)
    assert torch.isfinite(got).all(), f"{what}: non-finite values"
    err = (got - want).abs().max().item()
    scale = max(1.0, want.abs().max().item())
    assert err <= tol * scale, f"{what}: max error {err:.3e} > {tol:.0e} x {scale:.3e}"


def assert_all_close(got, want, tol, names):
    for a, b, n in zip(got, want, names):
        assert_close(a, b, tol, n)


# -----------------------------------------------------------------------------
# 1. phi's error codes, and phi = identity is the delta rule


@given(seed=st.integers(0, 2**31 - 1), m=st.integers(2, 9), scale=st.sampled_from([0.0, 0.1, 1.0, 10.0]),
       phi=st.sampled_from(PHIS))
def test_error_code_equals_autograd(seed, m, scale, phi):
    """u = J_phi(z)^T (phi(z) - a) equals d/dz of 1/2 ||phi(z) - a||^2,
    including z = 0 (scale 0), the zero-variance point of normalized SiLU."""
    g = torch.Generator().manual_seed(seed)
    z = (scale * torch.randn(3, m, generator=g, dtype=torch.float64)).requires_grad_(True)
    a = torch.randn(3, m, generator=g, dtype=torch.float64)
    phi_fn, code = tr.PHI[phi]
    eps = tr.TrellisConfig().phi_eps
    (grad,) = torch.autograd.grad(0.5 * (phi_fn(z, eps) - a).pow(2).sum(), z)
    assert_close(code(z.detach(), a, eps), grad, 1e-12, phi)


@given(seed=st.integers(0, 2**31 - 1), m=st.integers(2, 9))
def test_f_forms_match_torch(seed, m):
    """f = LayerNorm(SiLU) matches torch's layer_norm; the L2 form points along
    SiLU(z) with norm at most 1 (its eps only matters when SiLU(z) is tiny)."""
    z = torch.randn(4, m, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    eps = tr.TrellisConfig().f_eps
    want = F.layer_norm(F.silu(z), (m,), eps=eps)
    assert_close(tr.norm_silu(z, eps), want, 1e-12, "norm_silu")
    r = tr.l2_silu(z)
    assert_close(F.normalize(r, dim=-1), F.normalize(F.silu(z), dim=-1), 1e-12, "l2_silu direction")
    assert (r.norm(dim=-1) <= 1).all()


def delta_rule_reference(q, k, v, alpha, beta, gamma, K0, V0, f):
    """The (gated) delta rule written independently of trellis.py: per (batch, head), explicit
    matrices, S <- S (beta I - gamma w w^T) + gamma a w^T (beta = 1: the delta rule)."""
    B, T, H, _ = q.shape
    o = torch.zeros(B, T, H, v.shape[-1], dtype=q.dtype)
    Ks, Vs = K0.clone(), V0.clone()
    for bi in range(B):
        for h in range(H):
            K, V = K0[bi, h].clone(), V0[bi, h].clone()
            for t in range(T):
                bt, gt, a = beta[bi, t, h], gamma[bi, t, h], alpha[bi, t, h]
                kt, vt = k[bi, t, h], v[bi, t, h]
                K = K @ (bt * torch.eye(len(kt), dtype=q.dtype) - gt * torch.outer(kt, kt)) + gt * torch.outer(a, kt)
                V = V @ (bt * torch.eye(len(vt), dtype=q.dtype) - gt * torch.outer(vt, vt)) + gt * torch.outer(a, vt)
                y = K @ q[bi, t, h]
                s = F.silu(y)
                r = F.layer_norm(s, s.shape, eps=1e-3) if f == "norm_silu" else s / torch.sqrt((s * s).sum() + 1e-6)
                o[bi, t, h] = V.T @ r
            Ks[bi, h], Vs[bi, h] = K, V
    return o, Ks, Vs


@given(p=problems(max_T=12), f=st.sampled_from(FS), gated=st.booleans())
def test_identity_phi_is_delta_rule(p, f, gated):
    """With phi = identity the exact recurrence is the delta rule
    S <- S (I - gamma w w^T) + gamma a w^T (beta = 1), and its gated form with beta < 1."""
    q, k, v, alpha, beta, gamma, K0, V0 = make_inputs(p)
    if not gated:
        beta = torch.ones_like(beta)
    want = delta_rule_reference(q, k, v, alpha, beta, gamma, K0, V0, f)
    for impl in ("loop", "chunked"):
        got = tr.trellis_op(q, k, v, alpha, beta, gamma, K0, V0, phi="identity", f=f, chunk_size=1, impl=impl)
        assert_all_close(got, want, 1e-10, [f"{n} {impl}" for n in ("o", "K", "V")])


# -----------------------------------------------------------------------------
# 2-3. the per-token loop and the chunked form: the same function at every chunk size, exact with C - 1 sweeps


@given(p=problems(), C=st.integers(1, 8), phi=st.sampled_from(PHIS), f=st.sampled_from(FS))
def test_chunked_equals_loop_same_chunk_rule(p, C, phi, f):
    """The chunked matrix form equals the per-token loop with z_t from the
    chunk-start state, for every C and T (partial last chunk): outputs, final states and
    the gradients w.r.t. every input, initial states included."""
    ins = make_inputs(p)
    want, gwant = outputs_and_grads(ins, p.seed, phi=phi, f=f, chunk_size=C, impl="loop")
    got, ggot = outputs_and_grads(ins, p.seed, phi=phi, f=f, chunk_size=C, impl="chunked")
    assert_all_close(got, want, 1e-9, ["o", "K", "V"])
    assert_all_close(ggot, gwant, 1e-8, GRAD_NAMES)


@given(p=problems(), C=st.integers(1, 8), phi=st.sampled_from(PHIS))
def test_exact_modes_equal_recurrence(p, C, phi):
    """With C - 1 refinement sweeps the chunked form is the exact per-token recurrence for
    every C; so is chunk_size = 1 in both forms."""
    ins = make_inputs(p)
    want, gwant = outputs_and_grads(ins, p.seed, phi=phi, chunk_size=1, impl="loop")
    for kw in (dict(chunk_size=C, sweeps=C - 1), dict(chunk_size=C, sweeps=C + 3), dict(chunk_size=1)):
        got, ggot = outputs_and_grads(ins, p.seed, phi=phi, impl="chunked", **kw)
        assert_all_close(got, want, 1e-9, [f"{n} {kw}" for n in ("o", "K", "V")])
        assert_all_close(ggot, gwant, 1e-8, [f"{n} {kw}" for n in GRAD_NAMES])


@given(p=problems(max_T=12), phi=st.sampled_from(PHIS))
def test_sweeps_make_rows_exact_one_at_a_time(p, phi):
    """After n sweeps the first n + 1 rows of a chunk are exact."""
    ins = make_inputs(p)
    C = p.T
    exact = tr.trellis_op(*ins, phi=phi, chunk_size=1, impl="loop")[0]
    for n in range(C):
        got = tr.trellis_op(*ins, phi=phi, chunk_size=C, sweeps=n, impl="chunked")[0]
        assert_close(got[:, : n + 1], exact[:, : n + 1], 1e-9, f"rows <= {n} after {n} sweeps")


@given(seed=st.integers(0, 2**31 - 1), m=st.integers(2, 9), scale=st.sampled_from([0.0, 0.1, 1.0, 10.0]),
       phi=st.sampled_from(PHIS))
def test_code_vjp_equals_autograd(seed, m, scale, phi):
    """code_vjp, the closed-form product J_code^T du of trellis.py's backward (B3), equals
    autograd through error_code, at z = 0 (zero variance) and at large z too."""
    g = torch.Generator().manual_seed(seed)
    z = (scale * torch.randn(3, m, generator=g, dtype=torch.float64)).requires_grad_(True)
    a = torch.randn(3, m, generator=g, dtype=torch.float64, requires_grad=True)
    du = torch.randn(3, m, generator=g, dtype=torch.float64)
    want = torch.autograd.grad(tr.error_code(phi, z, a, 0.3), (z, a), du)
    got = tr.code_vjp(phi, z.detach(), a.detach(), du, 0.3)
    assert_all_close(got, want, 1e-12, ["dz", "da"])


@given(p=problems(max_T=14), C=st.integers(1, 6), phi=st.sampled_from(PHIS), read=st.sampled_from(["q", "r"]),
       exact=st.booleans())
def test_backward_derivation_equals_autograd(p, C, phi, read, exact):
    """pass_chunked_grads, trellis.py's derivation of the backward (B1-B6) in PyTorch, equals
    autograd of pass_chunked for one pass: every input's gradient, with a gradient arriving at
    the reads and at the final memory, both rules, gates at extremes."""
    q, W, _, alpha, beta, gamma, S0, _ = make_inputs(p)  # the key pass: W = k, S0 = K0
    q, W, alpha, beta, gamma = (t.transpose(1, 2) for t in (q, W, alpha, beta, gamma))  # [B,H,T,*], [B,H,T]
    X = q if read == "q" else torch.randn(alpha.shape, generator=torch.Generator().manual_seed(p.seed),
                                          dtype=alpha.dtype)
    ins = [t.clone().requires_grad_(True) for t in (W, alpha, beta, gamma, S0, X)]
    sweeps = C - 1 if exact else 0
    Y, S = tr.pass_chunked(*ins[:5], ins[5], read, phi, 0.5, chunk_size=C, sweeps=sweeps)
    g = torch.Generator().manual_seed(p.seed + 1)
    dY, dS = torch.randn(Y.shape, generator=g, dtype=Y.dtype), torch.randn(S.shape, generator=g, dtype=S.dtype)
    want = list(torch.autograd.grad((Y * dY).sum() + (S * dS).sum(), ins))
    want[2] = want[2] * beta  # the gradient w.r.t. log beta (see outputs_and_grads)
    got = tr.pass_chunked_grads(W, alpha, beta, gamma, S0, X, read, phi, 0.5, C, exact, dY, dS)
    assert_all_close(got, want, 1e-9, ["dW", "dA", "dlogbeta", "dgamma", "dS0", "dX"])


# -----------------------------------------------------------------------------
# 4. the operator: causality, state carry, gradients, extremes, autocast, bad input


@given(p=problems(), C=st.integers(1, 6), sweeps=st.integers(0, 5), phi=st.sampled_from(PHIS),
       t=st.integers(0, 19), impl=st.sampled_from(["loop", "chunked"]))
def test_causality(p, C, sweeps, phi, t, impl):
    """Output t' < t does not depend on any input at time t."""
    t = t % p.T
    ins = make_inputs(p)
    kw = dict(phi=phi, chunk_size=C, sweeps=sweeps, impl=impl)
    o1 = tr.trellis_op(*ins, **kw)[0]
    ins2 = [x.clone() for x in ins]
    g = torch.Generator().manual_seed(p.seed + 7)
    for i, x in enumerate(ins2[:6]):  # every per-token input at time t (beta kept in [0, 1])
        delta = torch.rand(x[:, t].shape, generator=g, dtype=x.dtype) * 0.3
        x[:, t] = x[:, t] * (1 - delta) if i == 4 else x[:, t] + delta
    o2 = tr.trellis_op(*ins2, **kw)[0]
    assert torch.equal(o1[:, :t], o2[:, :t])
    assert not torch.equal(o1[:, t:], o2[:, t:])  # the perturbation does reach time t


@given(p=problems(min_T=2), C=st.integers(1, 6), split=st.integers(0, 100), phi=st.sampled_from(PHIS),
       impl=st.sampled_from(["loop", "chunked"]))
def test_state_carry(p, C, split, phi, impl):
    """Running [0, s) then [s, T) from the first call's final states equals
    one call: at any s in exact mode, at chunk boundaries s = jC for the chunk-start rule."""
    q, k, v, alpha, beta, gamma, K0, V0 = make_inputs(p)

    def run(lo, hi, K, V, kw):
        sl = slice(lo, hi)
        return tr.trellis_op(q[:, sl], k[:, sl], v[:, sl], alpha[:, sl], beta[:, sl], gamma[:, sl], K, V,
                             phi=phi, impl=impl, **kw)

    def check(kw, s):
        o, K, V = run(0, p.T, K0, V0, kw)
        o1, K1, V1 = run(0, s, K0, V0, kw)
        o2, K2, V2 = run(s, p.T, K1, V1, kw)
        assert_all_close([torch.cat([o1, o2], 1), K2, V2], [o, K, V], 1e-9, [f"{n} split {s} {kw}" for n in "oKV"])

    exact = dict(chunk_size=C, sweeps=C - 1) if impl == "chunked" else dict(chunk_size=1)
    check(exact, 1 + split % (p.T - 1))
    boundaries = range(C, p.T, C)
    if len(boundaries):
        check(dict(chunk_size=C), boundaries[split % len(boundaries)])


@pytest.mark.parametrize("phi", PHIS)
@pytest.mark.parametrize("impl,C,sweeps", [("loop", 1, 0), ("loop", 2, 0), ("chunked", 2, 0), ("chunked", 3, 1)])
def test_gradcheck(phi, impl, C, sweeps):
    """The autograd gradients of both forms, through z in the error codes,
    agree with finite differences (float64)."""
    p = Problem(B=1, T=5, H=1, dk=2, dv=3, m=3, gates="uniform", zero_init=False, seed=3)
    ins = make_inputs(p, requires_grad=True)
    fn = lambda *a: tr.trellis_op(*a, phi=phi, chunk_size=C, sweeps=sweeps, impl=impl)  # noqa: E731
    assert torch.autograd.gradcheck(fn, ins, eps=1e-6, atol=1e-5, rtol=1e-4)


def _finite_fwd_bwd(ins, **kw):
    ins = [t.detach().clone().requires_grad_(True) for t in ins]
    o, K, V = tr.trellis_op(*ins, **kw)
    (o.square().mean() + K.square().mean() + V.square().mean()).backward()
    for name, t in zip(["o", "K", "V"] + GRAD_NAMES, [o, K, V] + [x.grad for x in ins]):
        assert torch.isfinite(t).all(), f"{name} has NaN/Inf with {kw}"


@pytest.mark.parametrize("impl", ["loop", "chunked"])
@pytest.mark.parametrize("phi", PHIS)
def test_finite_zero_memory_and_gate_extremes(impl, phi):
    """Zero initial memory (z = 0: normalized SiLU at zero variance), beta -> 0
    (including 0 and sigmoid underflow), beta = 1, gamma at its ends, in float32."""
    p = Problem(B=2, T=37, H=2, dk=8, dv=8, m=8, gates="uniform", zero_init=True, seed=11)
    q, k, v, alpha, beta, gamma, K0, V0 = make_inputs(p, dtype=torch.float32)
    for b in (torch.zeros_like(beta), torch.full_like(beta, 1e-38), torch.full_like(beta, 1e-6),
              torch.ones_like(beta), torch.where(torch.rand_like(beta) < 0.5, 1e-30, 1.0)):
        for g in (gamma, torch.full_like(gamma, 1e-6), torch.full_like(gamma, 0.999)):
            _finite_fwd_bwd([q, k, v, alpha, b, g, K0, V0], phi=phi, chunk_size=8, impl=impl)


@pytest.mark.parametrize("phi", PHIS)
def test_finite_long_context_float32(phi):
    """T = 4096 in float32, chunked form, nonzero memory: finite outputs and gradients,
    and the memory stays bounded (L2-normalized writes, gamma < 1: a contraction)."""
    p = Problem(B=1, T=4096, H=2, dk=16, dv=16, m=16, gates="near1", zero_init=False, seed=5)
    ins = make_inputs(p, dtype=torch.float32)
    _finite_fwd_bwd(ins, phi=phi, chunk_size=64, impl="chunked")
    _, K, V = tr.trellis_op(*ins, phi=phi, chunk_size=64, impl="chunked")
    assert K.abs().max() < 1e3 and V.abs().max() < 1e3


@pytest.mark.parametrize("impl", ["loop", "chunked"])
@pytest.mark.parametrize("phi", PHIS)
def test_finite_scaled_inputs(impl, phi):
    """Queries and slot codes x100 are harmless for every phi; writes x100
    are harmless for normalized SiLU, whose error code is bounded (identity and SiLU need
    gamma ||w||^2 < 2, which the layer guarantees by L2-normalizing k and v)."""
    p = Problem(B=1, T=50, H=2, dk=8, dv=8, m=8, gates="uniform", zero_init=False, seed=9)
    q, k, v, alpha, beta, gamma, K0, V0 = make_inputs(p, dtype=torch.float32)
    _finite_fwd_bwd([100 * q, k, v, 100 * alpha, beta, gamma, 100 * K0, V0], phi=phi, chunk_size=8, impl=impl)
    if phi == "norm_silu":
        _finite_fwd_bwd([q, 100 * k, 100 * v, alpha, beta, gamma, K0, V0], phi=phi, chunk_size=8, impl=impl)


@pytest.mark.parametrize("impl,sweeps", [("loop", 0), ("chunked", 0), ("chunked", 7)])
def test_operator_ignores_bf16_autocast(impl, sweeps):
    """Memories and gate arithmetic stay float32 under a caller's bf16 autocast
    (the operator's matmuls must not be downcast): same result as without autocast."""
    p = Problem(B=1, T=40, H=2, dk=8, dv=8, m=8, gates="uniform", zero_init=False, seed=8)
    ins = make_inputs(p, dtype=torch.float32)
    want = tr.trellis_op(*ins, chunk_size=8, sweeps=sweeps, impl=impl)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = tr.trellis_op(*ins, chunk_size=8, sweeps=sweeps, impl=impl)
    assert all(g.dtype == torch.float32 for g in got)
    assert_all_close(got, want, 1e-6, ["o", "K", "V"])


def _good():
    return dict(zip(NAMES, make_inputs(Problem(2, 5, 3, 4, 6, 7, "uniform", False, 0), dtype=torch.float32)))


BAD = {
    "q rank": (lambda a: a.update(q=a["q"][0]), "q must be [B, T, H, d_k]"),
    "k batch": (lambda a: a.update(k=a["k"][:1]), "k must be"),
    "v time": (lambda a: a.update(v=a["v"][:, :4]), "v must be"),
    "alpha heads": (lambda a: a.update(alpha=a["alpha"][:, :, :2]), "alpha must be"),
    "k dim": (lambda a: a.update(k=a["k"][..., :3]), "k must be"),
    "v rank": (lambda a: a.update(v=a["v"][0]), "v must be"),
    "beta shape": (lambda a: a.update(beta=a["beta"][..., None]), "beta must be"),
    "gamma shape": (lambda a: a.update(gamma=a["gamma"][:, :3]), "gamma must be"),
    "q dtype": (lambda a: a.update(q=a["q"].long()), "q must be a floating-point"),
    "beta dtype": (lambda a: a.update(beta=a["beta"] > 0.5), "beta must be a floating-point"),
    "not a tensor": (lambda a: a.update(v=a["v"].tolist()), "v must be a torch.Tensor"),
    "K0 shape": (lambda a: a.update(K0=a["K0"][..., :3]), "K0 must be"),
    "V0 slots": (lambda a: a.update(V0=a["V0"][:, :, :5]), "V0 must be"),
    "V0 dtype": (lambda a: a.update(V0=a["V0"].int()), "V0 must be a floating-point"),
    "empty T": (lambda a: a.update({n: a[n][:, :0] for n in NAMES[:6]}), "empty dimension"),
    "beta above 1": (lambda a: a["beta"].__setitem__((0, 2, 1), 1.01), "beta must lie in [0, 1]"),
    "beta below 0": (lambda a: a["beta"].__setitem__((1, 0, 0), -0.1), "beta must lie in [0, 1]"),
    "gamma 2": (lambda a: a["gamma"].__setitem__((0, 4, 0), 2.0), "gamma must lie in [0, 2"),
    "gamma below 0": (lambda a: a["gamma"].__setitem__((0, 4, 0), -1e-3), "gamma must lie in [0, 2"),
    "NaN in k": (lambda a: a["k"].__setitem__((0, 3, 1, 0), math.nan), "k hold"),
    "inf in alpha": (lambda a: a["alpha"].__setitem__((1, 1, 0, 0), math.inf), "alpha hold"),
    "NaN in K0": (lambda a: a["K0"].__setitem__((0, 0, 0, 0), math.nan), "K0 hold"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_tensor_raises(case):
    """Every input rule of trellis_op: a ValueError naming the argument."""
    mutate, msg = BAD[case]
    a = _good()
    mutate(a)
    for impl in ("loop", "chunked"):
        with pytest.raises(ValueError, match=msg.replace("[", r"\[")):
            tr.trellis_op(*[a[n] for n in NAMES], impl=impl)


@pytest.mark.parametrize("kw,msg", [
    (dict(phi="tanh"), "phi must be one of"), (dict(f="softmax"), "f must be one of"),
    (dict(chunk_size=0), "chunk_size must be"), (dict(chunk_size=2.5), "chunk_size must be"),
    (dict(sweeps=-1), "sweeps must be"), (dict(impl="cuda"), "impl must be"),
])
def test_bad_option_raises(kw, msg):
    """Every option rule of trellis_op: a ValueError naming the option."""
    a = _good()
    with pytest.raises(ValueError, match=msg):
        tr.trellis_op(*[a[n] for n in NAMES], **kw)


# -----------------------------------------------------------------------------
# 5. the layer and the language model


def tiny_config(**kw):
    base = dict(vocab_size=61, n_layer=2, n_embd=24, n_head=2, slots=5, chunk_size=4)
    base.update(kw)
    return tr.TrellisConfig(**base)


def tiny_model(seed=0, **kw):
    torch.manual_seed(seed)
    return tr.TrellisLM(tiny_config(**kw)).double().eval()


@pytest.mark.parametrize("kw", [dict(mixer="trellis"), dict(mixer="attention"), dict(mixer="trellis", phi="identity"),
                                dict(mixer="trellis", short_conv=False, learned_init_memory=False)])
def test_model_forward_backward(kw):
    """The model trains on CPU: finite loss, and a nonzero gradient reaches every parameter."""
    torch.manual_seed(0)
    model = tr.TrellisLM(tiny_config(**kw))
    idx = torch.randint(0, 61, (3, 10))
    _, loss, _ = model(idx, targets=torch.roll(idx, -1, 1))
    assert torch.isfinite(loss) and abs(loss.item() - math.log(61)) < 1.0  # near uniform at init
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"no gradient reaches {name}"


@given(seed=st.integers(0, 2**31 - 1), t=st.integers(1, 11), mixer=st.sampled_from(["trellis", "attention"]),
       sweeps=st.integers(0, 3))
def test_model_causality(seed, t, mixer, sweeps):
    """Changing tokens at positions >= t leaves the logits before t unchanged."""
    model = tiny_model(seed, mixer=mixer, sweeps=sweeps)
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, 61, (2, 12), generator=g)
    idx2 = idx.clone()
    idx2[:, t:] = torch.randint(0, 61, idx2[:, t:].shape, generator=g)
    a, b = model(idx)[0], model(idx2)[0]
    assert_close(a[:, :t], b[:, :t], 1e-12, "logits before t")


def test_alpha_norm_puts_the_target_in_phis_range(monkeypatch):
    """With alpha_norm every token's target has mean 0 and mean square 1 over the slots (the
    range of normalized SiLU, closed); without it the projection's alpha is passed as it is. The
    decoding of such a model equals its forward (the same function in every path)."""
    seen = []
    real = tr.trellis_op
    monkeypatch.setattr(tr, "trellis_op", lambda *a, **k: seen.append(a[3]) or real(*a, **k))
    idx = torch.randint(0, 61, (2, 9), generator=torch.Generator().manual_seed(0))
    for norm in (True, False):
        seen.clear()
        model = random_gates(tiny_model(0, alpha_norm=norm, gamma_max=1.0), 0)
        with torch.no_grad():
            for blk in model.blocks:  # a projection far from unit scale
                blk.mixer.in_proj.weight.mul_(30.0)
        full = model(idx)[0].log_softmax(-1)
        alpha = seen[0]
        means, squares = alpha.mean(-1), alpha.pow(2).mean(-1)
        if norm:
            assert means.abs().max() < 1e-9 and (squares - 1).abs().max() < 1e-4
        else:
            assert (squares - 1).abs().max() > 0.5
        got, _ = decode(model, idx[:, :4], idx[:, 4:])
        assert_close(got.log_softmax(-1), full, 1e-9, "log-probs")


def test_state_dict_round_trip():
    """A saved state_dict loaded into another model reproduces the first model's logits exactly."""
    import io

    model = tiny_model(0)
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    other = tiny_model(1)
    idx = torch.randint(0, 61, (2, 9))
    assert not torch.equal(model(idx)[0], other(idx)[0])
    other.load_state_dict(torch.load(io.BytesIO(buf.getvalue())))
    assert torch.equal(model(idx)[0], other(idx)[0])


def test_attention_baseline_parameter_count_matches():
    """The attention shell's parameter count is within 5% of the Trellis shell's (in fact within
    1%, non-embedding parameters included)."""
    for kw in (dict(), dict(n_embd=384, n_head=6, n_layer=6), dict(slots=32)):
        a = tr.TrellisLM(tr.TrellisConfig(mixer="attention", **kw))
        t = tr.TrellisLM(tr.TrellisConfig(mixer="trellis", **kw))
        assert abs(a.num_params(True) / t.num_params(True) - 1) < 0.01, kw


@pytest.mark.parametrize("kw,field", [
    (dict(slots=0), "slots"), (dict(slots=-3), "slots"), (dict(phi="tanh"), "phi"), (dict(f="softmax"), "f"),
    (dict(n_embd=30, n_head=4), "n_embd"), (dict(mixer="mamba"), "mixer"), (dict(chunk_size=0), "chunk_size"),
    (dict(sweeps=-1), "sweeps"), (dict(beta_init=1.0), "beta_init"), (dict(impl="cuda"), "impl"),
    (dict(n_layer=2.5), "n_layer"), (dict(phi_eps=0.0), "phi_eps"), (dict(f_eps=-1.0), "f_eps"),
])
def test_bad_config_raises(kw, field):
    """Every TrellisConfig rule: a ValueError naming the field."""
    with pytest.raises(ValueError, match=rf"TrellisConfig\.{field}"):
        tr.TrellisConfig(**kw)


def test_bad_token_input_raises():
    """Float input to the model: a ValueError that says token ids are expected."""
    with pytest.raises(ValueError, match="idx must be"):
        tiny_model(0)(torch.randn(2, 5))


# -----------------------------------------------------------------------------
# 6. generation with a constant-size state


def decode(model, prompt, new_tokens):
    """Logits for prompt then new_tokens fed one at a time from the carried state."""
    logits, _, state = model(prompt, state=model.initial_state())
    out = [logits]
    for t in range(new_tokens.shape[1]):
        logits, _, state = model(new_tokens[:, t:t + 1], state=state)
        out.append(logits)
    return torch.cat(out, 1), state


def random_gates(model, seed):
    """Gate weights drawn at random, so that beta and gamma vary from token to token (at init
    they are constant) and the rules' codes differ (float64: the differences are far above 1e-9)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for blk in model.blocks:
            if isinstance(blk.mixer, tr.TrellisMixer):
                w = blk.mixer.gate_proj.weight
                w.copy_(torch.randn(w.shape, generator=g, dtype=w.dtype))
    return model


@given(seed=st.integers(0, 2**31 - 1), P=st.integers(1, 13), N=st.integers(1, 7), C=st.integers(1, 5),
       rule=st.sampled_from(["chunk-start", "exact", "between"]), mixer=st.sampled_from(["trellis", "attention"]),
       phi=st.sampled_from(PHIS))
def test_decode_equals_full_forward(seed, P, N, C, rule, mixer, phi):
    """Prefill of any length (mid-chunk too) then token-by-token decoding gives the log-probs of
    one full forward pass, for the chunk-start rule, the exact rule and sweeps in between;
    likewise for the KV cache."""
    sweeps = {"chunk-start": 0, "exact": C - 1, "between": max(0, C - 3)}[rule]
    model = random_gates(tiny_model(seed, mixer=mixer, phi=phi, chunk_size=C, sweeps=sweeps, gamma_max=1.0), seed)
    idx = torch.randint(0, 61, (2, P + N), generator=torch.Generator().manual_seed(seed))
    full = model(idx)[0].log_softmax(-1)
    got, state = decode(model, idx[:, :P], idx[:, P:])
    assert_close(got.log_softmax(-1), full, 1e-9, f"{mixer} {rule} log-probs")
    if mixer == "trellis":
        assert state[0]["pos"] == P + N


def test_decode_rule_matters():
    """The check above has teeth: decoding a chunk-start model with the exact step (what
    generation did before it carried the chunk's start memory) differs from its forward."""
    model = random_gates(tiny_model(0, chunk_size=4, sweeps=0, gamma_max=1.0), 0)
    idx = torch.randint(0, 61, (2, 10), generator=torch.Generator().manual_seed(0))
    full = model(idx)[0].log_softmax(-1)
    exact = replace(model.cfg, sweeps=3)
    for blk in model.blocks:
        blk.mixer.cfg = exact
    got, _ = decode(model, idx[:, :3], idx[:, 3:])
    assert (got.log_softmax(-1) - full).abs().max() > 1e-4


def test_generation_state_is_constant_size():
    """The Trellis state has the same size after 10 and after 300 tokens: per head and layer
    2 m d numbers for the exact rule, twice that for the chunk-start rule (the chunk's start
    memories), plus the short-conv caches; a KV cache grows."""
    sizes = {}
    for mixer, sweeps in (("trellis", 0), ("trellis", 3), ("attention", 0)):
        model = tiny_model(0, mixer=mixer, sweeps=sweeps).float()
        idx = torch.randint(0, 61, (1, 300))
        _, _, state = model(idx[:, :1], state=model.initial_state())
        for t in range(1, 300):
            _, _, state = model(idx[:, t:t + 1], state=state)
            if t + 1 in (10, 300):
                sizes[mixer, sweeps, t + 1] = tr.state_numel(state)
    cfg = tiny_config()
    memories = cfg.n_layer * 2 * cfg.n_head * cfg.slots * (cfg.n_embd // cfg.n_head)
    convs = cfg.n_layer * 2 * 3 * cfg.n_embd
    assert sizes["trellis", 3, 10] == sizes["trellis", 3, 300] == memories + convs  # chunk_size 4: exact
    assert sizes["trellis", 0, 10] == sizes["trellis", 0, 300] == 2 * memories + convs
    assert sizes["attention", 0, 300] == 30 * sizes["attention", 0, 10]
    out = tiny_model(0).float().generate(idx[:, :7], max_new_tokens=5, temperature=0.8, top_k=10)
    assert out.shape == (1, 12) and torch.equal(out[:, :7], idx[:, :7])


def test_decode_graph_refuses_what_it_cannot_capture():
    """A CUDA graph needs CUDA tensors and a state of fixed shape (Trellis, not a KV cache)."""
    for mixer in ("trellis", "attention"):
        model = tiny_model(0, mixer=mixer).eval()
        logits, _, state = model(torch.zeros(1, 3, dtype=torch.long), state=model.initial_state())
        with pytest.raises(ValueError, match="Trellis model and tensors on a CUDA device"):
            tr.DecodeGraph(model, logits[:, -1:].argmax(-1), state)


@pytest.mark.parametrize("kw,msg", [
    (dict(idx=torch.zeros(1, 0, dtype=torch.long)), "idx must be a non-empty"),
    (dict(idx=torch.full((1, 3), 61)), r"token ids outside \[0, 61\)"),
    (dict(idx=torch.full((1, 3), -1)), r"token ids outside"),
    (dict(idx=torch.zeros(1, 3)), "idx must be a non-empty"),
    (dict(max_new_tokens=-1), "max_new_tokens must be"),
    (dict(temperature=0.0), "temperature must be"), (dict(temperature=float("nan")), "temperature must be"),
    (dict(top_k=0), "top_k must be"), (dict(top_k=2.5), "top_k must be"),
])
def test_generate_refuses_bad_arguments(kw, msg):
    """generate(): an empty prompt, ids outside the vocabulary, a negative length, a temperature
    that is not positive, a top_k below 1: a ValueError that names the argument."""
    args = dict(idx=torch.zeros(1, 3, dtype=torch.long), max_new_tokens=2, temperature=1.0, top_k=None)
    args.update(kw)
    with pytest.raises(ValueError, match=msg):
        tiny_model(0).generate(**args)


# -----------------------------------------------------------------------------
# kernel.py: the Triton kernels equal the PyTorch forms. In the CPU interpreter by default


# (conftest.py sets TRITON_INTERPRET=1); compiled on the GPU with TRITON_INTERPRET=0.

KERNEL_DEVICE = "cuda" if os.environ.get("TRITON_INTERPRET") == "0" and torch.cuda.is_available() else "cpu"
ON_GPU = KERNEL_DEVICE == "cuda"
# Compiled, each new size, option or integer argument's specialization is a new set of kernels
# (seconds each). On the GPU the properties therefore draw few examples of fixed sizes, so that a
# newly started machine compiles a bounded set; the interpreter, which compiles nothing, draws any size.
gpu_bounded = settings(max_examples=6) if ON_GPU else (lambda fn: fn)


def kernel_problems():
    if not ON_GPU:
        return problems(max_T=40, max_d=20)
    return st.builds(Problem, B=st.integers(1, 2), T=st.just(37), H=st.just(2), dk=st.just(5), dv=st.just(3),
                     m=st.just(7), gates=st.sampled_from(["uniform", "near0", "near1", "one", "mixed"]),
                     zero_init=st.booleans(), seed=st.integers(0, 2**31 - 1))


def kernel_op(*ins, phi="norm_silu", f="norm_silu", **kw):
    """The Triton operator with IEEE fp32 dots (TF32 would round operands to 10 bits on a GPU;
    the interpreter's fp32 dots are exact either way) and the model's epsilons."""
    import kernel

    cfg = tr.TrellisConfig()
    return kernel.trellis_op_triton(*ins, phi=phi, f=f, phi_eps=cfg.phi_eps, f_eps=cfg.f_eps, precision="ieee", **kw)


def kernel_sizes(p, even):
    """p, or p with d_k = d_v = m = 16: the kernel's other variant, whose sizes equal their
    power-of-two blocks and are compiled in (no padding, no masks on slots or columns)."""
    return replace(p, dk=16, dv=16, m=16) if even else p


def on_kernel_device(ins):
    return [t.to(KERNEL_DEVICE) for t in ins]


def as_reference(ts):
    """float64 copies on the CPU, for the PyTorch reference and for comparisons."""
    return [t.detach().double().cpu() for t in ts]


@gpu_bounded
@given(p=kernel_problems(), even=st.booleans(), C=st.sampled_from([16, 32]),
       runs=st.sampled_from([1, 2, 3]), phi=st.sampled_from(PHIS), f=st.sampled_from(FS))
def test_kernel_equals_chunked_form(p, even, C, runs, phi, f):
    """The Triton forward and hand-written backward equal the float64 PyTorch chunked form on the
    same inputs: outputs, final states and the gradients of every input, with odd d_k, d_v, m
    (masked) or power-of-two ones, T not a multiple of C, gates at extremes, nonzero initial
    states, and the backward in one run of chunks or several (dS handed from run to run)."""
    p = kernel_sizes(p, even)
    ins = make_inputs(p, dtype=torch.float32)
    want, gwant = outputs_and_grads(as_reference(ins), p.seed, phi=phi, f=f, chunk_size=C, impl="chunked")
    got, ggot = outputs_and_grads(on_kernel_device(ins), p.seed, op=kernel_op, phi=phi, f=f, chunk_size=C,
                                  runs=runs)
    assert_all_close(as_reference(got), want, 2e-4, ["o", "K", "V"])
    assert_all_close(as_reference(ggot), gwant, 2e-4, GRAD_NAMES)


@gpu_bounded
@given(p=kernel_problems(), even=st.booleans(), C=st.sampled_from([16, 32]),
       extra=st.sampled_from([0, 5]), runs=st.sampled_from([1, 2, 3]), phi=st.sampled_from(PHIS),
       f=st.sampled_from(FS))
def test_kernel_exact_equals_recurrence(p, even, C, extra, runs, phi, f):
    """With sweeps >= C - 1 the kernel runs the exact recurrence (the fixed point solved inside
    each chunk, and the transposed system in the backward): it equals the float64 per-token
    loop, outputs, final states and every gradient."""
    p = kernel_sizes(p, even)
    ins = make_inputs(p, dtype=torch.float32)
    want, gwant = outputs_and_grads(as_reference(ins), p.seed, phi=phi, f=f, chunk_size=1, impl="loop")
    got, ggot = outputs_and_grads(on_kernel_device(ins), p.seed, op=kernel_op, phi=phi, f=f, chunk_size=C,
                                  sweeps=C - 1 + extra, runs=runs)
    assert_all_close(as_reference(got), want, 2e-4, ["o", "K", "V"])
    assert_all_close(as_reference(ggot), gwant, 2e-4, GRAD_NAMES)


@pytest.mark.parametrize("sweeps", [0, 15])
def test_kernel_finite_at_extremes(sweeps):
    """Zero memories (normalized SiLU at zero variance), beta = 0 and beta = 1 in the kernel, for
    the chunk-start and the exact rule: finite outputs and gradients, equal to the float64
    chunked form."""
    p = Problem(B=1, T=40, H=2, dk=16, dv=16, m=16, gates="uniform", zero_init=True, seed=2)
    q, k, v, alpha, beta, gamma, K0, V0 = make_inputs(p, dtype=torch.float32)
    for b in (torch.zeros_like(beta), torch.ones_like(beta)):
        ins = [q, k, v, alpha, b, gamma, K0, V0]
        want, _ = outputs_and_grads(as_reference(ins), 0, chunk_size=16, sweeps=sweeps, impl="chunked")
        got, ggot = outputs_and_grads(on_kernel_device(ins), 0, op=kernel_op, chunk_size=16, sweeps=sweeps)
        assert all(torch.isfinite(g).all() for g in got + ggot)
        assert_all_close(as_reference(got), want, 2e-4, ["o", "K", "V"])


@pytest.mark.parametrize("sweeps", [0, 15])
def test_kernel_up_to_256_slots(sweeps):
    """m between 129 and 256 (chunk_size 16, d <= 64, 8 warps, 256-wide tiles with padded slots
    masked): the kernel equals the float64 reference, outputs, final states and every gradient,
    for the chunk-start rule (the chunked form) and the exact one (the per-token loop)."""
    import kernel

    p = Problem(B=1, T=37, H=2, dk=24, dv=40, m=200, gates="mixed", zero_init=False, seed=6)
    ins = make_inputs(p, dtype=torch.float32)
    assert kernel.default_warps(p.m) == (8, 8)
    ref = dict(chunk_size=1, impl="loop") if sweeps else dict(chunk_size=16, impl="chunked")
    want, gwant = outputs_and_grads(as_reference(ins), p.seed, **ref)
    got, ggot = outputs_and_grads(on_kernel_device(ins), p.seed, op=kernel_op, chunk_size=16, sweeps=sweeps)
    assert_all_close(as_reference(got), want, 2e-4, ["o", "K", "V"])
    assert_all_close(as_reference(ggot), gwant, 2e-4, GRAD_NAMES)


@pytest.mark.parametrize("phi", PHIS)
def test_kernel_bf16_inputs(phi):
    """bf16 q, k, v, alpha with fp32 memories: the kernel equals the float64 chunked form on
    the same (bf16-rounded) inputs, bf16 results to bf16 rounding and fp32 ones to 5e-6: the
    IEEE dots split each fp32 partner of a bf16 tile into three bf16 terms (two would leave
    errors of 1e-5)."""
    p = Problem(B=2, T=45, H=2, dk=16, dv=32, m=16, gates="mixed", zero_init=False, seed=4)
    ins = make_inputs(p, dtype=torch.float32)
    ins[:4] = [t.bfloat16() for t in ins[:4]]
    want, gwant = outputs_and_grads(as_reference(ins), 4, phi=phi, chunk_size=16, impl="chunked")
    got, ggot = outputs_and_grads(on_kernel_device(ins), 4, op=kernel_op, phi=phi, chunk_size=16)
    assert got[0].dtype == torch.bfloat16 and got[1].dtype == torch.float32
    for x, ref, n in zip(got + ggot, want + gwant, ["o", "K", "V"] + GRAD_NAMES):
        assert_close(x.detach().double().cpu(), ref, 1e-2 if x.dtype == torch.bfloat16 else 5e-6, n)


@pytest.mark.parametrize("sweeps", [0, 15])
def test_model_with_kernel_equals_chunked(sweeps, monkeypatch):
    """The model dispatches to the kernel with its real tensors (views, expanded initial
    memories): the same logits and parameter gradients as the PyTorch chunked form, for the
    chunk-start rule and the exact recurrence (kernel dots in IEEE fp32)."""
    import kernel

    monkeypatch.setattr(kernel, "DEFAULT_PRECISION", "ieee")
    results = []
    for impl in ("chunked", "kernel"):
        torch.manual_seed(0)
        model = tr.TrellisLM(tiny_config(n_embd=32, n_head=2, slots=16, chunk_size=16, sweeps=sweeps, impl=impl))
        model = model.to(KERNEL_DEVICE)
        idx = torch.randint(0, 61, (2, 37), generator=torch.Generator().manual_seed(1)).to(KERNEL_DEVICE)
        logits, loss, _ = model(idx, targets=torch.roll(idx, -1, 1))
        loss.backward()
        results.append(as_reference([logits] + [p.grad for p in model.parameters()]))
    names = ["logits"] + [n for n, _ in model.named_parameters()]
    assert_all_close(results[1], results[0], 1e-4, names)


@gpu_bounded
@given(seed=st.integers(0, 2**31 - 1), B=st.integers(1, 3), T=st.integers(1, 140), size=st.integers(1, 40),
       groups=st.integers(1, 3), norm=st.booleans(), gap=st.sampled_from([0, 3]))
def test_kernel_short_conv_equals_conv1d(seed, B, T, size, groups, norm, gap):
    """kernel.short_conv_silu (the layer's causal conv + SiLU on CUDA, with or without each
    head's unit L2 norm) equals ShortConv's PyTorch form in float64: outputs and the gradients
    of x and of the weight, for T below and across the kernel's 64-row blocks, heads of any size
    (padded to a power of two) or channels in blocks of 64, and x a view with a row stride wider
    than its channels (a slice of the layer's projection).

    Within 1e-5, or within twice the error of ShortConv itself in float32 on the same inputs: a
    one-channel head's norm s / sqrt(s^2 + 1e-12) turns from -1 to 1 within |s| ~ 1e-6, so near
    there float32's rounding of the convolution alone moves the gradients by more than 1e-5."""
    import kernel

    C, head = groups * size, size if norm else None
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(B, T, C + gap, generator=g)
    w = torch.randn(C, 1, 4, generator=g)
    cot = torch.randn(B, T, C, generator=g)

    def reference(dtype):  # ShortConv's y and the gradients of x and of the weight, in dtype
        conv = tr.ShortConv(C).to(dtype)
        conv.weight = torch.nn.Parameter(w.to(dtype))
        x = base[..., :C].to(dtype).requires_grad_(True)
        y = conv(x, head=head)[0]
        return as_reference([y, *torch.autograd.grad(y, (x, conv.weight), cot.to(dtype))])

    want, fp32 = reference(torch.float64), reference(torch.float32)
    xb = base.to(KERNEL_DEVICE).requires_grad_(True)
    wk = w.to(KERNEL_DEVICE).requires_grad_(True)
    got = kernel.short_conv_silu(xb[..., :C], wk[:, 0], head)
    ggot = torch.autograd.grad(got, (xb, wk), cot.to(KERNEL_DEVICE))
    for a, b, c, name in zip(as_reference([got, ggot[0][..., :C], ggot[1]]), want, fp32, ["y", "dx", "dw"]):
        err, err32 = (a - b).abs().max().item(), (c - b).abs().max().item()
        assert err <= max(1e-5 * max(1.0, b.abs().max().item()), 2 * err32), (name, err, err32)
    assert (ggot[0][..., C:] == 0).all()


H100_SHARED_MEMORY = 232448  # bytes one program may use on an H100 (227 KiB)


def kernel_shared_memory(C, m, d, phi="norm_silu", f="norm_silu", exact=False, num_warps=None, dtype="fp32"):
    """Bytes of shared memory each kernel needs at chunk size C, m slots and d_k = d_v = d, with
    q, k, v, alpha in `dtype` ("fp32" or "bf16", whose dots differ), compiled for sm_90 with
    Triton's bundled ptxas: no GPU needed. Needs TRITON_INTERPRET unset or 0 (the interpreter
    compiles nothing). num_warps None: kernel.default_warps(m)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    import kernel

    seq, par, grads, prep = kernel._launch_config(d, d, m, C, phi, f, 1.0, 1e-3, exact, "tf32",
                                                  num_warps or kernel.default_warps(m))  # eps size nothing
    out = {}
    kernels = [(kernel._state_fwd_kernel, seq), (kernel._read_fwd_kernel, par), (kernel._read_bwd_value_kernel, par),
               (kernel._read_bwd_key_kernel, par), (kernel._state_bwd_kernel, dict(seq, PREP=False)),
               (kernel._state_grads_kernel, grads)]
    if not exact:  # the backward in runs: the walk reads _code_prep_kernel's terms
        kernels += [(kernel._code_prep_kernel, prep), (kernel._state_bwd_kernel, dict(seq, PREP=True))]
    for fn, launch in kernels:
        warps, stages = launch["num_warps"], launch["num_stages"]
        consts = {k: v for k, v in launch.items() if k in fn.arg_names and k not in ("DK", "DV", "M")}
        ints = ("T", "H", "NC", "C0", "NCS", "DK", "DV", "M")
        inputs = ("q", "k", "v", "al", "do", "o", "dq", "dkf", "dvf", "dal")  # in the inputs' dtype
        sig = {a: "constexpr" if a in consts else "i32" if a in ints else f"*{dtype}" if a in inputs else "*fp32"
               for a in fn.arg_names}
        src = ASTSource(fn=fn, signature=sig, constexprs={(fn.arg_names.index(k),): v for k, v in consts.items()})
        compiled = triton.compile(src, target=GPUTarget("cuda", 90, 128),
                                  options=dict(num_warps=warps, num_stages=stages))
        name = fn.__name__ + (" (prep)" if launch.get("PREP") else "")
        out[name] = compiled.metadata.shared
    return out


HOPPER_SIZES = [(64, 64, 64, False), (64, 64, 64, True), (32, 128, 128, False), (32, 128, 128, True),
                (16, 256, 64, False), (16, 256, 64, True), (64, 128, 64, False)]  # (C, m, d, exact); the last refused
_hopper_compile = []


def start_hopper_compile():
    """Compile HOPPER_SIZES for sm_90 in a background process (ptxas takes minutes on the CPU).
    conftest.py starts it when the test is collected, so that it runs on the core that the
    interpreter tests leave free."""
    import subprocess
    import sys

    if not _hopper_compile:
        code = ("import json, test_equivalence as t; "
                "print(json.dumps([max(t.kernel_shared_memory(C, m, d, exact=e).values()) "
                f"for C, m, d, e in {HOPPER_SIZES!r}]))")
        env = {**os.environ, "TRITON_INTERPRET": "0"}
        _hopper_compile.append(subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE,
                                                stderr=subprocess.PIPE, text=True,
                                                cwd=os.path.dirname(os.path.abspath(__file__))))
    return _hopper_compile[0]


def test_hopper_shared_memory_fits_the_accepted_sizes():
    """The largest sizes kernel.unsupported accepts (d, m <= 64 at C = 64; up to 128 at C = 32;
    m = 256 with d = 64 at C = 16) fit an H100's shared memory, in both rules and at every warp
    count kernel.default_warps picks, compiled for sm_90 by Triton's bundled ptxas (no GPU
    needed) with fp32 inputs (bf16 inputs take the same or less: their input tiles are half the
    size); the smallest size it refuses at C = 64 would not fit; m over 256, or over 128 beside
    C > 16 or d > 64, is refused."""
    import kernel

    run = start_hopper_compile()
    out, err = run.communicate(timeout=1200)
    assert run.returncode == 0, err[-2000:]
    *accepted, refused = json.loads(out.strip().splitlines()[-1])
    assert max(accepted) <= H100_SHARED_MEMORY < refused
    probe = lambda d, m: tuple(torch.empty(1, 1, 1, n, device=KERNEL_DEVICE) for n in (d, d, m))  # noqa: E731
    assert kernel.unsupported(*probe(64, 64), "norm_silu", "norm_silu", 64, 0) is None
    assert kernel.unsupported(*probe(128, 128), "norm_silu", "norm_silu", 32, 31) is None
    assert kernel.unsupported(*probe(64, 256), "norm_silu", "norm_silu", 16, 15) is None
    assert "needs chunk_size 16 or 32" in kernel.unsupported(*probe(64, 128), "norm_silu", "norm_silu", 64, 0)
    for d, m, C in [(64, 256, 32), (128, 256, 16), (64, 257, 16)]:
        assert f"m={m} is not supported" in kernel.unsupported(*probe(d, m), "norm_silu", "norm_silu", C, 0)


def test_train_tiny_names_why_the_operator_falls_back():
    """train_tiny's kernel_unsupported (behind --impl kernel's error and the note printed when
    --impl auto falls back to the PyTorch form on a GPU): None for the default model, the
    reason for 256 slots at chunk size 64."""
    import train_tiny

    assert train_tiny.kernel_unsupported(tr.TrellisConfig(), KERNEL_DEVICE) is None
    why = train_tiny.kernel_unsupported(tr.TrellisConfig(slots=256), KERNEL_DEVICE)
    assert "m=256 is not supported" in why and "chunk_size 16" in why


def test_kernel_default_warps():
    """4 warps, but 8 for m > 128 (registers), in both rules."""
    import kernel

    assert kernel.default_warps(64) == kernel.default_warps(128) == (4, 4)
    assert kernel.default_warps(200) == kernel.default_warps(256) == (8, 8)


def test_check_refuses_an_unknown_case_label():
    """kernel.check(only=...) names a label it does not have, and the labels it has, before any work."""
    import kernel

    with pytest.raises(ValueError, match=r"no case named \['nope'\].*'fp32 ieee'"):
        kernel.check(device="cpu", only=["nope"])


def test_check_in_parallel_reports_what_it_reports_in_one_process(capsys):
    """kernel.check(parallel=True), one process a case: the same table rows and worst errors as
    one process."""
    import kernel

    device = KERNEL_DEVICE
    serial = kernel.check(device, only=["fp32 ieee odd"])
    rows = capsys.readouterr().out.splitlines()
    parallel = kernel.check(device, only=["fp32 ieee odd"], parallel=True)
    assert capsys.readouterr().out.splitlines() == rows
    assert parallel == serial


@pytest.mark.parametrize("argv,msg", [
    (["--T", "1k"], "--T takes comma-separated sequence lengths"),
    (["--T", "0,-5"], "--T takes comma-separated sequence lengths"),
    (["--T", "65536"], "--T takes comma-separated sequence lengths"),
    (["--against", "no_such_kernel.py"], "--against 'no_such_kernel.py' is not a file"),
    (["--against", "kernel.py", "no_such_kernel.py"], "--against 'no_such_kernel.py' is not a file"),
    ([], "--device cuda needs a CUDA GPU"),
])
def test_benchmark_command_bad_input_is_one_line(argv, msg):
    """python kernel.py with a bad length, a missing --against file or, where torch sees no GPU
    (none made visible here), --device cuda: exit code 2 and one line that says what is wrong, no
    traceback."""
    import subprocess
    import sys

    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    run = subprocess.run([sys.executable, "kernel.py", *argv], capture_output=True, text=True, timeout=300, env=env,
                         cwd=os.path.dirname(os.path.abspath(__file__)))
    assert run.returncode == 2
    assert run.stderr.startswith("kernel.py: " + msg) and run.stderr.count("\n") == 1, run.stderr
    assert run.stdout == ""


def test_kernel_default_runs():
    """The backward in 4 runs of chunks when its B*H*2 sequential programs leave at least half of
    the multiprocessors to the read kernels, else (or off the GPU) in one."""
    import kernel

    assert kernel.default_runs(32, 132) == kernel.default_runs(66, 132) == 4
    assert kernel.default_runs(67, 132) == kernel.default_runs(512, 132) == kernel.default_runs() == 1
    assert kernel._runs(5, 8) == [(0, 1), (1, 1), (2, 1), (3, 1), (4, 1)]
    assert kernel._runs(10, 3) == [(0, 3), (3, 3), (6, 4)]


@pytest.mark.parametrize("kw,msg", [
    (dict(sweeps=1), "sweeps=1 is not supported"), (dict(chunk_size=8), "chunk_size must be 16, 32 or 64"),
    (dict(chunk_size=48), "chunk_size must be"),
])
def test_kernel_unsupported_options_raise(kw, msg):
    """Options outside the kernel's design (partial sweeps, other chunk sizes): a ValueError that says which."""
    a = _good()
    with pytest.raises(ValueError, match="kernel: " + msg):
        tr.trellis_op(*[a[n] for n in NAMES], impl="kernel", **{"chunk_size": 16, **kw})


def test_kernel_unsupported_inputs_raise():
    """float64 inputs and feature sizes over 128: a ValueError that says which."""
    a = _good()
    with pytest.raises(ValueError, match="kernel: float64"):
        tr.trellis_op(*[a[n].double() for n in NAMES], impl="kernel", chunk_size=16)
    p = Problem(B=1, T=3, H=1, dk=130, dv=4, m=4, gates="uniform", zero_init=False, seed=0)
    with pytest.raises(ValueError, match="kernel: d_k=130"):
        tr.trellis_op(*make_inputs(p, dtype=torch.float32), impl="kernel", chunk_size=16)


# -----------------------------------------------------------------------------
# train_tiny.py, end to end on the CPU


def _text_file(tmp_path):
    """$TRELLIS_DATA (tiny Shakespeare in CI) when set, else a made-up text."""
    path = os.environ.get("TRELLIS_DATA")
    if path and os.path.isfile(path):
        return path
    path = tmp_path / "text.txt"
    path.write_text("".join(f"LINE {i % 17}: the quick brown fox jumps over the lazy dog.\n" for i in range(3000)))
    return str(path)


def _train_argv(tmp_path, *extra):
    return ["--device", "cpu", "--data", _text_file(tmp_path), "--cache-dir", str(tmp_path / "cache"),
            "--out-dir", str(tmp_path / "out"), "--tokenizer", "char", "--batch-size", "8", "--block-size", "32",
            "--n-layer", "1", "--n-embd", "32", "--n-head", "2", "--slots", "8", "--chunk-size", "8",
            "--eval-iters", "4", "--sample-tokens", "20", "--lr", "3e-3", "--warmup-iters", "5", *extra]


def _run(tmp_path, *extra):
    import train_tiny

    return train_tiny.main(_train_argv(tmp_path, *extra))


def _exit(capsys, fn, *a):
    """Run fn(*a), which must stop with SystemExit: (exit code, what it printed on stderr)."""
    with pytest.raises(SystemExit) as e:
        fn(*a)
    return e.value.code, capsys.readouterr().err


def _files(folder):
    """name -> bytes of every file in folder (to show that nothing was written)."""
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())} if folder.exists() else {}


def test_train_tiny_runs_and_resumes(tmp_path):
    """A few iterations end to end: the loss goes down, ckpt.pt and best.pt are written, and
    --resume continues with summary.json holding the whole history."""
    first = _run(tmp_path, "--max-iters", "40", "--eval-interval", "20")
    vals = [h["val"] for h in first["history"]]
    assert [h["iter"] for h in first["history"]] == [0, 20, 40]
    assert vals[-1] < vals[0] - 0.3, vals  # from ~ln(65) = 4.2 toward the character statistics
    ckpt_path = tmp_path / "out" / "ckpt.pt"
    assert torch.load(ckpt_path, weights_only=False)["iter_num"] == 40
    best = torch.load(tmp_path / "out" / "best.pt", weights_only=False)
    assert best["best_val_loss"] == min(vals) and best["iter_num"] == 20 * vals.index(min(vals))
    assert len(first["sample"]) > 0

    second = _run(tmp_path, "--max-iters", "50", "--resume")
    assert [h["iter"] for h in second["history"]] == [0, 20, 40, 50]  # eval interval kept from the checkpoint
    assert second["best_val_loss"] <= first["best_val_loss"]
    summary = json.load(open(tmp_path / "out" / "summary.json"))
    assert [h["iter"] for h in summary["history"]] == [0, 20, 40, 50] and summary["train_tokens_per_s"] > 0


def test_train_tiny_resume_of_a_finished_run_keeps_its_summary(tmp_path):
    """--resume of a finished run trains nothing and keeps the history and the throughput."""
    first = _run(tmp_path, "--max-iters", "20", "--eval-interval", "10", "--sample-tokens", "0")
    again = _run(tmp_path, "--resume", "--sample-tokens", "0")
    assert again["history"] == first["history"] and again["iters"] == 20
    assert again["train_tokens_per_s"] == pytest.approx(first["train_tokens_per_s"])


@pytest.mark.parametrize("flag", [["--n-layer", "2"], ["--n-embd", "64"], ["--tokenizer", "gpt2"], ["--slots", "4"],
                                  ["--phi", "identity"], ["--mixer", "attention"], ["--no-forget-gate"],
                                  ["--beta-init", "0.99"]])
def test_train_tiny_resume_refuses_conflicting_model_flags(tmp_path, capsys, flag):
    """The checkpoint's model and tokenizer are authoritative: a flag that differs is refused with
    one line naming it, exit code 2, and no file is touched."""
    _run(tmp_path, "--max-iters", "10", "--eval-interval", "10", "--sample-tokens", "0")
    before = _files(tmp_path / "out")
    code, err = _exit(capsys, _run, tmp_path, "--resume", *flag)
    assert code == 2 and err.count("\n") == 1 and flag[0] in err and "Traceback" not in err
    assert _files(tmp_path / "out") == before


def test_train_tiny_resume_refuses_other_parameter_names(tmp_path, capsys):
    """A checkpoint whose parameters are named differently (another layout of the layer) is
    refused with one line naming them, exit code 2, and no file is touched."""
    _run(tmp_path, "--max-iters", "10", "--eval-interval", "10", "--sample-tokens", "0")
    path = tmp_path / "out" / "ckpt.pt"
    ckpt = torch.load(path, weights_only=False)
    ckpt["model"] = {k.replace("in_proj", "q_proj"): w for k, w in ckpt["model"].items()}
    torch.save(ckpt, path)
    before = _files(tmp_path / "out")
    code, err = _exit(capsys, _run, tmp_path, "--resume")
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert "q_proj" in err and "in_proj" in err and "another version" in err
    assert _files(tmp_path / "out") == before


def test_train_tiny_resume_refuses_other_data(tmp_path, capsys):
    """A checkpoint trained on one text is not resumed on another."""
    _run(tmp_path, "--max-iters", "10", "--eval-interval", "10", "--sample-tokens", "0")
    other = tmp_path / "other.txt"
    other.write_text("".join(f"another text, line {i}\n" for i in range(3000)))
    before = _files(tmp_path / "out")
    argv = _train_argv(tmp_path, "--resume")
    argv[argv.index("--data") + 1] = str(other)
    import train_tiny

    code, err = _exit(capsys, train_tiny.main, argv)
    assert code == 2 and "is not the one" in err and err.count("\n") == 1
    assert _files(tmp_path / "out") == before


def test_train_tiny_resume_reports_changed_loop_flags(tmp_path, capsys):
    """Loop settings may change on --resume, and the run says which ones did."""
    _run(tmp_path, "--max-iters", "10", "--eval-interval", "10", "--sample-tokens", "0")
    capsys.readouterr()
    out = _run(tmp_path, "--resume", "--max-iters", "20", "--lr", "1e-3")
    printed = capsys.readouterr().out
    assert "resume: changed --max-iters 10 -> 20" in printed and "resume: changed --lr 0.003 -> 0.001" in printed
    assert out["iters"] == 20


def test_train_tiny_fresh_run_does_not_overwrite_a_checkpoint(tmp_path, capsys):
    """A new run into a folder that holds a checkpoint is refused (--resume or --overwrite)."""
    _run(tmp_path, "--max-iters", "10", "--eval-interval", "10", "--sample-tokens", "0")
    before = _files(tmp_path / "out")
    code, err = _exit(capsys, _run, tmp_path, "--max-iters", "10")
    assert code == 2 and "--resume" in err and _files(tmp_path / "out") == before


def _damage(path, how):
    data = bytearray(path.read_bytes())
    if how == "overwritten":  # 4 KB of noise in the middle
        mid = len(data) // 2
        noise = torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0))
        data[mid:mid + 4096] = bytes(noise.tolist())
        path.write_bytes(bytes(data))
    elif how == "truncated":
        path.write_bytes(bytes(data[: len(data) // 2]))
    elif how == "model not a state dict":
        ckpt = torch.load(path, weights_only=False)
        ckpt["model"] = [1, 2, 3]
        torch.save(ckpt, path)
    else:  # a well-formed file whose weights are NaN
        ckpt = torch.load(path, weights_only=False)
        next(iter(ckpt["model"].values())).fill_(float("nan"))
        torch.save(ckpt, path)


@pytest.mark.parametrize("how", ["overwritten", "truncated", "nan weights", "model not a state dict"])
def test_train_tiny_damaged_checkpoint_is_named(tmp_path, capsys, how):
    """A damaged checkpoint is named in one line that points at best.pt, with no traceback, and
    no file is written; resuming from best.pt then works."""
    _run(tmp_path, "--max-iters", "20", "--eval-interval", "10", "--sample-tokens", "0")
    ckpt = tmp_path / "out" / "ckpt.pt"
    _damage(ckpt, how)
    before = _files(tmp_path / "out")
    code, err = _exit(capsys, _run, tmp_path, "--resume")
    assert code == 1 and err.count("\n") == 1 and "Traceback" not in err
    assert f"checkpoint {ckpt} is damaged" in err and "--resume " + str(tmp_path / "out" / "best.pt") in err
    assert _files(tmp_path / "out") == before
    out = _run(tmp_path, "--resume", str(tmp_path / "out" / "best.pt"), "--max-iters", "30", "--sample-tokens", "0",
               "--out-dir", str(tmp_path / "out2"))
    assert out["iters"] == 30 and _files(tmp_path / "out") == before


def test_train_tiny_never_writes_over_another_run(tmp_path, capsys):
    """OUT_DIR's files are only written by the run they belong to: a fresh run, or a resume of
    another run's checkpoint, into a folder that holds a run is refused in one line (exit 2,
    nothing written) unless --overwrite is given; --overwrite replaces the whole run."""
    _run(tmp_path, "--max-iters", "10", "--eval-interval", "5", "--sample-tokens", "0")
    _run(tmp_path, "--max-iters", "5", "--eval-interval", "5", "--sample-tokens", "0", "--out-dir",
         str(tmp_path / "other"))
    other = _files(tmp_path / "other")
    for extra in (["--resume", str(tmp_path / "out" / "ckpt.pt")], ["--resume", str(tmp_path / "out" / "best.pt")],
                  []):
        code, err = _exit(capsys, _run, tmp_path, *extra, "--max-iters", "15", "--sample-tokens", "0",
                          "--out-dir", str(tmp_path / "other"))
        assert code == 2 and err.count("\n") == 1 and "holds a run" in err and "--overwrite" in err, err
        assert _files(tmp_path / "other") == other
    out = _run(tmp_path, "--resume", str(tmp_path / "out" / "ckpt.pt"), "--max-iters", "15", "--sample-tokens", "0",
               "--out-dir", str(tmp_path / "other"), "--overwrite")
    assert out["iters"] == 15 and _files(tmp_path / "other") != other


def test_train_tiny_ctrl_c_saves_and_resume_keeps_history(tmp_path, monkeypatch):
    """Ctrl-C saves the checkpoint (exit code 130); the resumed run's summary holds the
    evaluations from before the interrupt too."""
    import train_tiny

    real_get_batch, calls = train_tiny.get_batch, [0]

    def interrupted(data, args, gen):
        calls[0] += 1
        if calls[0] == 2 * 4 + 10 + 2 * 4 + 3:  # evals at 0 and 10 (4 batches per split), then 12 steps
            raise KeyboardInterrupt
        return real_get_batch(data, args, gen)

    monkeypatch.setattr(train_tiny, "get_batch", interrupted)
    with pytest.raises(SystemExit) as e:
        _run(tmp_path, "--max-iters", "30", "--eval-interval", "10", "--sample-tokens", "0")
    assert e.value.code == 130
    assert torch.load(tmp_path / "out" / "ckpt.pt", weights_only=False)["iter_num"] == 12
    monkeypatch.setattr(train_tiny, "get_batch", real_get_batch)
    out = _run(tmp_path, "--resume")
    assert [h["iter"] for h in out["history"]] == [0, 10, 20, 30]


def test_train_tiny_second_ctrl_c_does_not_cut_the_save(tmp_path, monkeypatch):
    """A second Ctrl-C (and a SIGTERM) while the interrupted run saves itself is ignored: the
    checkpoint is whole, no .tmp file is left, exit code 130, and the SIGINT handler is restored."""
    import signal

    import train_tiny

    real_get_batch, real_save, calls = train_tiny.get_batch, train_tiny.torch.save, [0]
    handler = signal.getsignal(signal.SIGINT)  # Python's, or SIG_IGN in a shell's background job

    def interrupted(data, args, gen):
        calls[0] += 1
        if calls[0] == 2 * 4 + 3:  # the eval at 0 (4 batches per split), then 2 steps
            raise KeyboardInterrupt
        return real_get_batch(data, args, gen)

    def pressed_again(obj, path):  # Ctrl-C, then SIGTERM, in the middle of the save
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGTERM)
        real_save(obj, path)

    monkeypatch.setattr(train_tiny, "get_batch", interrupted)
    monkeypatch.setattr(train_tiny.torch, "save", lambda obj, path: (
        pressed_again(obj, path) if calls[0] >= 11 else real_save(obj, path)))
    with pytest.raises(SystemExit) as e:
        _run(tmp_path, "--max-iters", "30", "--eval-interval", "10", "--sample-tokens", "0")
    assert e.value.code == 130
    assert torch.load(tmp_path / "out" / "ckpt.pt", weights_only=False)["iter_num"] == 2
    assert not list((tmp_path / "out").glob("*.tmp"))
    assert signal.getsignal(signal.SIGINT) is handler  # restored


def test_train_tiny_ctrl_c_during_the_sample_keeps_the_run(tmp_path, monkeypatch, capsys):
    """Ctrl-C while the final sample is drawn: one line, exit code 130, the checkpoints and a
    complete summary.json stay."""
    import train_tiny

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(train_tiny.TrellisLM, "generate", interrupted)
    code, err = _exit(capsys, _run, tmp_path, "--max-iters", "10", "--eval-interval", "5")
    assert code == 130 and "Traceback" not in err
    summary = json.load(open(tmp_path / "out" / "summary.json"))
    assert summary["iters"] == 10 and summary["interrupted_at_end"] and "sample" not in summary
    assert {p.name for p in (tmp_path / "out").iterdir()} == {"ckpt.pt", "best.pt", "summary.json"}


def test_train_tiny_rebuilds_a_damaged_token_cache(tmp_path):
    """Cached token ids that do not match the text (truncated, odd size, empty) are rebuilt."""
    import train_tiny

    first = _run(tmp_path, "--max-iters", "4", "--eval-interval", "4", "--sample-tokens", "0")
    train_bin, = (tmp_path / "cache").glob("tokens-*/train.bin")
    val_bin = train_bin.parent / "val.bin"
    good = train_bin.read_bytes(), val_bin.read_bytes()
    for damage in (lambda: train_bin.write_bytes(good[0][:len(good[0]) // 50]),
                   lambda: train_bin.write_bytes(good[0][:-1]), lambda: val_bin.write_bytes(b"")):
        damage()
        again = train_tiny.main(_train_argv(tmp_path, "--max-iters", "4", "--eval-interval", "4", "--sample-tokens",
                                            "0", "--overwrite"))
        assert (train_bin.read_bytes(), val_bin.read_bytes()) == good
        assert again["best_val_loss"] == first["best_val_loss"]


def test_train_tiny_char_tokenizer_refuses_too_many_characters(tmp_path, capsys):
    """--tokenizer char stores ids as uint16: a text of more than 65,536 distinct characters is
    refused in one line (exit 2), with nothing written."""
    import train_tiny

    chars = [chr(c) for c in range(0x4E00, 0x4E00 + 70000) if not 0xD800 <= c < 0xE000]
    (tmp_path / "wide.txt").write_text("".join(chars) * 2, encoding="utf-8")
    argv = _train_argv(tmp_path, "--data", str(tmp_path / "wide.txt"))
    code, err = _exit(capsys, train_tiny.main, argv)
    assert code == 2 and err.count("\n") == 1 and "--tokenizer gpt2" in err
    assert not (tmp_path / "out").exists() and not (tmp_path / "cache").exists()


def test_train_tiny_sigterm_saves(tmp_path, monkeypatch):
    """SIGTERM (kill, timeout, a scheduler) during training saves the checkpoint as Ctrl-C does,
    then goes to the process's previous SIGTERM handler, which is in place again afterwards."""
    import signal

    import train_tiny

    real_get_batch, calls = train_tiny.get_batch, [0]

    def terminated(data, args, gen):
        calls[0] += 1
        if calls[0] == 2 * 4 + 10 + 2 * 4 + 5:  # evals at 0 and 10 (4 batches per split), then 14 steps
            os.kill(os.getpid(), signal.SIGTERM)
        return real_get_batch(data, args, gen)

    monkeypatch.setattr(train_tiny, "get_batch", terminated)
    received = []

    def before(signum, frame):  # the handler of whoever ran the training (pytest's would end pytest)
        received.append(signum)

    outer = signal.signal(signal.SIGTERM, before)
    try:
        with pytest.raises(SystemExit) as e:
            _run(tmp_path, "--max-iters", "30", "--eval-interval", "10", "--sample-tokens", "0")
        assert signal.getsignal(signal.SIGTERM) is before
    finally:
        signal.signal(signal.SIGTERM, outer)
    assert e.value.code == 143 and received == [signal.SIGTERM]  # saved, then handed on: not swallowed
    assert torch.load(tmp_path / "out" / "ckpt.pt", weights_only=False)["iter_num"] == 14
    assert not list((tmp_path / "out").glob("*.tmp"))


def test_train_tiny_interrupted_evaluation_is_redone(tmp_path, monkeypatch):
    """Ctrl-C during an evaluation: the resumed run makes that evaluation (best.pt sees it)."""
    import train_tiny

    real_estimate, calls = train_tiny.estimate_loss, [0]

    def interrupted(*a, **kw):
        calls[0] += 1
        if calls[0] == 2:  # the evaluation at iter 10
            raise KeyboardInterrupt
        return real_estimate(*a, **kw)

    monkeypatch.setattr(train_tiny, "estimate_loss", interrupted)
    with pytest.raises(SystemExit):
        _run(tmp_path, "--max-iters", "20", "--eval-interval", "10", "--sample-tokens", "0")
    assert [h["iter"] for h in json.load(open(tmp_path / "out" / "summary.json"))["history"]] == [0]
    monkeypatch.setattr(train_tiny, "estimate_loss", real_estimate)
    out = _run(tmp_path, "--resume")
    assert [h["iter"] for h in out["history"]] == [0, 10, 20]


BAD_CLI = [
    ["--block-size", "0"], ["--batch-size", "-1"], ["--eval-interval", "0"], ["--log-interval", "0"],
    ["--device", "gpu"], ["--n-embd", "100", "--n-head", "3"], ["--slots", "0"], ["--chunk-size", "0"],
    ["--sweeps", "-1"], ["--gamma-max", "-1"], ["--beta-init", "1"], ["--lr", "nan"], ["--eval-iters", "0"],
    ["--max-iters", "ten"],
    ["--mixer", "mamba"], ["--dropout", "1.5"], ["--patience", "-1"], ["--eval-contexts", "256,x"],
    ["--data", "/no/such/file.txt"], ["--data", "EMPTY"], ["--recall-pairs", "0"], ["--recall-pairs", "8,1024"],
    ["--seed", str(10**23)], ["--seed", "-1"], ["--out-dir", "A_FILE"], ["--out-dir", "UNDER_A_FILE"],
    ["--prompt", "ROMEO\u2603"], ["--prompt", ""],
]


@pytest.mark.parametrize("flags", BAD_CLI, ids=lambda f: " ".join(f))
def test_train_tiny_bad_value_is_one_line_and_writes_nothing(tmp_path, capsys, flags):
    """Every command-line value is checked first: a bad one gets one line naming it, exit code 2,
    no traceback, and nothing is written (no output folder, no token cache)."""
    import train_tiny

    if "EMPTY" in flags:
        (tmp_path / "empty.txt").write_text("")
        flags = ["--data", str(tmp_path / "empty.txt")]
    if flags[-1] in ("A_FILE", "UNDER_A_FILE"):
        (tmp_path / "a_file").write_text("not a folder")
        flags = ["--out-dir", str(tmp_path / "a_file" / ("run" if flags[-1] == "UNDER_A_FILE" else ""))]
    code, err = _exit(capsys, train_tiny.main, _train_argv(tmp_path, "--max-iters", "5", *flags))
    assert code == 2 and err.count("\n") == 1 and err.startswith("train_tiny.py: error:"), err
    assert flags[0].lstrip("-").split("-")[0] in err or "argument" in err
    assert not (tmp_path / "out").exists() and not (tmp_path / "cache").exists()
    assert (tmp_path / "a_file").read_text() == "not a folder" if (tmp_path / "a_file").exists() else True


def test_train_tiny_out_dir_that_cannot_be_written_is_one_line(tmp_path, capsys, monkeypatch):
    """An --out-dir where no folder can be made (permissions, a read-only file system: here a
    mkdir that fails as it would there) is refused in one line, exit code 2, nothing written."""
    import errno

    import train_tiny

    def refused(path, *a, **k):
        raise PermissionError(errno.EACCES, "Permission denied", path)

    monkeypatch.setattr(train_tiny.os, "mkdir", refused)
    code, err = _exit(capsys, train_tiny.main, _train_argv(tmp_path, "--max-iters", "5"))
    assert code == 2 and err.count("\n") == 1 and "cannot write in" in err and "--out-dir" in err, err
    assert not (tmp_path / "out").exists() and not (tmp_path / "cache").exists()


def test_train_tiny_help_shows_defaults_per_device(capsys):
    """--help shows the defaults on cuda and on cpu of the flags that depend on the device."""
    import train_tiny

    with pytest.raises(SystemExit) as e:
        train_tiny.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert e.value.code == 0
    assert "(default: 1500 on cuda, 100 on cpu)" in text and "(default: 16 on cuda, 4 on cpu)" in text


def test_train_tiny_stops_early_and_ends_at_its_best(tmp_path, monkeypatch, capsys):
    """With --patience, the run stops after that many evaluations without a better val loss; the
    sample and the final model come from the best weights; the last lines name the files."""
    import train_tiny

    scripted = iter([3.0, 2.0, 2.5, 2.6, 2.7, 2.8])
    seen = {}

    def fake(model, split, args, ctx):
        val = next(scripted)
        if val == 2.0:  # remember the weights that the best evaluation saw
            seen["best"] = {k: t.clone() for k, t in model.state_dict().items()}
        return dict(train=val, val=val)

    def sample_from(self, idx, *a, **kw):
        seen["sampled"] = {k: t.clone() for k, t in self.state_dict().items()}
        return idx

    monkeypatch.setattr(train_tiny, "estimate_loss", fake)
    monkeypatch.setattr(tr.TrellisLM, "generate", sample_from)
    out = _run(tmp_path, "--max-iters", "50", "--eval-interval", "5", "--patience", "2")
    assert out["stopped_early"] and out["iters"] == 15 and out["best_iter"] == 5
    assert all(torch.equal(seen["sampled"][k], t) for k, t in seen["best"].items())
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert all(str(tmp_path / "out" / n) in last for n in ("ckpt.pt", "best.pt", "summary.json"))


def test_train_tiny_reports_no_throughput_it_did_not_time(tmp_path, capsys):
    """Throughput leaves out the first two steps (they compile): a run of two steps says so and
    writes None, not 0 tok/s."""
    out = _run(tmp_path, "--max-iters", "2", "--eval-interval", "2", "--eval-iters", "1", "--sample-tokens", "0")
    assert out["train_tokens_per_s"] is None
    assert "train tok/s not measured" in capsys.readouterr().out
    again = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert again["train_tokens_per_s"] is None


def test_train_tiny_gpt2_tokenizer_offline(tmp_path):
    """GPT-2 BPE through tiktoken's cached ranks (TIKTOKEN_CACHE_DIR), token ids cached as uint16."""
    import tiktoken

    try:
        tiktoken.get_encoding("r50k_base")
    except Exception as e:  # noqa: BLE001  (no network and no cache: the ranks cannot be had)
        pytest.skip(f"tiktoken's GPT-2 ranks are not available here (set TIKTOKEN_CACHE_DIR): {type(e).__name__}")
    argv = _train_argv(tmp_path, "--max-iters", "2", "--eval-interval", "2", "--eval-iters", "1",
                       "--sample-tokens", "3")
    argv[argv.index("char")] = "gpt2"
    import train_tiny

    out = train_tiny.main(argv)
    assert math.isfinite(out["best_val_loss"])
    cached = list((tmp_path / "cache").glob("tokens-*-gpt2/train.bin"))
    assert len(cached) == 1 and cached[0].stat().st_size % 2 == 0


def test_train_tiny_stops_on_nonfinite_loss_and_keeps_checkpoint(tmp_path, monkeypatch, capsys):
    """A NaN loss stops the run without writing; the message points at the untouched checkpoint."""
    real_forward, calls = tr.TrellisLM.forward, [0]

    def poisoned(self, idx, targets=None, state=None, at=None):
        logits, loss, st_ = real_forward(self, idx, targets, state, at)
        if self.training and targets is not None:
            calls[0] += 1
            if calls[0] > 12:
                loss = loss * float("nan")
        return logits, loss, st_

    monkeypatch.setattr(tr.TrellisLM, "forward", poisoned)
    code, err = _exit(capsys, _run, tmp_path, "--max-iters", "30", "--eval-interval", "10")
    assert code == 1 and "non-finite loss" in err and "untouched" in err
    ckpt = torch.load(tmp_path / "out" / "ckpt.pt", weights_only=False)
    assert ckpt["iter_num"] == 10 and all(torch.isfinite(p).all() for p in ckpt["model"].values())


class _InfGrad(torch.autograd.Function):
    """Identity forward; an infinite gradient backward (an overflowed backward pass)."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return g * float("inf")


@pytest.mark.parametrize("bad_calls,stops", [({13, 14}, False), (set(range(13, 100)), True)])
def test_train_tiny_skips_nonfinite_gradients(tmp_path, monkeypatch, capsys, bad_calls, stops):
    """A finite loss with an overflowed gradient skips that update (the weights stay finite);
    ten in a row stop the run with the checkpoint intact."""
    real_forward, calls = tr.TrellisLM.forward, [0]

    def poisoned(self, idx, targets=None, state=None, at=None):
        logits, loss, st_ = real_forward(self, idx, targets, state, at)
        if self.training and targets is not None:
            calls[0] += 1
            if calls[0] in bad_calls:
                loss = _InfGrad.apply(loss)
        return logits, loss, st_

    monkeypatch.setattr(tr.TrellisLM, "forward", poisoned)
    argv = ("--max-iters", "30", "--eval-interval", "10", "--sample-tokens", "0")
    if stops:
        code, err = _exit(capsys, _run, tmp_path, *argv)
        assert code == 1 and "10 non-finite gradients in a row" in err
        ckpt = torch.load(tmp_path / "out" / "ckpt.pt", weights_only=False)
        assert ckpt["iter_num"] == 20 and all(torch.isfinite(p).all() for p in ckpt["model"].values())
    else:
        out = _run(tmp_path, *argv)
        assert out["skipped_updates"] == 2 and out["iters"] == 30
        ckpt = torch.load(tmp_path / "out" / "ckpt.pt", weights_only=False)
        assert all(torch.isfinite(p).all() for p in ckpt["model"].values())


def test_train_tiny_failed_download_says_how_to_fix(tmp_path, capsys):
    """No network: one line that says to pass --data."""
    import train_tiny

    argv = _train_argv(tmp_path, "--data-url", "http://127.0.0.1:9/input.txt")
    argv[argv.index("--data") + 1] = ""
    code, err = _exit(capsys, train_tiny.main, argv)
    assert code == 1 and "could not download" in err and "--data" in err and err.count("\n") == 1


def test_train_tiny_eval_exact(tmp_path):
    """--eval-exact reports the trained chunk-start model's val loss under the exact recurrence."""
    out = _run(tmp_path, "--max-iters", "4", "--eval-interval", "4", "--sample-tokens", "0", "--eval-exact")
    assert math.isfinite(out["val_loss_exact"]) and out["val_loss_exact"] != out["history"][-1]["val"]


def test_bench_decode_state_sizes(tmp_path):
    """--bench-decode: the Trellis state is the same size at every context; the KV cache
    grows by exactly one token per position."""
    import train_tiny

    args = train_tiny.parse_args(_train_argv(tmp_path, "--bench-decode", "--contexts", "8,40"))
    rows = train_tiny.bench_decode(args, steps=2, rounds=2)
    size = {(mixer, T): nbytes for mixer, T, ms, nbytes, numel in rows}
    assert all(ms > 0 for _, _, ms, _, _ in rows) and len(rows) == 4
    assert size["trellis", 8] == size["trellis", 40]
    per_token = 2 * args.n_layer * args.n_embd * 4  # k and v, float32 on the CPU
    assert size["attention", 40] - size["attention", 8] == (40 - 8) * per_token


def test_bench_train_reports_both_mixers(tmp_path):
    """--bench-train: tokens/s for both mixers at every context, the batch filling the token budget."""
    import train_tiny

    args = train_tiny.parse_args(_train_argv(tmp_path, "--bench-train", "--contexts", "16,64"))
    rows = train_tiny.bench_train(args, steps=2, tokens=128)
    assert [(T, m) for T, m, _ in rows] == [(16, "trellis"), (16, "attention"), (64, "trellis"), (64, "attention")]
    assert all(tps > 0 for _, _, tps in rows)


# -----------------------------------------------------------------------------
# train_tiny.py: loss at longer contexts, and the recall task


@pytest.mark.parametrize("mixer", ["trellis", "attention"])
def test_context_losses_equal_the_ordinary_loss(tmp_path, mixer):
    """The evaluation at several contexts computes, at each context, the model's own mean loss
    over consecutive windows of the val split, and its tail column the loss of the last
    positions: at the training context it is the ordinary loss on those windows."""
    import train_tiny

    args = train_tiny.parse_args(_train_argv(tmp_path, "--mixer", mixer))
    model = tr.TrellisLM(train_tiny.model_config(args, 61)).eval()
    data = torch.randint(0, 61, (1000,), generator=torch.Generator().manual_seed(0)).numpy().astype("uint16")
    ctx = torch.autocast("cpu", enabled=False)
    got = train_tiny.context_losses(model, data, [32, 100], args, ctx, tail=8, tokens_per_batch=256, rows=47)
    for T in (32, 100):
        n = (len(data) - 1) // T
        ids = torch.from_numpy(data[: n * T + 1].astype("int64"))
        x, y = ids[:-1].view(n, T), ids[1:].view(n, T)
        assert got[T]["windows"] == n
        assert got[T]["loss"] == pytest.approx(model(x, targets=y)[1].item(), rel=1e-5)
        logits = model(x)[0][:, -8:]
        tail = F.cross_entropy(logits.reshape(-1, 61), y[:, -8:].reshape(-1)).item()
        assert got[T]["tail_loss"] == pytest.approx(tail, rel=1e-5)


def test_eval_contexts_after_training_and_from_a_checkpoint(tmp_path):
    """--eval-contexts at the end of training and --eval-from on the saved best.pt give the same
    figures; both are stored in summary.json."""
    import train_tiny

    out = _run(tmp_path, "--max-iters", "10", "--eval-interval", "10", "--sample-tokens", "0",
               "--eval-contexts", "32,128")
    assert set(out["context_losses"]) == {32, 128}
    again = train_tiny.main(["--device", "cpu", "--eval-from", str(tmp_path / "out" / "best.pt"),
                             "--eval-contexts", "32,128", "--cache-dir", str(tmp_path / "cache")])
    for T in (32, 128):
        assert again[T]["loss"] == pytest.approx(out["context_losses"][T]["loss"], rel=1e-6)
    summary = json.load(open(tmp_path / "out" / "summary.json"))
    assert set(summary["context_losses_from"]["best.pt"]) == {"32", "128"}
    out = _run(tmp_path, "--resume", "--max-iters", "12", "--sample-tokens", "0")  # a resume keeps them
    assert json.load(open(tmp_path / "out" / "summary.json"))["context_losses_from"] == summary["context_losses_from"]


def test_eval_from_refuses_an_unreadable_summary_first(tmp_path, capsys):
    """--eval-from next to a summary.json it could not add to: one line, exit 2, before evaluating,
    and the file is left as it was."""
    import train_tiny

    _run(tmp_path, "--max-iters", "4", "--eval-interval", "4", "--sample-tokens", "0")
    (tmp_path / "out" / "summary.json").write_text("{ not json")
    code, err = _exit(capsys, train_tiny.main, ["--device", "cpu", "--eval-from", str(tmp_path / "out" / "best.pt"),
                                               "--eval-contexts", "32", "--cache-dir", str(tmp_path / "cache")])
    assert code == 2 and err.count("\n") == 1 and "summary.json" in err
    assert (tmp_path / "out" / "summary.json").read_text() == "{ not json"


@given(n=st.integers(1, 40), q=st.integers(1, 40), seed=st.integers(0, 2**31 - 1))
def test_recall_batches_are_well_formed(n, q, seed):
    """Multi-query recall data: distinct keys; each query's target is the value paired with its
    key; the answer is never an input before its query is answered; no other position has a target."""
    import train_tiny

    q = min(q, n)
    x, y = train_tiny.recall_batch(n, q, 3, torch.Generator().manual_seed(seed))
    assert x.shape == y.shape == (3, 2 * (n + q))
    K = train_tiny.RECALL_KEYS
    for b in range(3):
        keys, vals = x[b, 0:2 * n:2], x[b, 1:2 * n:2]
        assert len(set(keys.tolist())) == n and (keys < K).all() and (vals >= K).all()
        pair = dict(zip(keys.tolist(), vals.tolist()))
        targets = (y[b] >= 0).nonzero()[:, 0].tolist()
        assert targets == list(range(2 * n, 2 * (n + q), 2))
        for p in targets:
            assert y[b, p].item() == pair[x[b, p].item()]
            assert y[b, p].item() not in x[b, 2 * n:p + 1].tolist()


def test_recall_task_trains_and_reports_accuracy(tmp_path):
    """--task recall trains end to end and reports an accuracy per number of pairs (the default 32
    queries capped at the pairs), and with --eval-exact the same weights' accuracies under the exact
    recurrence and the stability report."""
    out = _run(tmp_path, "--task", "recall", "--recall-pairs", "4,8", "--max-iters", "6", "--eval-interval", "3",
               "--eval-exact")
    acc = out["recall_accuracy"]
    assert set(acc) == set(out["recall_accuracy_exact"]) == {4, 8}
    assert all(0 <= a <= 1 for a in list(acc.values()) + list(out["recall_accuracy_exact"].values()))
    assert math.isfinite(out["val_loss_exact"]) and len(out["stability"]) == 1  # _train_argv: one layer


@given(T_n=st.sampled_from([(64, 4), (128, 8), (256, 16), (256, 32), (256, 64), (64, 16), (1024, 256), (40, 10)]),
       batch=st.integers(1, 4), seed=st.integers(0, 2**31 - 1))
def test_mqar_batches_are_well_formed(T_n, batch, seed):
    """MQAR as Zoology lays it out: n pairs with distinct keys from [1, 4096) and distinct values
    from [4096, 8192) open the sequence; every key comes back exactly once, at an even offset
    after the pairs, and only there is a target: its value."""
    import train_tiny

    T, n = T_n
    x, y = train_tiny.mqar_batch(T, n, batch, torch.Generator().manual_seed(seed))
    assert x.shape == y.shape == (batch, T) and 0 <= x.min() and x.max() < train_tiny.MQAR_VOCAB
    for xs, ys in zip(x.tolist(), y.tolist()):
        keys, vals = xs[0:2 * n:2], xs[1:2 * n:2]
        assert len(set(keys)) == n and all(1 <= k < 4096 for k in keys)
        assert len(set(vals)) == n and all(4096 <= v < 8192 for v in vals)
        queries = [t for t, target in enumerate(ys) if target >= 0]
        assert len(queries) == n and all(t >= 2 * n and (t - 2 * n) % 2 == 0 for t in queries)
        assert sorted(xs[t] for t in queries) == sorted(keys)
        assert all(ys[t] == dict(zip(keys, vals))[xs[t]] for t in queries)


def test_mqar_mixtures_are_zoologys():
    """Training draws (T, n) from Zoology's mixture in proportion to its example counts
    (100k at (64, 4), 20k at each of the four others); testing covers T = 64 .. 1024 with
    4 .. 256 pairs, and every test sequence has room for its queries."""
    import argparse

    import train_tiny

    assert train_tiny.MQAR_TRAIN == {(64, 4): 100_000, (128, 8): 20_000, (256, 16): 20_000, (256, 32): 20_000,
                                     (256, 64): 20_000}
    args = argparse.Namespace(batch_size=1, device="cpu")
    gen = torch.Generator().manual_seed(0)
    drawn = [tuple(train_tiny.mqar_step_batch(args, gen)[0].shape) for _ in range(3000)]
    share = sum(s == (1, 64) for s in drawn) / len(drawn)
    assert abs(share - 100 / 180) < 0.03 and {s[1] for s in drawn} == {64, 128, 256}
    assert [T for T, _ in train_tiny.MQAR_TEST] == [64, 64, 64, 128, 256, 512, 1024]
    assert [n for _, n in train_tiny.MQAR_TEST] == [4, 8, 16, 32, 64, 128, 256]
    assert all(2 * n + 2 * n <= T for T, n in train_tiny.MQAR_TEST)


def test_stability_report_kappa_is_the_chunks_write_norm_for_identity():
    """With phi = identity (J = I), kappa is lambda_max(sum_j gamma_j e^{b_C - b_j} w_j w_j^T) of the
    chunk, computed here from the layer's own inputs; one chunk, one head, so every pick is it."""
    import train_tiny

    torch.manual_seed(1)
    cfg = tr.TrellisConfig(vocab_size=32, n_layer=1, n_embd=16, n_head=1, slots=4, chunk_size=8, phi="identity",
                           gamma_max=1.5, gamma_init=1.0)
    model = tr.TrellisLM(cfg).double()
    torch.nn.init.normal_(model.blocks[0].mixer.gate_proj.weight, std=0.5)  # gates that vary by token
    x = torch.randint(32, (1, 8))
    report = train_tiny.stability_report(model, x, chunks=2)
    block = model.blocks[0]
    _, k, v, _, beta, gamma, _, _ = block.mixer.operator_inputs(block.norm1(model.wte(x)))
    b = beta[0, :, 0].log().cumsum(0)  # [8]
    for name, w in (("key", k), ("value", v)):
        w = w[0, :, 0] * (gamma[0, :, 0] * torch.exp(b[-1] - b)).sqrt()[:, None]  # [8, d]
        want = torch.linalg.eigvalsh(w.T @ w)[-1].item()
        assert report[0][name]["kappa_max"] == pytest.approx(want, rel=1e-9)
        assert report[0][name]["kappa_median"] == pytest.approx(want, rel=1e-9)


def test_distinct_randint_draws_every_distinct_row_equally_often():
    """MQAR's keys and values: distinct within a row, in range, and every ordered row of distinct
    entries equally likely (12 of them for 2 of 4: 1000 each expected, sd about 30)."""
    import collections

    import train_tiny

    gen = torch.Generator().manual_seed(0)
    x = train_tiny.distinct_randint(4, 2, 12000, gen)
    counts = collections.Counter(map(tuple, x.tolist()))
    assert set(counts) == {(i, j) for i in range(4) for j in range(4) if i != j}
    assert all(850 < c < 1150 for c in counts.values()), counts
    big = train_tiny.distinct_randint(300, 256, 50, gen)
    assert all(len(set(r)) == 256 for r in big.tolist()) and 0 <= big.min() and big.max() < 300


def test_answer_accuracy_counts_answer_positions_only():
    """The accuracy counts argmax hits at positions with a target and nowhere else: an oracle
    scores 1, an oracle shifted by one token 0, an oracle right on every other answer 0.5,
    whatever it predicts elsewhere."""
    import train_tiny

    x, y = train_tiny.mqar_batch(64, 8, 4, torch.Generator().manual_seed(1))

    class Oracle(torch.nn.Module):
        def __init__(self, shift, every=1):
            super().__init__()
            self.shift, self.every = shift, every

        def forward(self, idx, at=None):  # the model's interface: at picks flat positions
            logits = torch.zeros(*idx.shape, train_tiny.MQAR_VOCAB)
            target = torch.where(y >= 0, y, 0)
            wrong = torch.zeros_like(y, dtype=torch.bool)
            wrong[y >= 0] = torch.arange(int((y >= 0).sum())) % self.every == 1
            target = torch.where(wrong, (target + self.shift + 1) % train_tiny.MQAR_VOCAB, target + self.shift)
            logits = logits.scatter(-1, target[..., None] % train_tiny.MQAR_VOCAB, 1.0)
            return (logits if at is None else logits.view(-1, logits.shape[-1])[at]), None, None

    ctx = torch.autocast("cpu", enabled=False)
    assert train_tiny.answer_accuracy(Oracle(0), [(x, y)], ctx) == 1.0
    assert train_tiny.answer_accuracy(Oracle(1), [(x, y)], ctx) == 0.0
    assert train_tiny.answer_accuracy(Oracle(0, every=2), [(x, y)], ctx) == 0.5


@pytest.mark.parametrize("mixer", ["trellis", "attention"])
def test_loss_at_the_answers_equals_the_masked_loss(mixer):
    """model(x, targets=y, at=answers_at(y)) computes the logits of the answers alone: the same
    logits there, the same loss and the same gradients as the loss that ignores y = -1."""
    import train_tiny

    torch.manual_seed(0)
    cfg = tr.TrellisConfig(vocab_size=train_tiny.MQAR_VOCAB, n_layer=2, n_embd=32, n_head=2, slots=8, chunk_size=8,
                           mixer=mixer)
    model = tr.TrellisLM(cfg).double()
    x, y = train_tiny.mqar_batch(64, 8, 3, torch.Generator().manual_seed(2))
    at = train_tiny.answers_at(y)
    assert at.numel() == 3 * 8 and (y.reshape(-1)[at] >= 0).all()
    logits, loss, _ = model(x, targets=y)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    logits_at, loss_at, _ = model(x, targets=y, at=at)
    grads_at = torch.autograd.grad(loss_at, list(model.parameters()))
    assert logits_at.shape == (24, train_tiny.MQAR_VOCAB)
    torch.testing.assert_close(logits_at, logits.view(-1, logits.shape[-1])[at], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(loss_at, loss, rtol=1e-12, atol=0)
    for g, g_at in zip(grads, grads_at):
        torch.testing.assert_close(g_at, g, rtol=1e-9, atol=1e-12)


def test_mqar_task_trains_and_reports_accuracy(tmp_path, monkeypatch):
    """--task mqar trains end to end on the mixture and reports an accuracy per test (T, n), and
    with --eval-exact the same weights' loss and accuracies under the exact recurrence."""
    import train_tiny

    monkeypatch.setattr(train_tiny, "MQAR_TEST", [(64, 4), (128, 16)])
    monkeypatch.setattr(train_tiny.mqar_accuracy, "__defaults__", (20, 10))
    out = _run(tmp_path, "--task", "mqar", "--max-iters", "4", "--eval-interval", "2", "--batch-size", "2",
               "--eval-exact", "--beta-init", "0.99")
    acc = out["mqar_accuracy"]
    assert set(acc) == set(out["mqar_accuracy_exact"]) == {"64/4", "128/16", "all"}
    assert acc["all"] == pytest.approx((20 * 4 * acc["64/4"] + 20 * 16 * acc["128/16"]) / (20 * 4 + 20 * 16))
    assert math.isfinite(out["val_loss_exact"]) and out["val_loss_exact"] != out["best_val_loss"]
    assert all(0 <= a <= 1 for a in acc.values()) and out["task"] == "mqar"
    assert [h["iter"] for h in out["history"]] == [0, 2, 4] and all(0 <= h["val_accuracy"] <= 1 for h in out["history"])
    assert len(out["stability"]) == 1 and math.isfinite(out["stability"][0]["key"]["kappa_max"])  # one layer
    assert 50 < out["stability"][0]["horizon"] < 200  # beta near 0.99 after 4 steps: 1 / -log 0.99 = 99.5


@pytest.mark.parametrize("C", [1, 3])
def test_code_trajectory_reads_the_rules_memory(C):
    """The stability report's z: z_t = M w_t with M the memory before token t (C = 1) or before
    t's chunk (the chunk-start rule), that memory taken from pass_loop run up to there."""
    import train_tiny

    torch.manual_seed(C)
    B, H, T, m, d = 2, 2, 7, 5, 4
    W = F.normalize(torch.randn(B, H, T, d, dtype=torch.float64), dim=-1)
    A = torch.randn(B, H, T, m, dtype=torch.float64)
    beta, gamma = torch.rand(B, H, T, dtype=torch.float64), 0.5 * torch.rand(B, H, T, dtype=torch.float64)
    S = torch.randn(B, H, m, d, dtype=torch.float64)
    Z = train_tiny.code_trajectory(W, A, beta, gamma, S, "norm_silu", 1.0, C)
    for t in range(T):
        t0 = t - t % C  # the memory is the one after token t0 - 1
        M = S if t0 == 0 else tr.pass_loop(W[:, :, :t0], A[:, :, :t0], beta[:, :, :t0], gamma[:, :, :t0], S,
                                           W[:, :, :t0], "q", "norm_silu", 1.0, chunk_size=C)[1][-1]
        torch.testing.assert_close(Z[:, :, t], (M @ W[:, :, t, :, None])[..., 0], rtol=1e-12, atol=1e-12)


def test_stability_report_measures_what_it_names():
    """phi = identity has J = I; the exact rule has no gap to itself, the chunk-start rule has one;
    alpha's rms and peak, the forget horizon and gamma's mean are those of the layer's inputs."""
    import train_tiny

    torch.manual_seed(0)
    x = torch.randint(64, (2, 24))
    for phi, sweeps in (("identity", 0), ("norm_silu", 0), ("norm_silu", 7)):
        cfg = tr.TrellisConfig(vocab_size=64, n_layer=2, n_embd=32, n_head=2, slots=6, chunk_size=8, phi=phi,
                            sweeps=sweeps, gamma_max=1.5, gamma_init=1.0)
        model = tr.TrellisLM(cfg)
        report = train_tiny.stability_report(model, x, chunks=3)
        assert len(report) == 2
        for r in report:
            if phi == "identity":
                assert r["key"]["J_min"] == pytest.approx(1) and r["value"]["J_max"] == pytest.approx(1)
            assert (r["read_gap"] == 0) == (sweeps == 7) and r["read_gap"] < 1
        block = model.blocks[0]
        alpha = block.mixer.operator_inputs(block.norm1(model.wte(x)))[3]
        assert report[0]["alpha_peak"] == pytest.approx(alpha.abs().max().item())
        # at init the gates are constant (W = 0): beta = beta_init, gamma = gamma_init everywhere
        assert report[1]["horizon"] == pytest.approx(-1 / math.log(cfg.beta_init))
        assert report[1]["gamma_mean"] == pytest.approx(cfg.gamma_init)
        with torch.no_grad():  # a gate that saturates at beta = 1 (fp32) never forgets: an infinite horizon
            model.blocks[1].mixer.gate_proj.bias[:cfg.n_head] = 100.0
        assert train_tiny.stability_report(model, x, chunks=1)[1]["horizon"] == math.inf

