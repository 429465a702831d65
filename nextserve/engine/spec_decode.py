"""MTP speculative decoding: draft with the model's own MTP head, verify with one target forward, commit exactly.

Per decoding sequence and step (c = tokens cached, x_c the last sampled token, not yet cached):
  verify   the target runs [x_c, d_1..d_k] at positions c..c+k in the same flat batch as everyone else. The Gated
           DeltaNet layers write the state after each of the first k positions into scratch slots (in-step
           snapshots); the live slot ends at c+k+1 and is overwritten from a scratch slot when fewer drafts are
           accepted, so the live state is only ever the state of verified tokens once the step is over.
  accept   greedy rows: d_i while it equals the target's argmax at c+i-1, then the target's own token (bonus).
           Sampled rows: rejection sampling (accept d_i with probability min(1, p(d_i)/q(d_i)), else draw from
           norm(max(p - q, 0))), which leaves the target distribution unchanged.
  MTP pass the MTP layer runs over every position the target committed this step (input: target hidden at p,
           token p+1), so its own KV cache covers every verified position; rejected positions are never cached.
  draft    from the MTP output at the last position: d_1; then k-1 more MTP steps, each feeding back its own normed
           hidden state and the previous draft.
The number of drafts per step adapts (`DraftPolicy`): it maximises expected committed tokens per second, from the
measured acceptance per position and a measured cost model of the step, down to zero drafts.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from nextserve.engine.cache_manager import CacheManager
from nextserve.engine.request import Sequence
from nextserve.engine.sampler import SamplingRow, build_sampling_batch, process_logits, sample
from nextserve.forward_batch import ForwardBatch

logger = logging.getLogger(__name__)


@dataclass
class SpecStats:
    drafted: int = 0
    accepted: int = 0
    verify_steps: int = 0
    accepted_at: list[int] = field(default_factory=list)  # per draft position
    drafted_at: list[int] = field(default_factory=list)

    def record(self, num_drafts: int, num_accepted: int) -> None:
        while len(self.drafted_at) < num_drafts:
            self.drafted_at.append(0)
            self.accepted_at.append(0)
        for i in range(num_drafts):
            self.drafted_at[i] += 1
            self.accepted_at[i] += i < num_accepted
        self.drafted += num_drafts
        self.accepted += num_accepted
        self.verify_steps += 1

    @property
    def mean_acceptance_length(self) -> float:
        """Tokens committed per verify step (accepted drafts + the target's own token)."""
        return (self.accepted + self.verify_steps) / max(self.verify_steps, 1)


class DraftPolicy:
    """Chooses the number of drafts k in [0, max_steps] for the next step.

    Expected committed tokens per sequence with k drafts: E(k) = 1 + sum_{i<=k} prod_{j<=i} a_j, with a_j the
    measured acceptance rate at draft position j. Step time is modelled as t(T) = t0 + t1 * T over T target tokens,
    plus k MTP steps of cost m each, both fitted from measured steps. k maximises B * E(k) / (t(B(k+1)) + k m).
    Until enough is measured, the prior is optimistic about acceptance and compute-light (GPU-like).
    """

    def __init__(self, max_steps: int, fixed: bool = False):
        self.max_steps = max_steps
        self.fixed = fixed
        self.acc = [0.8] * max_steps  # prior acceptance per position
        self.samples: deque[tuple[int, float]] = deque(maxlen=64)  # (target tokens, seconds) of recent steps
        self.mtp_cost = 0.0
        self.last_choice: int | None = None
        # Tensor parallelism: the leader records its observations (`take_observations`) and every follower
        # `replay`s them instead of its own, so all ranks choose the same number of drafts.
        self.record = False
        self.follower = False
        self._observations: list[tuple[int, float, float, int]] = []

    def observe_acceptance(self, num_drafts: int, num_accepted: int) -> None:
        for i in range(num_drafts):
            # Position i is reached only if all before it were accepted: update it only then.
            if i > num_accepted:
                break
            self.acc[i] = 0.95 * self.acc[i] + 0.05 * float(i < num_accepted)

    def observe_step(self, target_tokens: int, seconds: float, mtp_seconds: float, mtp_steps: int) -> None:
        if self.follower:
            return
        if self.record:
            self._observations.append((target_tokens, seconds, mtp_seconds, mtp_steps))
        self._observe(target_tokens, seconds, mtp_seconds, mtp_steps)

    def take_observations(self) -> list[tuple[int, float, float, int]]:
        out, self._observations = self._observations, []
        return out

    def replay(self, observations: list[tuple[int, float, float, int]]) -> None:
        for obs in observations:
            self._observe(*obs)

    def _observe(self, target_tokens: int, seconds: float, mtp_seconds: float, mtp_steps: int) -> None:
        self.samples.append((target_tokens, seconds))
        if mtp_steps:
            self.mtp_cost = (
                0.9 * self.mtp_cost + 0.1 * (mtp_seconds / mtp_steps) if self.mtp_cost else (mtp_seconds / mtp_steps)
            )

    def _fit(self) -> tuple[float, float]:
        if len(self.samples) < 8:
            return 1.0, 0.0  # prior: fixed cost dominates (memory-bound GPU decode)
        n = len(self.samples)
        xs = [t for t, _ in self.samples]
        ys = [s for _, s in self.samples]
        mx, my = sum(xs) / n, sum(ys) / n
        var = sum((x - mx) ** 2 for x in xs)
        slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / var if var > 0 else 0.0
        slope = max(slope, 0.0)
        return max(my - slope * mx, 1e-6), slope

    def choose(self, batch_size: int) -> int:
        if self.fixed or self.max_steps == 0:
            self.last_choice = self.max_steps
            return self.max_steps
        t0, t1 = self._fit()
        best_k, best_rate = 0, 0.0
        for k in range(self.max_steps + 1):
            expected, run = 1.0, 1.0
            for i in range(k):
                run *= self.acc[i]
                expected += run
            cost = t0 + t1 * batch_size * (k + 1) + k * (self.mtp_cost if len(self.samples) >= 8 else 0.0)
            rate = expected / cost
            if rate > best_rate * 1.02:  # prefer fewer drafts unless clearly better
                best_k, best_rate = k, rate
        if best_k != self.last_choice:
            logger.info(
                "speculative decoding: %d draft tokens (batch %d, acceptance %s, step cost %.2e + %.2e/token)",
                best_k,
                batch_size,
                [round(a, 2) for a in self.acc],
                t0,
                t1,
            )
            self.last_choice = best_k
        return best_k


class SpecDecoder:
    """Owns drafting, verification and acceptance. The engine calls it at three points of a step:

      plan_scratch(scheduled)        before the forward: scratch slots for the verify rows' intermediate states
      accept(verify, groups, ...)    after it: accepted tokens per verify group, the sequences' caches committed
      draft(scheduled, hidden, ...)  at the end: the MTP pass and the next drafts (seq.draft, seq.draft_probs)

    It holds the model, the cache manager and the engine's sampling-row function, never the engine."""

    def __init__(
        self,
        model,
        cache: CacheManager,
        device: torch.device,
        max_model_len: int,
        sampling_row: Callable[[Sequence, list[int]], SamplingRow],
        max_steps: int,
        adaptive: bool,
    ):
        self.model = model
        self.cache = cache
        self.device = device
        self.max_model_len = max_model_len
        self.sampling_row = sampling_row
        self.max_steps = max_steps
        self.policy = DraftPolicy(max_steps, fixed=not adaptive)
        self.stats = SpecStats()

    # ---- before the step: scratch slots for the verify rows' intermediate states ---------------------------
    def plan_scratch(self, scheduled) -> list[tuple[int, int, int]]:
        """(index in batch, offset, slot): the state after each of the first k verify tokens goes to a scratch
        slot, so that any accepted prefix can be committed."""
        plan = []
        for b, s in enumerate(scheduled):
            for offset in range(1, s.num_tokens if s.draft else 0):
                plan.append((b, offset, self.cache.allocate_scratch()))
        return plan

    # ---- after the step: acceptance and commit -------------------------------------------------------------
    def accept(self, verify, groups: list[torch.Tensor], scheduled, scratch) -> list[list[int]]:
        """Decides each verify group (ScheduledSeq with drafts; `groups` their logits rows) and commits it: the
        accepted tokens become cached, the live state becomes the state after the last of them, pages that held
        rejected positions go back. Frees the step's scratch slots. Returns the tokens to append per group."""
        rows = [[self.sampling_row(s.seq, s.draft[:j]) for j in range(s.num_tokens)] for s in verify]
        accepted = self.verify_all(verify, groups, rows) if verify else []
        scratch_of = {}
        for b, offset, slot in scratch:
            scratch_of.setdefault(scheduled[b].seq.seq_id, {})[offset] = slot
        for s, tokens in zip(verify, accepted):
            seq = s.seq
            consumed = len(tokens)  # last sampled token + accepted drafts are now cached
            seq.num_cached += consumed
            if consumed < s.num_tokens:
                self.cache.commit_state(scratch_of[seq.seq_id][consumed], seq)
            self.cache.shrink(seq, seq.num_cached + 1)  # what the next step needs
        if scratch:
            self.cache.free_scratch([slot for _, _, slot in scratch])
        return accepted

    # ---- acceptance ----------------------------------------------------------------------------------------
    def verify_all(self, scheduled, groups: list[torch.Tensor], rows: list[list[SamplingRow]]) -> list[list[int]]:
        """Tokens to append per verify group: accepted drafts, then the target's own token. Greedy groups are
        decided together by one sampler call over all their rows; sampled groups one by one."""
        out: list[list[int] | None] = [None] * len(scheduled)
        greedy = [i for i, s in enumerate(scheduled) if s.seq.params.greedy]
        if greedy:
            flat_rows = [r for i in greedy for r in rows[i]]
            logits = torch.cat([groups[i] for i in greedy])
            target = sample(logits, build_sampling_batch(flat_rows, logits.shape[-1], self.device))
            target = target.token_ids.tolist()
            start = 0
            for i in greedy:
                draft, n = scheduled[i].draft, len(rows[i])
                t = target[start : start + n]
                start += n
                j = 0
                while j < len(draft) and draft[j] == t[j]:
                    j += 1
                out[i] = draft[:j] + [t[j]]
        for i, s in enumerate(scheduled):
            if out[i] is None:
                out[i] = self._rejection_sample(s, groups[i], rows[i])
        for s, tokens in zip(scheduled, out):
            self.stats.record(len(s.draft), len(tokens) - 1)
            self.policy.observe_acceptance(len(s.draft), len(tokens) - 1)
        return out

    def _rejection_sample(self, s, logits: torch.Tensor, rows: list[SamplingRow]) -> list[int]:
        """Accept d_i with probability min(1, p(d_i)/q(d_i)); on rejection draw from norm(max(p - q, 0)); if all
        are accepted, draw the bonus token from p. The committed tokens follow the target distribution."""
        seq, draft = s.seq, s.draft
        p = torch.softmax(process_logits(logits, build_sampling_batch(rows, logits.shape[-1], self.device)), -1)
        q, gen = seq.draft_probs, seq.generator
        tokens = []
        for i, d in enumerate(draft):
            u = torch.rand((), generator=gen, device=p.device) if gen is not None else torch.rand((), device=p.device)
            if u.item() < min(1.0, (p[i, d] / q[i, d].clamp_min(1e-20)).item()):
                tokens.append(d)
                continue
            residual = (p[i] - q[i]).clamp_min(0)
            residual = residual / residual.sum() if residual.sum() > 0 else p[i]
            tokens.append(int(torch.multinomial(residual, 1, generator=gen).item()))
            return tokens
        tokens.append(int(torch.multinomial(p[len(draft)], 1, generator=gen).item()))
        return tokens

    # ---- at the end of the step: MTP pass and drafts -------------------------------------------------------
    def draft(self, scheduled, hidden: torch.Tensor, starts: dict, t_target: float, target_tokens: int) -> None:
        """MTP pass over every position committed this step, then drafts for the sequences about to decode.
        `starts` maps seq_id to (first position, first hidden row) of what the step computed.

        When the policy chooses no drafts the MTP pass is skipped too, so plain decoding costs nothing extra; the
        positions decoded meanwhile are missing from the MTP layer's cache, which only lowers later acceptance
        (verification keeps the output exact)."""
        decoding = [
            s.seq for s in scheduled if not s.seq.stopped and s.seq.num_uncached == 1 and s.seq.slot is not None
        ]
        k = self.policy.choose(len(decoding)) if decoding else 0
        if k == 0:
            for seq in decoding:
                seq.draft, seq.draft_probs = [], None
            self.policy.observe_step(target_tokens, t_target, 0.0, 0)
            return
        t0 = time.perf_counter()
        items = []
        for s in scheduled:
            seq = s.seq
            first, row = starts[seq.seq_id]
            n = seq.num_cached - first
            if n > 0 and seq.num_cached < len(seq.token_ids):
                items.append((seq, first, hidden[row : row + n]))
        last = self.mtp_pass(items)
        self.propose(decoding, last, k)
        self.policy.observe_step(target_tokens, t_target, time.perf_counter() - t0, k)

    # ---- MTP pass over committed positions, then drafting --------------------------------------------------
    @torch.inference_mode()
    def mtp_pass(self, items: list[tuple[Sequence, int, torch.Tensor]]) -> dict[int, torch.Tensor]:
        """items: (seq, first position, target hidden rows [n, H]) for positions committed this step; the input
        token at position p is seq.token_ids[p + 1]. Returns the MTP output at each sequence's last position."""
        if not items:
            return {}
        ids, hidden = [], []
        for seq, start, h in items:
            ids += seq.token_ids[start + 1 : start + 1 + h.shape[0]]
            hidden.append(h)
        batch = ForwardBatch.build(
            query_lens=[h.shape[0] for _, _, h in items],
            cached_lens=[start for _, start, _ in items],
            state_slots=[0] * len(items),
            page_tables=[seq.pages for seq, _, _ in items],
            page_size=self.cache.page_size,
            device=self.device,
        )
        out = self.model.mtp_forward(torch.tensor(ids, device=self.device), torch.cat(hidden), batch)
        last = batch.cu_seqlens[1:].long() - 1
        return {seq.seq_id: out[i] for (seq, _, _), i in zip(items, last.tolist())}

    @torch.inference_mode()
    def propose(self, seqs: list[Sequence], last_hidden: dict[int, torch.Tensor], k: int) -> None:
        """Sets seq.draft (k tokens, fewer near max_tokens) for each sequence about to decode."""
        todo = []
        for seq in seqs:
            seq.draft, seq.draft_probs = [], None
            room = min(seq.request.max_tokens - len(seq.output_ids), self.max_model_len - len(seq.token_ids)) - 1
            kk = min(k, room)
            if kk <= 0 or seq.seq_id not in last_hidden:
                continue
            # MTP KV for draft positions c .. c+kk-2 (the verify step allocates the rest).
            if not self.cache.can_grow(seq, seq.num_cached + kk - 1):
                continue
            self.cache.grow(seq, seq.num_cached + kk - 1)
            todo.append((seq, kk))
        if not todo:
            return
        hidden = torch.stack([last_hidden[seq.seq_id] for seq, _ in todo])
        probs: list[list[torch.Tensor]] = [[] for _ in todo]
        for step in range(max(kk for _, kk in todo)):
            active = [i for i, (_, kk) in enumerate(todo) if kk > step]
            rows = [self._row(todo[i][0]) for i in active]
            logits = self.model.compute_logits(hidden[active]).float()
            batch = build_sampling_batch(rows, logits.shape[-1], self.device)
            if all(todo[i][0].params.greedy for i in active):
                tokens = sample(logits, batch).token_ids.tolist()
            else:
                q = torch.softmax(process_logits(logits, batch), dim=-1)
                tokens = []
                for r, i in enumerate(active):
                    seq = todo[i][0]
                    if seq.params.greedy:
                        tokens.append(int(q[r].argmax()))
                    else:
                        tokens.append(int(torch.multinomial(q[r], 1, generator=seq.generator).item()))
                        probs[i].append(q[r])
            for r, i in enumerate(active):
                todo[i][0].draft.append(tokens[r])
            if step + 1 == max(todo[i][1] for i in active):
                break
            nxt = [i for i in active if todo[i][1] > step + 1]
            if not nxt:
                break
            # Next draft step: position c + step, input = the draft just made, hidden = MTP's own output.
            batch = ForwardBatch.build(
                query_lens=[1] * len(nxt),
                cached_lens=[todo[i][0].num_cached + step for i in nxt],
                state_slots=[0] * len(nxt),
                page_tables=[todo[i][0].pages for i in nxt],
                page_size=self.cache.page_size,
                device=self.device,
            )
            ids = torch.tensor([todo[i][0].draft[-1] for i in nxt], device=self.device)
            out = self.model.mtp_forward(ids, hidden[nxt], batch)
            hidden = hidden.clone()
            hidden[nxt] = out
        for i, (seq, _) in enumerate(todo):
            if probs[i]:
                seq.draft_probs = torch.stack(probs[i])

    def _row(self, seq: Sequence) -> SamplingRow:
        """Sampling row for the next draft position: the history includes the drafts made so far."""
        return self.sampling_row(seq, seq.draft)
