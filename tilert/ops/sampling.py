"""Token selection: greedy argmax, DFlash greedy acceptance (DESIGN §7), and sampling with the
speculative rejection rule that keeps the target's distribution exactly.

The sampling functions run on the host in float64 on a few rows of logits per step; each request
draws from its own `torch.Generator`, so a seed reproduces its tokens.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch


def argmax(logits: torch.Tensor) -> torch.Tensor:
    """Greedy token per row; ties go to the lowest id (torch.argmax's first-max rule)."""
    return torch.argmax(logits.float(), dim=-1).to(torch.int32)


def dflash_accept(draft: torch.Tensor, posterior: torch.Tensor) -> torch.Tensor:
    """Greedy block acceptance, all on device tensors (no host round trip).

    draft: [B] block tokens (draft[0] is the anchor, already verified); posterior: [B] argmax of the
    target logits at each block position. Returns int32 [B + 1]: out[0] = accepted (longest prefix
    with draft[1:] == posterior[:-1]), out[1 : accepted + 2] = the tokens to emit (draft[1:accepted+1]
    followed by the bonus token posterior[accepted]), the rest -1.
    """
    B = draft.shape[0]
    match = (draft[1:].long() == posterior[:-1].long()).to(torch.int32)
    accepted = torch.cumprod(match, 0).sum().to(torch.int32).view(1)
    at = accepted.long()
    seq = torch.cat([draft[1:].to(torch.int32), draft.new_zeros(1, dtype=torch.int32)])
    seq = seq.scatter(0, at, posterior.to(torch.int32).gather(0, at))
    seq = torch.where(torch.arange(B, device=draft.device) <= at, seq, torch.full_like(seq, -1))
    return torch.cat([accepted, seq])


# ---- sampling ----------------------------------------------------------------------------------


def sampling_probs(logits: torch.Tensor, temperature: float, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """The distribution a sampled token is drawn from, float64 [..., V] (rows sum to 1).

    softmax(logits / temperature), then top-k (keep the k most likely; 0 = all), then top-p (keep
    the smallest set of most likely tokens whose mass reaches top_p of what top-k kept; the most
    likely token always stays), renormalised. temperature must be > 0. Only the candidates are
    ranked (top-k, or a top-p prefix found by doubling), never the whole vocabulary unless needed.
    """
    if logits.dim() > 1:
        return torch.stack([sampling_probs(row, temperature, top_k, top_p) for row in logits])
    probs = torch.softmax(logits.double() / temperature, dim=-1)
    V = probs.shape[-1]
    k = top_k if 0 < top_k < V else V
    if k == V and top_p >= 1.0:
        return probs
    n = k if (k < V or top_p >= 1.0) else min(64, V)
    while True:
        vals, idx = torch.topk(probs, n)  # most likely first
        if top_p >= 1.0:
            m = n
            break
        mass = float(vals.sum()) if n == k else float(probs.sum())  # what top-k kept (all of it without top-k)
        before = torch.cumsum(vals, 0) - vals
        m = max(1, int((before < top_p * mass).sum()))
        if m < n or n == k:
            break
        n = min(2 * n, k)
    out = torch.zeros_like(probs)
    out[idx[:m]] = vals[:m] / vals[:m].sum()
    return out


def uniform(generator: torch.Generator) -> float:
    """One draw from U[0, 1) (float64) of the request's generator."""
    return float(torch.rand((), dtype=torch.float64, generator=generator))


def sample(probs: torch.Tensor, generator: torch.Generator) -> int:
    """One token from a distribution [V] by inverse CDF; a zero-probability token is never drawn."""
    cdf = torch.cumsum(probs.double(), dim=-1)
    x = uniform(generator) * float(cdf[-1])
    return min(int(torch.searchsorted(cdf, torch.tensor([x], dtype=torch.float64), right=True)), probs.shape[-1] - 1)


def speculative_accept(
    draft: Sequence[int],
    target_probs: torch.Tensor | Callable[[int], torch.Tensor],
    generator: torch.Generator,
    draft_probs: torch.Tensor | None = None,
) -> list[int]:
    """Verify a drafted block by the standard rejection rule; returns the tokens to emit.

    draft: the block [anchor, x_1 .. x_{B-1}]; target_probs [B, V] (or a function of i, so rows
    past the first rejection are never computed): row i is the target's sampling distribution p_i
    for the token after draft[i]; draft_probs [B-1, V]: row i-1 is the drafter's
    distribution q_i that x_i was drawn from (None: greedy drafts, q_i one-hot at x_i).
    Each x_i is accepted with probability min(1, p(x_i) / q(x_i)); the first rejected one is
    replaced by a draw from normalize(max(0, p - q)) and the block ends there; if all are accepted
    a bonus token is drawn from the last row. Every emitted token is then distributed exactly as
    plain sampling from the target would give it.
    """
    row = target_probs if callable(target_probs) else target_probs.__getitem__
    out: list[int] = []
    for i in range(1, len(draft)):
        x = int(draft[i])
        p = row(i - 1).double()
        q = None if draft_probs is None else draft_probs[i - 1].double()
        q_x = 1.0 if q is None else float(q[x])
        if uniform(generator) * q_x < float(p[x]):
            out.append(x)
            continue
        if q is None:
            residual = p.clone()
            residual[x] = 0.0
        else:
            residual = torch.clamp(p - q, min=0.0)
        out.append(sample(residual if float(residual.sum()) > 0 else p, generator))
        return out
    out.append(sample(row(len(draft) - 1), generator))
    return out


def token_logprobs(
    logits: torch.Tensor, tokens: Sequence[int], top_n: int
) -> list[tuple[float, list[tuple[int, float]]]]:
    """Per row: (log-probability of tokens[row], the top_n (token, log-probability) pairs, most
    likely first) under log_softmax(logits), the model's own distribution (before temperature,
    top-k and top-p)."""
    lp = torch.log_softmax(logits.double(), dim=-1)
    chosen = lp.gather(-1, torch.tensor(list(tokens), dtype=torch.long).view(-1, 1)).view(-1).tolist()
    if top_n <= 0:
        return [(c, []) for c in chosen]
    vals, idx = torch.topk(lp, min(top_n, lp.shape[-1]), dim=-1)
    return [(c, list(zip(i, v))) for c, i, v in zip(chosen, idx.tolist(), vals.tolist())]
