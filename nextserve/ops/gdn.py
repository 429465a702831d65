"""Gated delta rule (Gated DeltaNet's recurrence, spec sections 7.5-7.7), recurrent and chunked, over a varlen batch.

Per value head, with state S in R^{dk x dv}:  S_t = exp(g_t) S_{t-1} + k_t (beta_t (v_t - (exp(g_t) S_{t-1})^T k_t))^T,
o_t = S_t^T q_t, where q and k are L2-normalised inside the op and q is scaled by dk^-0.5.

Shapes for one sequence: q, k [T, Hk, dk]; v [T, Hv, dv]; g (log decay, <= 0) and beta [T, Hv]; state [Hv, dk, dv].
Value head h reads key head h // (Hv / Hk). All arithmetic is fp32; outputs are cast to v's dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from nextserve.forward_batch import ForwardBatch

try:  # CUDA fast path (Triton, plus fla-core for prefill); absent on CPU-only installs.
    from nextserve.ops import gdn_cuda
except ImportError as e:
    gdn_cuda, IMPORT_ERROR = None, e
else:
    IMPORT_ERROR = None

CHUNK = 64
# Uniform batches (every sequence the same number of new tokens) up to this length use the batched recurrent form.
UNIFORM_RECURRENT_MAX = 8


def _prepare(q, k, v, g, beta):
    r = v.shape[-2] // q.shape[-2]
    q = _l2norm(q.float())
    k = _l2norm(k.float())
    if r > 1:
        q = q.repeat_interleave(r, dim=-2)
        k = k.repeat_interleave(r, dim=-2)
    q = q * q.shape[-1] ** -0.5
    return q, k, v.float(), g.float(), beta.float()


def _l2norm(x: torch.Tensor) -> torch.Tensor:
    return x * torch.rsqrt((x * x).sum(-1, keepdim=True) + 1e-6)


def recurrent_gated_delta_rule(q, k, v, g, beta, state, keep_steps: bool = False):
    """Token-by-token reference. Shapes [..., T, H, d] with any leading batch dims; state [..., Hv, dk, dv] fp32.
    Returns (o [..., T, Hv, dv] in v.dtype, final state fp32), plus the state after every step with keep_steps."""
    dtype = v.dtype
    q, k, v, g, beta = _prepare(q, k, v, g, beta)
    s = state.float().clone()
    outs, steps = [], []
    for t in range(q.shape[-3]):
        s = s * g[..., t, :, None, None].exp()
        pred = torch.einsum("...hkv,...hk->...hv", s, k[..., t, :, :])
        u = beta[..., t, :, None] * (v[..., t, :, :] - pred)
        s = s + k[..., t, :, :, None] * u[..., None, :]
        outs.append(torch.einsum("...hkv,...hk->...hv", s, q[..., t, :, :]))
        if keep_steps:
            steps.append(s)
    o = torch.stack(outs, dim=-3).to(dtype)
    return (o, s, steps) if keep_steps else (o, s)


def chunk_gated_delta_rule(q, k, v, g, beta, state, chunk: int = CHUNK):
    """Chunked (WY / UT-transform) form for one sequence, mathematically equal to the recurrent one.
    q, k [T, Hk, dk]; v [T, Hv, dv]; g, beta [T, Hv]; state [Hv, dk, dv]. Returns (o [T, Hv, dv], state)."""
    dtype = v.dtype
    T = q.shape[0]
    q, k, v, g, beta = _prepare(q, k, v, g, beta)
    pad = (-T) % chunk
    # -> head-major [H, T', d], zero-padded to whole chunks (padded steps have g = 0, beta = 0: no-ops)
    q, k, v = (F.pad(x, (0, 0, 0, 0, 0, pad)).transpose(0, 1) for x in (q, k, v))
    g, beta = (F.pad(x, (0, 0, 0, pad)).transpose(0, 1) for x in (g, beta))
    H, Tp, dk = k.shape
    n = Tp // chunk
    q, k, v = (x.reshape(H, n, chunk, x.shape[-1]) for x in (q, k, v))
    g, beta = g.reshape(H, n, chunk), beta.reshape(H, n, chunk)

    gamma = g.cumsum(-1)  # [H, n, C] cumulative log decay inside each chunk
    causal = torch.ones(chunk, chunk, dtype=torch.bool, device=q.device).tril()
    decay = (gamma[..., :, None] - gamma[..., None, :]).masked_fill(~causal, float("-inf")).exp()  # Gamma_ij
    kb = k * beta[..., None]
    lower = (kb @ k.transpose(-1, -2) * decay).tril(-1)  # L = strictly-lower(diag(beta) K K^T o Gamma)
    eye = torch.eye(chunk, dtype=q.dtype, device=q.device)
    # Tm = (I + L)^-1 by a unit-lower-triangular solve; U = Tm diag(beta) V, W = Tm diag(beta exp(gamma)) K
    u = torch.linalg.solve_triangular(eye + lower, v * beta[..., None], upper=False, unitriangular=True)
    w = torch.linalg.solve_triangular(eye + lower, kb * gamma.exp()[..., None], upper=False, unitriangular=True)
    attn = (q @ k.transpose(-1, -2)) * decay  # intra-chunk, masked to i >= j by decay
    q_dec = q * gamma.exp()[..., None]
    k_dec = k * (gamma[..., -1:] - gamma).exp()[..., None]
    last = gamma[..., -1].exp()  # [H, n]

    s = state.float().clone()
    o = torch.empty_like(v)
    for i in range(n):
        v_new = u[:, i] - w[:, i] @ s  # V' = U - W S
        o[:, i] = q_dec[:, i] @ s + attn[:, i] @ v_new
        s = s * last[:, i, None, None] + k_dec[:, i].transpose(-1, -2) @ v_new
    o = o.reshape(H, Tp, -1)[:, :T].transpose(0, 1)
    return o.to(dtype), s


def gdn_gates(ba: torch.Tensor, A_log: torch.Tensor, dt_bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The per-head gates from the in_proj_ba output ba [T, Hk, 2r] ([b | a] per key head): returns
    (g = -exp(A_log) * softplus(a + dt_bias) [T, Hv] fp32, beta = sigmoid(b) [T, Hv] in ba's dtype)."""
    if ba.is_cuda and gdn_cuda is not None:
        return gdn_cuda.gdn_gates(ba, A_log, dt_bias)
    T, r = ba.shape[0], ba.shape[-1] // 2
    b, a = (x.reshape(T, -1) for x in ba.split([r, r], dim=-1))
    return -A_log.float().exp() * F.softplus(a.float() + dt_bias), torch.sigmoid(b)


def gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    ssm_states: torch.Tensor,
    batch: ForwardBatch,
) -> torch.Tensor:
    """Varlen gated delta rule over the step. q, k [T, Hk, dk]; v [T, Hv, dv]; g, beta [T, Hv];
    ssm_states [S, Hv, dk, dv] is the layer's slot pool, read as the initial state and updated in place."""
    if q.is_cuda and gdn_cuda is not None and gdn_cuda.can_run(batch):
        return gdn_cuda.gated_delta_rule(q, k, v, g, beta, ssm_states, batch)
    slots = batch.state_slots
    n = batch.uniform_len
    if n is not None and n <= UNIFORM_RECURRENT_MAX:
        # Every sequence brings the same few tokens (decode, speculative verify): the recurrent form over the
        # whole batch at once, states gathered by slot; snapshots read the state after their offset.
        B = len(batch.query_lens)
        shape = lambda x: x.view(B, n, *x.shape[1:])  # noqa: E731  [T, ...] -> [B, n, ...]
        o, s, steps = recurrent_gated_delta_rule(
            shape(q), shape(k), shape(v), shape(g), shape(beta), ssm_states[slots], keep_steps=True
        )
        for b, offset, dst in batch.snapshots:
            ssm_states[dst] = steps[offset - 1][b].to(ssm_states.dtype)
        ssm_states[slots] = s.to(ssm_states.dtype)
        return o.reshape(v.shape)
    out = torch.empty_like(v)
    start = 0
    for b, n in enumerate(batch.query_lens):
        slot = int(slots[b])
        s = ssm_states[slot]
        # A snapshot inside the chunk splits the computation there (chunks carrying state are exact).
        cuts = batch.snapshots_of(b) + [(n, None)]
        lo = 0
        for hi, dst in cuts:
            if hi > lo:
                sl = slice(start + lo, start + hi)
                out[sl], s = chunk_gated_delta_rule(q[sl], k[sl], v[sl], g[sl], beta[sl], s)
            if dst is not None:
                ssm_states[dst] = s.to(ssm_states.dtype)
            lo = hi
        ssm_states[slot] = s.to(ssm_states.dtype)
        start += n
    return out
