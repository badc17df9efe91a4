"""Property tests: the forms of the Trellis operator agree, and the rest.

Each test's docstring names the equation of ../shared/TRELLIS.md that it checks.
Run: python -m pytest -q test_equivalence.py   (HYPOTHESIS_PROFILE=soak for a long run)
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton

import math
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
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
    scaled into (0.5, 1.2) so that gamma ||w||^2 < 2 (TRELLIS.md section 5)."""
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


def outputs_and_grads(ins, seed, **kw):
    """(o, K, V) and the gradients of a random linear function of (o, K, V) w.r.t. every input."""
    ins = [t.detach().clone().requires_grad_(True) for t in ins]
    outs = tr.trellis_op(*ins, **kw)
    g = torch.Generator().manual_seed(seed + 1)
    # cotangents drawn in float64 and rounded to bf16: the same numbers in every dtype
    loss = sum((o * torch.randn(o.shape, generator=g, dtype=torch.float64).bfloat16().to(o.dtype)).sum()
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
# 1. error codes (section 3)


@given(seed=st.integers(0, 2**31 - 1), m=st.integers(2, 9), scale=st.sampled_from([0.0, 0.1, 1.0, 10.0]),
       phi=st.sampled_from(PHIS))
def test_error_code_equals_autograd(seed, m, scale, phi):
    """Section 3: u = J_phi(z)^T (phi(z) - a) equals d/dz of 1/2 ||phi(z) - a||^2,
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
    """Section 4: f = LayerNorm(SiLU) matches torch's layer_norm; the L2 form points along
    SiLU(z) with norm at most 1 (its eps only matters when SiLU(z) is tiny)."""
    z = torch.randn(4, m, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    eps = tr.TrellisConfig().f_eps
    want = F.layer_norm(F.silu(z), (m,), eps=eps)
    assert_close(tr.norm_silu(z, eps), want, 1e-12, "norm_silu")
    r = tr.l2_silu(z)
    assert_close(F.normalize(r, dim=-1), F.normalize(F.silu(z), dim=-1), 1e-12, "l2_silu direction")
    assert (r.norm(dim=-1) <= 1).all()


# -----------------------------------------------------------------------------
# 2. chunked form == per-token loop at the same chunk size (section 6)


@given(p=problems(), C=st.integers(1, 8), phi=st.sampled_from(PHIS), f=st.sampled_from(FS))
def test_chunked_equals_loop_same_chunk_rule(p, C, phi, f):
    """Section 6: the chunked matrix form equals the per-token loop with z_t from the
    chunk-start state, for every C and T (partial last chunk): outputs, final states and
    the gradients w.r.t. every input, initial states included."""
    ins = make_inputs(p)
    want, gwant = outputs_and_grads(ins, p.seed, phi=phi, f=f, chunk_size=C, impl="loop")
    got, ggot = outputs_and_grads(ins, p.seed, phi=phi, f=f, chunk_size=C, impl="chunked")
    assert_all_close(got, want, 1e-9, ["o", "K", "V"])
    assert_all_close(ggot, gwant, 1e-8, GRAD_NAMES)


# -----------------------------------------------------------------------------
# 3. chunk_size = 1 and sweeps = C - 1 are the exact recurrence (section 6)


@given(p=problems(), C=st.integers(1, 8), phi=st.sampled_from(PHIS))
def test_exact_modes_equal_recurrence(p, C, phi):
    """Section 6: with C - 1 refinement sweeps the chunked form is the exact per-token
    recurrence (section 3) for every C; so is chunk_size = 1 in both forms."""
    ins = make_inputs(p)
    want, gwant = outputs_and_grads(ins, p.seed, phi=phi, chunk_size=1, impl="loop")
    for kw in (dict(chunk_size=C, sweeps=C - 1), dict(chunk_size=C, sweeps=C + 3), dict(chunk_size=1)):
        got, ggot = outputs_and_grads(ins, p.seed, phi=phi, impl="chunked", **kw)
        assert_all_close(got, want, 1e-9, [f"{n} {kw}" for n in ("o", "K", "V")])
        assert_all_close(ggot, gwant, 1e-8, [f"{n} {kw}" for n in GRAD_NAMES])


@given(p=problems(max_T=12), phi=st.sampled_from(PHIS))
def test_sweeps_make_rows_exact_one_at_a_time(p, phi):
    """Section 6: after n sweeps the first n + 1 rows of a chunk are exact."""
    ins = make_inputs(p)
    C = p.T
    exact = tr.trellis_op(*ins, phi=phi, chunk_size=1, impl="loop")[0]
    for n in range(C):
        got = tr.trellis_op(*ins, phi=phi, chunk_size=C, sweeps=n, impl="chunked")[0]
        assert_close(got[:, : n + 1], exact[:, : n + 1], 1e-9, f"rows <= {n} after {n} sweeps")


# -----------------------------------------------------------------------------
# 4. phi = identity is the delta rule (section 5), against an independent loop


def delta_rule_reference(q, k, v, alpha, beta, gamma, K0, V0, f):
    """Written from section 5, independently of trellis.py: per (batch, head), explicit
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
    """Section 5: with phi = identity the exact recurrence is the delta rule
    S <- S (I - gamma w w^T) + gamma a w^T (beta = 1), and its gated form with beta < 1."""
    q, k, v, alpha, beta, gamma, K0, V0 = make_inputs(p)
    if not gated:
        beta = torch.ones_like(beta)
    want = delta_rule_reference(q, k, v, alpha, beta, gamma, K0, V0, f)
    for impl in ("loop", "chunked"):
        got = tr.trellis_op(q, k, v, alpha, beta, gamma, K0, V0, phi="identity", f=f, chunk_size=1, impl=impl)
        assert_all_close(got, want, 1e-10, [f"{n} {impl}" for n in ("o", "K", "V")])


# -----------------------------------------------------------------------------
# 5. causality


@given(p=problems(), C=st.integers(1, 6), sweeps=st.integers(0, 5), phi=st.sampled_from(PHIS),
       t=st.integers(0, 19), impl=st.sampled_from(["loop", "chunked"]))
def test_causality(p, C, sweeps, phi, t, impl):
    """Sections 3 and 6: output t' < t does not depend on any input at time t."""
    t = t % p.T
    ins = make_inputs(p)
    kw = dict(phi=phi, chunk_size=C, sweeps=sweeps, impl=impl)
    o1 = tr.trellis_op(*ins, **kw)[0]
    ins2 = [x.clone() for x in ins]
    g = torch.Generator().manual_seed(p.seed + 7)
    for x in ins2[:6]:  # every per-token input at time t
        x[:, t] += torch.rand(x[:, t].shape, generator=g, dtype=x.dtype) * 0.3
    o2 = tr.trellis_op(*ins2, **kw)[0]
    assert torch.equal(o1[:, :t], o2[:, :t])
    assert not torch.equal(o1[:, t:], o2[:, t:])  # the perturbation does reach time t


# -----------------------------------------------------------------------------
# 6. state carry


@given(p=problems(min_T=2), C=st.integers(1, 6), split=st.integers(0, 100), phi=st.sampled_from(PHIS),
       impl=st.sampled_from(["loop", "chunked"]))
def test_state_carry(p, C, split, phi, impl):
    """Sections 3 and 6: running [0, s) then [s, T) from the first call's final states equals
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


# -----------------------------------------------------------------------------
# 7. gradcheck


@pytest.mark.parametrize("phi", PHIS)
@pytest.mark.parametrize("impl,C,sweeps", [("loop", 1, 0), ("loop", 2, 0), ("chunked", 2, 0), ("chunked", 3, 1)])
def test_gradcheck(phi, impl, C, sweeps):
    """Section 7: the autograd gradients of both forms, through z in the error codes,
    agree with finite differences (float64)."""
    p = Problem(B=1, T=5, H=1, dk=2, dv=3, m=3, gates="uniform", zero_init=False, seed=3)
    ins = make_inputs(p, requires_grad=True)
    fn = lambda *a: tr.trellis_op(*a, phi=phi, chunk_size=C, sweeps=sweeps, impl=impl)  # noqa: E731
    assert torch.autograd.gradcheck(fn, ins, eps=1e-6, atol=1e-5, rtol=1e-4)


# -----------------------------------------------------------------------------
# 8. no NaN / Inf at the extremes


def _finite_fwd_bwd(ins, **kw):
    ins = [t.detach().clone().requires_grad_(True) for t in ins]
    o, K, V = tr.trellis_op(*ins, **kw)
    (o.square().mean() + K.square().mean() + V.square().mean()).backward()
    for name, t in zip(["o", "K", "V"] + GRAD_NAMES, [o, K, V] + [x.grad for x in ins]):
        assert torch.isfinite(t).all(), f"{name} has NaN/Inf with {kw}"


@pytest.mark.parametrize("impl", ["loop", "chunked"])
@pytest.mark.parametrize("phi", PHIS)
def test_finite_zero_memory_and_gate_extremes(impl, phi):
    """Section 8: zero initial memory (z = 0: normalized SiLU at zero variance), beta -> 0
    (including 0 and sigmoid underflow), beta = 1, gamma at its ends, in float32."""
    p = Problem(B=2, T=37, H=2, dk=8, dv=8, m=8, gates="uniform", zero_init=True, seed=11)
    q, k, v, alpha, beta, gamma, K0, V0 = make_inputs(p, dtype=torch.float32)
    for b in (torch.zeros_like(beta), torch.full_like(beta, 1e-38), torch.full_like(beta, 1e-6),
              torch.ones_like(beta), torch.where(torch.rand_like(beta) < 0.5, 1e-30, 1.0)):
        for g in (gamma, torch.full_like(gamma, 1e-6), torch.full_like(gamma, 0.999)):
            _finite_fwd_bwd([q, k, v, alpha, b, g, K0, V0], phi=phi, chunk_size=8, impl=impl)


@pytest.mark.parametrize("phi", PHIS)
def test_finite_long_context_float32(phi):
    """Section 6: T = 4096 in float32, chunked form, nonzero memory: finite outputs and gradients,
    and the memory stays bounded (L2-normalized writes, gamma < 1: a contraction)."""
    p = Problem(B=1, T=4096, H=2, dk=16, dv=16, m=16, gates="near1", zero_init=False, seed=5)
    ins = make_inputs(p, dtype=torch.float32)
    _finite_fwd_bwd(ins, phi=phi, chunk_size=64, impl="chunked")
    _, K, V = tr.trellis_op(*ins, phi=phi, chunk_size=64, impl="chunked")
    assert K.abs().max() < 1e3 and V.abs().max() < 1e3


@pytest.mark.parametrize("impl", ["loop", "chunked"])
@pytest.mark.parametrize("phi", PHIS)
def test_finite_scaled_inputs(impl, phi):
    """Sections 3 and 5: queries and slot codes x100 are harmless for every phi; writes x100
    are harmless for normalized SiLU, whose error code is bounded (identity and SiLU need
    gamma ||w||^2 < 2, which the layer guarantees by L2-normalizing k and v)."""
    p = Problem(B=1, T=50, H=2, dk=8, dv=8, m=8, gates="uniform", zero_init=False, seed=9)
    q, k, v, alpha, beta, gamma, K0, V0 = make_inputs(p, dtype=torch.float32)
    _finite_fwd_bwd([100 * q, k, v, 100 * alpha, beta, gamma, 100 * K0, V0], phi=phi, chunk_size=8, impl=impl)
    if phi == "norm_silu":
        _finite_fwd_bwd([q, 100 * k, 100 * v, alpha, beta, gamma, K0, V0], phi=phi, chunk_size=8, impl=impl)


# -----------------------------------------------------------------------------
# 9. bad input


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
    a = _good()
    with pytest.raises(ValueError, match=msg):
        tr.trellis_op(*[a[n] for n in NAMES], **kw)


# -----------------------------------------------------------------------------
# The language model (section 8)


def tiny_config(**kw):
    base = dict(vocab_size=61, n_layer=2, n_embd=24, n_head=2, slots=5, chunk_size=4)
    base.update(kw)
    return tr.TrellisConfig(**base)


def tiny_model(seed=0, **kw):
    torch.manual_seed(seed)
    return tr.TrellisLM(tiny_config(**kw)).double().eval()


def decode(model, prompt, new_tokens):
    """Logits for prompt then new_tokens fed one at a time from the carried state."""
    logits, _, state = model(prompt)
    out = [logits]
    for t in range(new_tokens.shape[1]):
        logits, _, state = model(new_tokens[:, t:t + 1], state=state)
        out.append(logits)
    return torch.cat(out, 1), state


@given(seed=st.integers(0, 2**31 - 1), P=st.integers(1, 11), N=st.integers(1, 6), C=st.integers(1, 5),
       mixer=st.sampled_from(["trellis", "attention"]), phi=st.sampled_from(PHIS))
def test_decode_equals_full_forward_exact(seed, P, N, C, mixer, phi):
    """Section 8: prefill (chunked, exact with C - 1 sweeps) then per-token decoding from the
    carried state gives the logits of one full forward pass; likewise for the KV cache."""
    model = tiny_model(seed, mixer=mixer, phi=phi, chunk_size=C, sweeps=C - 1)
    idx = torch.randint(0, 61, (2, P + N), generator=torch.Generator().manual_seed(seed))
    full = model(idx)[0]
    got, _ = decode(model, idx[:, :P], idx[:, P:])
    assert_close(got, full, 1e-9, f"{mixer} logits")


@given(seed=st.integers(0, 2**31 - 1), chunks=st.integers(1, 3), C=st.integers(2, 5), phi=st.sampled_from(PHIS))
def test_decode_chunk_start_rule_at_chunk_boundary(seed, chunks, C, phi):
    """Section 6/8: with the chunk-start rule, a prompt that ends on a chunk boundary leaves the
    same state as the full pass, so the next decoded token's logits match the full pass."""
    model = tiny_model(seed, phi=phi, chunk_size=C, sweeps=0)
    P = chunks * C
    idx = torch.randint(0, 61, (1, P + 1), generator=torch.Generator().manual_seed(seed))
    full = model(idx)[0]
    got, _ = decode(model, idx[:, :P], idx[:, P:])
    assert_close(got, full, 1e-9, "logits")


def test_generation_state_is_constant_size():
    """Section 8: the Trellis state has the same size after 10 and after 1000 tokens (2 m d
    numbers per head and layer, plus the short-conv caches); a KV cache grows."""
    sizes = {}
    for mixer in ("trellis", "attention"):
        model = tiny_model(0, mixer=mixer).float()
        idx = torch.randint(0, 61, (1, 1000))
        _, _, state = model(idx[:, :1])
        for t in range(1, 1000):
            _, _, state = model(idx[:, t:t + 1], state=state)
            if t + 1 in (10, 1000):
                sizes[mixer, t + 1] = tr.state_numel(state)
    cfg = tiny_config()
    memories = cfg.n_layer * 2 * cfg.n_head * cfg.slots * (cfg.n_embd // cfg.n_head)
    convs = cfg.n_layer * 2 * 3 * cfg.n_embd
    assert sizes["trellis", 10] == sizes["trellis", 1000] == memories + convs
    assert sizes["attention", 1000] == 100 * sizes["attention", 10]
    out = tiny_model(0).float().generate(idx[:, :7], max_new_tokens=5, temperature=0.8, top_k=10)
    assert out.shape == (1, 12) and torch.equal(out[:, :7], idx[:, :7])


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


def test_state_dict_round_trip():
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
    (dict(n_layer=2.5), "n_layer"),
])
def test_bad_config_raises(kw, field):
    with pytest.raises(ValueError, match=rf"TrellisConfig\.{field}"):
        tr.TrellisConfig(**kw)


def test_bad_token_input_raises():
    with pytest.raises(ValueError, match="idx must be"):
        tiny_model(0)(torch.randn(2, 5))


# -----------------------------------------------------------------------------
# train_tiny.py, end to end on the CPU


def _text_file(tmp_path):
    """The shared tiny Shakespeare when it is beside the checkout (CI), else a made-up text."""
    for path in (os.environ.get("TRELLIS_DATA"), os.path.join(os.path.dirname(__file__), "..", "shared", "data",
                                                                 "tinyshakespeare.txt")):
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


def test_train_tiny_runs_and_resumes(tmp_path, monkeypatch):
    """A few iterations end to end: the loss goes down, a checkpoint is written, --resume continues
    (and refuses a checkpoint trained with other values of trellis.py's module constants)."""
    import train_tiny

    first = train_tiny.train(train_tiny.parse_args(_train_argv(tmp_path, "--max-iters", "40", "--eval-interval", "20")))
    vals = [h["val"] for h in first["history"]]
    assert [h["iter"] for h in first["history"]] == [0, 20, 40]
    assert vals[-1] < vals[0] - 0.3, vals  # from ~ln(65) = 4.2 toward the character statistics
    ckpt_path = tmp_path / "out" / "ckpt.pt"
    assert torch.load(ckpt_path, weights_only=False)["iter_num"] == 40
    best = torch.load(tmp_path / "out" / "best.pt", weights_only=False)
    assert best["best_val_loss"] == min(vals) and best["iter_num"] == 20 * vals.index(min(vals))
    assert len(first["sample"]) > 0

    second = train_tiny.train(train_tiny.parse_args(
        _train_argv(tmp_path, "--max-iters", "50", "--eval-interval", "20", "--resume")))
    assert [h["iter"] for h in second["history"]] == [50]
    assert second["best_val_loss"] <= first["best_val_loss"]
    assert torch.load(ckpt_path, weights_only=False)["iter_num"] == 50



def test_bench_decode_state_sizes(tmp_path):
    """--bench-decode: the Trellis state is the same size at every context; the KV cache
    grows by exactly one token per position."""
    import train_tiny

    args = train_tiny.parse_args(_train_argv(tmp_path, "--bench-decode", "--contexts", "8,40"))
    rows = train_tiny.bench_decode(args, steps=2, rounds=2)
    size = {(mixer, T): nbytes for mixer, T, ms, nbytes, numel in rows}
    assert all(ms > 0 for _, _, ms, _, _ in rows) and len(rows) == 4
    assert size["trellis", 8] == size["trellis", 40]
    n_layer, n_embd = args.n_layer, args.n_embd
    per_token = 2 * n_layer * n_embd * 4  # k and v, float32 on the CPU
    assert size["attention", 40] - size["attention", 8] == (40 - 8) * per_token


def test_decode_graph_refuses_what_it_cannot_capture():
    """A CUDA graph needs CUDA tensors and a state of fixed shape (Trellis, not a KV cache)."""
    for mixer in ("trellis", "attention"):
        model = tiny_model(0, mixer=mixer).eval()
        logits, _, state = model(torch.zeros(1, 3, dtype=torch.long))
        with pytest.raises(ValueError, match="Trellis model and tensors on a CUDA device"):
            tr.DecodeGraph(model, logits[:, -1:].argmax(-1), state)


def test_train_tiny_gpt2_tokenizer_offline(tmp_path):
    """GPT-2 BPE through tiktoken's cached ranks (TIKTOKEN_CACHE_DIR), token ids cached as uint16."""
    import train_tiny

    if "TIKTOKEN_CACHE_DIR" not in os.environ:
        os.environ["TIKTOKEN_CACHE_DIR"] = os.path.join(os.path.dirname(__file__), "..", "shared", "data",
                                                        "tiktoken_cache")
    argv = _train_argv(tmp_path, "--max-iters", "2", "--eval-interval", "2", "--eval-iters", "1",
                       "--sample-tokens", "3")
    argv[argv.index("char")] = "gpt2"
    out = train_tiny.train(train_tiny.parse_args(argv))
    assert math.isfinite(out["best_val_loss"])
    cached = list((tmp_path / "cache").glob("tokens-*-gpt2/train.bin"))
    assert len(cached) == 1 and cached[0].stat().st_size % 2 == 0


def test_train_tiny_stops_on_nonfinite_loss_and_keeps_checkpoint(tmp_path, monkeypatch):
    import train_tiny

    real_forward, calls = tr.TrellisLM.forward, [0]

    def poisoned(self, idx, targets=None, state=None):
        logits, loss, st_ = real_forward(self, idx, targets, state)
        if self.training and targets is not None:
            calls[0] += 1
            if calls[0] > 12:
                loss = loss * float("nan")
        return logits, loss, st_

    monkeypatch.setattr(tr.TrellisLM, "forward", poisoned)
    with pytest.raises(SystemExit, match="non-finite loss"):
        train_tiny.train(train_tiny.parse_args(_train_argv(tmp_path, "--max-iters", "30", "--eval-interval", "10")))
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
def test_train_tiny_skips_nonfinite_gradients(tmp_path, monkeypatch, bad_calls, stops):
    """A finite loss with an overflowed gradient skips that update (the weights stay finite);
    ten in a row stop the run with the checkpoint intact."""
    import train_tiny

    real_forward, calls = tr.TrellisLM.forward, [0]

    def poisoned(self, idx, targets=None, state=None):
        logits, loss, st_ = real_forward(self, idx, targets, state)
        if self.training and targets is not None:
            calls[0] += 1
            if calls[0] in bad_calls:
                loss = _InfGrad.apply(loss)
        return logits, loss, st_

    monkeypatch.setattr(tr.TrellisLM, "forward", poisoned)
    args = train_tiny.parse_args(_train_argv(tmp_path, "--max-iters", "30", "--eval-interval", "10",
                                             "--sample-tokens", "0"))
    if stops:
        with pytest.raises(SystemExit, match="10 non-finite gradients in a row"):
            train_tiny.train(args)
        ckpt = torch.load(tmp_path / "out" / "ckpt.pt", weights_only=False)
        assert ckpt["iter_num"] == 20 and all(torch.isfinite(p).all() for p in ckpt["model"].values())
    else:
        out = train_tiny.train(args)
        assert out["skipped_updates"] == 2 and out["iters"] == 30
        ckpt = torch.load(tmp_path / "out" / "ckpt.pt", weights_only=False)
        assert all(torch.isfinite(p).all() for p in ckpt["model"].values())


def test_train_tiny_ctrl_c_saves(tmp_path, monkeypatch):
    import train_tiny

    real_get_batch, calls = train_tiny.get_batch, [0]

    def interrupted(data, args, gen):
        calls[0] += 1
        if calls[0] == 8 + 4:  # 4 eval batches per split at iter 0, then 7 training batches
            raise KeyboardInterrupt
        return real_get_batch(data, args, gen)

    monkeypatch.setattr(train_tiny, "get_batch", interrupted)
    with pytest.raises(SystemExit) as e:
        train_tiny.train(train_tiny.parse_args(_train_argv(tmp_path, "--max-iters", "30", "--eval-interval", "20")))
    assert e.value.code == 130
    assert torch.load(tmp_path / "out" / "ckpt.pt", weights_only=False)["iter_num"] == 3


@pytest.mark.parametrize("extra,msg", [(["--data", "/no/such/file.txt"], "no such file"),
                                       (["--data-url", "http://127.0.0.1:9/input.txt"], "could not download")])
def test_train_tiny_missing_data_says_how_to_fix(tmp_path, extra, msg):
    import train_tiny

    argv = _train_argv(tmp_path) + extra
    if "--data-url" in extra:  # no local file: the download is tried and refused
        i = argv.index("--data")
        del argv[i:i + 2]
        argv += ["--data", ""]
    with pytest.raises(SystemExit, match=msg) as e:
        train_tiny.train(train_tiny.parse_args(argv))
    assert "--data" in str(e.value.code)


# -----------------------------------------------------------------------------
# kernel.py: the Triton kernel equals the PyTorch chunked form (CPU: TRITON_INTERPRET=1)


def _as64(ins):
    return [t.detach().double() for t in ins]


@given(p=problems(max_T=40, max_d=20), C=st.sampled_from([16, 32]), phi=st.sampled_from(PHIS),
       f=st.sampled_from(FS))
def test_kernel_equals_chunked_form(p, C, phi, f):
    """Sections 6-7: the Triton forward and hand-written backward equal the PyTorch chunked form
    (float64 reference on the same inputs): outputs, final states, gradients of every input,
    with odd d_k, d_v, m (masked), T not a multiple of C, gates at extremes, nonzero states."""
    ins = make_inputs(p, dtype=torch.float32)
    want, gwant = outputs_and_grads(_as64(ins), p.seed, phi=phi, f=f, chunk_size=C, impl="chunked")
    got, ggot = outputs_and_grads(ins, p.seed, phi=phi, f=f, chunk_size=C, impl="kernel")
    assert_all_close([g.double() for g in got], want, 2e-4, ["o", "K", "V"])
    assert_all_close([g.double() for g in ggot], gwant, 2e-4, GRAD_NAMES)


@given(p=problems(max_T=40, max_d=20), C=st.sampled_from([16, 32]), extra=st.sampled_from([0, 5]),
       phi=st.sampled_from(PHIS), f=st.sampled_from(FS))
def test_kernel_exact_equals_recurrence(p, C, extra, phi, f):
    """Section 6: with sweeps >= C - 1 the kernel runs the exact per-token recurrence (row by
    row inside each chunk, and the transposed solve in the backward): it equals the float64
    per-token loop, outputs, final states and every gradient."""
    ins = make_inputs(p, dtype=torch.float32)
    want, gwant = outputs_and_grads(_as64(ins), p.seed, phi=phi, f=f, chunk_size=1, impl="loop")
    got, ggot = outputs_and_grads(ins, p.seed, phi=phi, f=f, chunk_size=C, sweeps=C - 1 + extra, impl="kernel")
    assert_all_close([g.double() for g in got], want, 2e-4, ["o", "K", "V"])
    assert_all_close([g.double() for g in ggot], gwant, 2e-4, GRAD_NAMES)


@pytest.mark.parametrize("phi", PHIS)
def test_kernel_bf16_inputs(phi):
    """bf16 q, k, v, alpha with fp32 memories: the kernel equals the float64 chunked form on
    the same (bf16-rounded) inputs to bf16 output rounding."""
    p = Problem(B=2, T=45, H=2, dk=16, dv=32, m=16, gates="mixed", zero_init=False, seed=4)
    ins = make_inputs(p, dtype=torch.float32)
    ins[:4] = [t.bfloat16() for t in ins[:4]]
    want, gwant = outputs_and_grads(_as64(ins), 4, phi=phi, chunk_size=16, impl="chunked")
    got, ggot = outputs_and_grads(ins, 4, phi=phi, chunk_size=16, impl="kernel")
    assert got[0].dtype == torch.bfloat16 and got[1].dtype == torch.float32
    # bf16 tensors (o and the gradients of the bf16 inputs) to bf16 rounding (2^-8), fp32 ones to 2e-4
    for a, b, n in zip(got + ggot, want + gwant, ["o", "K", "V"] + GRAD_NAMES):
        assert_close(a.double(), b, 1e-2 if a.dtype == torch.bfloat16 else 2e-4, n)


def test_kernel_finite_at_extremes():
    """Zero memories (normalized SiLU at zero variance), beta = 0 and 1, in the kernel."""
    p = Problem(B=1, T=40, H=2, dk=16, dv=16, m=16, gates="uniform", zero_init=True, seed=2)
    q, k, v, alpha, beta, gamma, K0, V0 = make_inputs(p, dtype=torch.float32)
    for b in (torch.zeros_like(beta), torch.ones_like(beta)):
        ins = [q, k, v, alpha, b, gamma, K0, V0]
        want, _ = outputs_and_grads(_as64(ins), 0, chunk_size=16, impl="chunked")
        got, ggot = outputs_and_grads(ins, 0, chunk_size=16, impl="kernel")
        assert all(torch.isfinite(g).all() for g in got + ggot)
        assert_all_close([g.double() for g in got], want, 2e-4, ["o", "K", "V"])


@pytest.mark.parametrize("kw,msg", [
    (dict(sweeps=1), "sweeps=1 is not supported"), (dict(chunk_size=8), "chunk_size must be 16, 32 or 64"),
    (dict(chunk_size=48), "chunk_size must be"),
])
def test_kernel_unsupported_options_raise(kw, msg):
    a = _good()
    with pytest.raises(ValueError, match="kernel: " + msg):
        tr.trellis_op(*[a[n] for n in NAMES], impl="kernel", **{"chunk_size": 16, **kw})


def test_kernel_unsupported_inputs_raise():
    a = _good()
    with pytest.raises(ValueError, match="kernel: float64"):
        tr.trellis_op(*[a[n].double() for n in NAMES], impl="kernel", chunk_size=16)
    p = Problem(B=1, T=3, H=1, dk=130, dv=4, m=4, gates="uniform", zero_init=False, seed=0)
    with pytest.raises(ValueError, match="kernel: d_k=130"):
        tr.trellis_op(*make_inputs(p, dtype=torch.float32), impl="kernel", chunk_size=16)


@pytest.mark.parametrize("sweeps", [0, 15])
def test_model_with_kernel_equals_chunked(sweeps):
    """The model dispatches to the kernel with its real tensors (views, expanded initial
    memories): same logits and parameter gradients as the PyTorch chunked form, for the
    chunk-start rule and the exact recurrence."""
    results = []
    for impl in ("chunked", "kernel"):
        torch.manual_seed(0)
        model = tr.TrellisLM(tiny_config(n_embd=32, n_head=2, slots=16, chunk_size=16, sweeps=sweeps, impl=impl))
        idx = torch.randint(0, 61, (2, 37), generator=torch.Generator().manual_seed(1))
        logits, loss, _ = model(idx, targets=torch.roll(idx, -1, 1))
        loss.backward()
        results.append([logits.detach()] + [p.grad for p in model.parameters()])
    names = ["logits"] + [n for n, _ in model.named_parameters()]
    assert_all_close(results[1], results[0], 1e-4, names)


def test_train_tiny_eval_exact(tmp_path):
    """--eval-exact reports the trained chunk-start model's val loss under the exact recurrence."""
    import train_tiny

    out = train_tiny.train(train_tiny.parse_args(
        _train_argv(tmp_path, "--max-iters", "4", "--eval-interval", "4", "--sample-tokens", "0", "--eval-exact")))
    assert math.isfinite(out["val_loss_exact"]) and out["val_loss_exact"] != out["history"][-1]["val"]


@pytest.mark.parametrize("impl,sweeps", [("loop", 0), ("chunked", 0), ("chunked", 7)])
def test_operator_ignores_bf16_autocast(impl, sweeps):
    """Section 7: memories and gate arithmetic stay float32 under a caller's bf16 autocast
    (the operator's matmuls must not be downcast): same result as without autocast."""
    p = Problem(B=1, T=40, H=2, dk=8, dv=8, m=8, gates="uniform", zero_init=False, seed=8)
    ins = make_inputs(p, dtype=torch.float32)
    want = tr.trellis_op(*ins, chunk_size=8, sweeps=sweeps, impl=impl)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = tr.trellis_op(*ins, chunk_size=8, sweeps=sweeps, impl=impl)
    assert all(g.dtype == torch.float32 for g in got)
    assert_all_close(got, want, 1e-6, ["o", "K", "V"])
