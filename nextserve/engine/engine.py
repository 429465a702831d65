"""Engine: continuous batching over the hybrid cache, one `step()` at a time.

`add_request` validates and queues a request (n sequences); `step()` runs two halves:

  launch   schedule, plan the step's snapshots and scratch slots, run the model over the flat batch and sample
           the plain rows (grammar masks filled on the host while the forward runs), all on the device; nothing
           here reads a device result on the host
  process  read the sampled tokens, verify drafts (masked likewise), hang the snapshots in the prefix tree, append
           tokens (advancing grammar matchers) and apply stop conditions, draft the next tokens, give back the
           caches of finished sequences, build outputs

(the next issue overlaps the process half of step N with the launch of step N+1). Not thread-safe: AsyncEngine
drives it from one thread, LLM from the caller's.
"""

from __future__ import annotations

import gc
import itertools
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from nextserve.config import EngineConfig
from nextserve.engine import prompt_logprobs
from nextserve.engine.cache_manager import CacheManager
from nextserve.engine.cuda_graph import supports_graphs
from nextserve.engine.detokenizer import IncrementalDetokenizer
from nextserve.engine.kv_pool import KVLayout, KVPool
from nextserve.engine.memory import Capacity, cache_budget_bytes, check_weights_fit, plan_capacity, weight_bytes
from nextserve.engine.request import PENDING, Request, SeqStatus, Sequence
from nextserve.engine.runner import ModelRunner
from nextserve.engine.sampler import SamplingRow, build_sampling_batch, sample
from nextserve.engine.scheduler import ScheduledSeq, Scheduler
from nextserve.engine.spec_decode import SpecDecoder
from nextserve.engine.state_pool import StateLayout, StatePool
from nextserve.engine.structured import GrammarCache
from nextserve.forward_batch import take_rows
from nextserve.loader.model_loader import (
    build_dummy_model,
    load_generation_defaults,
    load_model,
    load_tokenizer,
    resolve_quantization,
    weights_summary,
)
from nextserve.model_config import ModelConfig
from nextserve.models.weights import WeightsError
from nextserve.ops import backends
from nextserve.outputs import RequestOutput, TokenLogprob
from nextserve.sampling_params import SamplingParams

if TYPE_CHECKING:
    import xgrammar

logger = logging.getLogger(__name__)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: no CUDA device is available")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)


@dataclass
class LaunchedStep:
    """A step whose device work is queued: what `_process` needs to read and commit it."""

    scheduled: list[ScheduledSeq]
    sampling: list[ScheduledSeq]  # the scheduled sequences that sample this step
    snapshots: list[tuple[int, int, int]]  # in-step prefix-cache snapshots (index in batch, offset, slot)
    scratch: list[tuple[int, int, int]]  # verify rows' scratch slots, likewise
    hidden: torch.Tensor  # [tokens, H] last hidden states (the MTP pass reads them)
    logits: torch.Tensor  # fp32 [rows, V]: one row per plain sampling sequence, every row of a verify group
    offsets: list[int]  # first logits row of each of `sampling`
    plain: list[int]  # indices in `sampling` of the rows sampled on the device in the launch half
    plain_tokens: torch.Tensor | None  # [len(plain)] int64, on the device
    starts: dict[int, tuple[int, int]]  # seq_id -> (first position, first hidden row) computed this step
    t_start: float
    prompt_scores: list[prompt_logprobs.PromptScores]
    host_tokens: torch.Tensor | None  # plain_tokens on the host, once `ready` has fired
    # On the host, for every plain row when any asked: sampled token's logprob [n], then top ids and top logprobs
    # [n, k] (k the largest asked; absent when it is 0); empty when none asked.
    host_logprobs: list[torch.Tensor] | None
    ready: torch.cuda.Event | None


class Engine:
    def __init__(self, config: EngineConfig | None = None, *, ctx=None, comm=None, **kwargs):
        """`ctx`, `comm`: this process's rank and communicator under tensor parallelism (engine/tp.py builds them;
        None: one process holds the whole model)."""
        cfg = self.config = config or EngineConfig.from_kwargs(**kwargs)
        self.ctx, self.comm = ctx, comm
        tp = ctx.size if ctx is not None else 1
        self.device = resolve_device(cfg.device)
        if self.device.type == "cpu":
            _choose_cpu_threads()
        self.dtype = resolve_dtype(cfg.dtype, self.device)
        self.backends = backends.select(self.device, allow_reference=cfg.allow_reference_kernels)
        model_dir = Path(cfg.model) if cfg.model else _default_model_dir()
        self.model_dir = model_dir
        self.model_config = ModelConfig.from_pretrained(model_dir, cfg.model_overrides())
        dummy = cfg.load_format == "dummy"
        self.quant = resolve_quantization(model_dir, cfg.quantization, from_weights=not dummy)
        self.tokenizer = load_tokenizer(model_dir, synthetic_for=self.model_config if dummy else None)
        self.generation_defaults = load_generation_defaults(model_dir)
        torch.manual_seed(cfg.seed)
        if self.device.type == "cuda":
            free, total = torch.cuda.mem_get_info(self.device)
            need = weight_bytes(self.model_config, self.dtype, cfg.speculative, self.quant) // tp  # about: a rank's
            check_weights_fit(need, free, total, cfg.mem_fraction_static, self.dtype)
        try:
            if dummy:
                self.model = build_dummy_model(
                    self.model_config,
                    self.dtype,
                    self.device,
                    cfg.speculative,
                    self.quant,
                    seed=cfg.seed,
                    ctx=ctx,
                    comm=comm,
                )
            else:
                self.model = load_model(
                    model_dir,
                    self.model_config,
                    dtype=self.dtype,
                    device=self.device,
                    with_mtp=cfg.speculative,
                    progress=not cfg.disable_tqdm and (ctx is None or ctx.rank == 0),
                    quant=self.quant,
                    ctx=ctx,
                    comm=comm,
                )
        except WeightsError as e:
            if cfg.speculative and "mtp." in str(e):
                raise ValueError(
                    f"--speculative-algorithm {cfg.speculative_algorithm} needs the checkpoint's mtp.* weights: {e}"
                ) from None
            raise
        logger.info("nextserve weights: %s", weights_summary(self.model, dummy))
        self.capacity = self._plan_capacity()
        if tp > 1:
            logger.info(
                "nextserve capacity per rank (x %d ranks: KV %.2f GiB, states %.2f GiB in all): %s",
                tp,
                tp * self.capacity.num_pages * self.capacity.page_bytes / 2**30,
                tp * (self.capacity.num_slots + self.capacity.num_snapshot_slots) * self.capacity.slot_bytes / 2**30,
                self.capacity.describe(),
            )
        else:
            logger.info("nextserve capacity: %s", self.capacity.describe())
        self.kv_pool = KVPool(self.kv_layout, self.capacity.num_pages, self.device)
        self.state_pool = StatePool(
            self.state_layout,
            self.capacity.num_slots + self.capacity.num_snapshot_slots,
            self.device,
            num_scratch=self.capacity.num_scratch_slots,
        )
        self.runner = ModelRunner(self.model, self.kv_pool, self.state_pool, self.device)
        self._setup_cuda_graphs()
        self.cache = CacheManager(self.kv_pool, self.state_pool, cfg.prefix_caching, self.capacity.num_snapshot_slots)
        self.scheduler = Scheduler(
            self.cache, cfg.max_num_batched_tokens, self.capacity.max_running, self.max_model_len
        )
        eos = self.generation_defaults.get("eos_token_id", [])
        self.eos_ids = set(self.model_config.eos_token_ids) | set(eos if isinstance(eos, list) else [eos])
        # Grammars cover the padded vocabulary (ids past the tokenizer's are never allowed) and end on EOS.
        self.grammars = GrammarCache(self.tokenizer, self.model_config.vocab_size, self.eos_ids)
        self.spec = None
        if cfg.speculative:
            self.spec = SpecDecoder(
                self.model,
                self.cache,
                self.device,
                self.max_model_len,
                self.sampling_row,
                cfg.speculative_num_steps,
                adaptive=cfg.speculative_adaptive,
            )
        self._finishing: list[Sequence] = []
        # Overlapped scheduling: the launched step whose results are not read yet. Speculative decoding steps are
        # not overlapped (a verify step needs the drafts, which need the previous step's tokens, on the host).
        self.overlap = not cfg.disable_overlap_schedule and self.spec is None
        self._pending: LaunchedStep | None = None
        self.num_overlapped_steps = 0  # steps launched while the one before was still unread
        self.requests: dict[str, Request] = {}
        self._seq_ids = itertools.count()
        self.prompt_tokens_total = 0
        self.generation_tokens_total = 0
        env = os.environ.get("NEXTSERVE_DEBUG_CHECK_INTEGRITY") == "1"
        self._check_when_idle = cfg.debug_check_integrity or env

    def _setup_cuda_graphs(self) -> None:
        cfg = self.config
        if cfg.disable_cuda_graph:
            return
        reason = supports_graphs(self.model, self.device)
        if reason is not None:
            logger.info("decode runs eagerly (no CUDA graphs): %s", reason)
            return
        max_bs = min(cfg.cuda_graph_max_bs or self.capacity.max_running, self.capacity.max_running)
        # Room for the longest sequence plus a verify step's drafts.
        extra = cfg.speculative_num_steps + 1 if cfg.speculative else 0
        max_pages = -(-(self.capacity.context_length + extra) // cfg.page_size)
        self.runner.enable_cuda_graphs(max_bs, max_pages)

    @property
    def max_model_len(self) -> int:
        return self.capacity.context_length

    def close(self) -> None:
        """Releases the model, the cache pools, the prefix cache and the CUDA graphs (and their memory pools), so
        that another engine in this process gets the memory. Unfinished requests are aborted. The engine cannot be
        used afterwards; closing twice is harmless."""
        if self.model is None:
            return
        for rid in list(self.requests):
            self.abort(rid)
        self.runner.close()
        self.grammars.close()
        # The spec decoder and the layers' cache views refer back to these; drop every reference, then collect.
        self.spec = self.scheduler = self.cache = self.runner = None
        self.kv_pool = self.state_pool = self.model = None
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _check_open(self) -> None:
        if self.model is None:
            raise RuntimeError("this engine is closed")

    def _plan_capacity(self) -> Capacity:
        attn = self.model.attention_layers()
        gdn = self.model.linear_attention_layers()
        self.kv_layout = KVLayout(len(attn), self.config.page_size, attn[0].num_kv_heads, attn[0].head_dim, self.dtype)
        self.state_layout = StateLayout(
            len(gdn),
            gdn[0].conv1d.weight.shape[0],
            self.model_config.linear_conv_kernel_dim,
            gdn[0].hv,
            gdn[0].dk,
            gdn[0].dv,
            self.dtype,
            getattr(torch, self.config.mamba_ssm_dtype),
        )
        weight_bytes = sum(p.numel() * p.element_size() for p in self.model.parameters())
        budget = self.agree_budget(cache_budget_bytes(self.config, self.device, weight_bytes))
        return plan_capacity(self.model_config, self.config, budget, self.kv_layout, self.state_layout)

    def agree_budget(self, budget: int) -> int:
        """The cache budget every rank plans with (tensor parallelism overrides this: the smallest of any rank)."""
        return budget

    # ---- requests ------------------------------------------------------------------------------------------
    def validate_request(self, prompt_token_ids: list[int], params: SamplingParams) -> int:
        """Raises ValueError for a request that can never run; returns its effective max_tokens."""
        n = len(prompt_token_ids)
        if n == 0:
            raise ValueError("the prompt is empty")
        vocab = self.model_config.vocab_size
        if any(type(t) is not int or not 0 <= t < vocab for t in prompt_token_ids):
            raise ValueError(f"prompt token ids must be integers in [0, {vocab})")
        if any(not 0 <= t < vocab for t in params.stop_token_ids):
            raise ValueError(f"stop_token_ids must be in [0, {vocab})")
        limit = self.max_model_len
        if n >= limit:
            raise ValueError(f"the prompt has {n} tokens; this model's context length is {limit}")
        if params.max_tokens is not None and n + params.max_tokens > limit:
            raise ValueError(
                f"prompt ({n} tokens) + max_tokens ({params.max_tokens}) exceeds the context length {limit}"
            )
        if params.structured is not None:
            self.grammars.start_token(params.structured)  # the grammar itself is compiled by the pool
        return params.max_tokens if params.max_tokens is not None else limit - n

    def add_request(
        self,
        request_id: str,
        prompt: str | list[int],
        params: SamplingParams | None = None,
        *,
        stream: bool = True,
        grammar: xgrammar.CompiledGrammar | None = None,
    ) -> Request:
        """Queues a request. `stream=False`: `step` returns its output only once it has finished, and its text is
        decoded once at the end unless stop strings need it token by token. `grammar`: the compiled grammar of
        `params.structured` when the caller has it (AsyncEngine awaited it), so that a grammar evicted from the cache
        meanwhile is not compiled again on the engine loop."""
        self._check_open()
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        params = params or SamplingParams()
        ids = self.tokenizer.encode(prompt, add_special_tokens=False) if isinstance(prompt, str) else list(prompt)
        max_tokens = self.validate_request(ids, params)
        if params.structured is not None and grammar is None:
            grammar = self.grammars.get(params.structured)  # compiled on the grammar pool: only LLM waits here
        resolved = params.resolved(self.generation_defaults)
        req = Request(request_id, ids, resolved, max_tokens, stream)
        for i in range(params.n):
            gen = None
            if params.seed is not None:
                gen = torch.Generator(device=self.device).manual_seed(params.seed + i)
            detok = IncrementalDetokenizer(
                self.tokenizer,
                ids,
                skip_special_tokens=resolved.skip_special_tokens,
                stop=resolved.stop,
                include_stop_str_in_output=resolved.include_stop_str_in_output,
            )
            seq = Sequence(next(self._seq_ids), req, i, list(ids), len(ids), gen, detok)
            if not stream and not resolved.stop:
                seq.undecoded = []
            if i == 0 and params.prompt_logprobs is not None:
                seq.prompt_logprobs = [None]
            if params.structured is not None:
                seq.grammar = self.grammars.new_state(params.structured, grammar)
            req.seqs.append(seq)
            self.scheduler.add(seq)
        self.requests[request_id] = req
        self.prompt_tokens_total += len(ids)
        return req

    def abort(self, request_id: str) -> RequestOutput | None:
        req = self.requests.pop(request_id, None)
        if req is None:
            return None
        for seq in req.seqs:
            if not seq.finished:
                self.scheduler.finish(seq)
                seq.finish_reason = "abort"
                _finish_text(seq)
        if not self.requests and self._pending is not None:
            # Nothing left to run: read the launched step now (its results are all dropped) so the engine is idle.
            pending, self._pending = self._pending, None
            self._process(pending)
        self._idle_check()
        return req.output()

    def has_unfinished(self) -> bool:
        """Requests left, or a launched step still to read (it may hold snapshot slots)."""
        return bool(self.requests) or self._pending is not None

    # ---- the step ------------------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """One step. Overlapped (the default): launch step N+1, then read and commit step N while the device runs
        N+1; a sequence that stopped at N has computed one token too many at N+1, which is dropped, never emitted.
        Otherwise: launch step N and process it."""
        self._check_open()
        prev, self._pending = self._pending, None
        if prev is not None and not self._can_launch_before(prev):
            return self._process(prev)
        launched = self._launch()
        if not self.overlap:
            return self._process(launched) if launched is not None else []
        self._pending = launched
        self.num_overlapped_steps += prev is not None and launched is not None
        return self._process(prev) if prev is not None else []

    def _can_launch_before(self, prev: LaunchedStep) -> bool:
        """Whether the next step can be launched before `prev` is read: not when a sequence with a token still on
        the device samples with penalties (they read the whole history on the host) or under a grammar (its next
        mask needs the matcher advanced by that token)."""
        return not any(s.seq.params.penalized or s.seq.grammar is not None for s in prev.sampling)

    def _launch(self) -> LaunchedStep | None:
        """Schedules and runs the step on the device; reads nothing back. A sequence whose last token is still on
        the device (PENDING) is fed it from there."""
        scheduled = self.scheduler.schedule()
        if not scheduled:
            return None
        t_start = time.perf_counter()
        sampling = [s for s in scheduled if s.samples]
        snapshots = self.cache.plan_snapshots(scheduled, self.capacity.snapshot_interval)
        scratch = self.spec.plan_scratch(scheduled) if self.spec else []
        hidden, logits = self.runner.execute(scheduled, snapshots + scratch, self._pending_inputs(scheduled))
        starts = {}  # seq_id -> (first position, first hidden row) of what this step computed
        row = 0
        for s in scheduled:
            starts[s.seq.seq_id] = (s.seq.num_cached, row)
            row += s.num_tokens
            if not s.draft:
                s.seq.num_cached += s.num_tokens
        # Logits rows: one per plain sampling row, every row of a verify group.
        offsets, r = [], 0
        for s in sampling:
            offsets.append(r)
            r += s.num_tokens if s.draft else 1
        # The snapshots are in the tree as soon as they are queued (host bookkeeping; the device writes them before
        # any later step reads them): the next step's admissions can resume from them, and a sequence that finishes
        # when this step is processed donates its cache after them.
        self.cache.commit_snapshots(scheduled, snapshots, [starts[s.seq.seq_id][0] for s in scheduled])
        prompt_scores = prompt_logprobs.score(self.model, scheduled, hidden, starts, self.device)
        plain = [i for i, s in enumerate(sampling) if not s.draft]
        plain_tokens = host_tokens = host_logprobs = ready = None
        if plain:
            # NOTE: the forward is queued on the device by now, so grammar masks fill on the host while it runs.
            rows = [self.sampling_row(sampling[i].seq) for i in plain]
            picked = [offsets[i] for i in plain]
            # A decode batch samples every row: a slice, not an index list.
            plain_logits = take_rows(logits, picked)
            sampled = sample(plain_logits, build_sampling_batch(rows, logits.shape[-1], self.device))
            plain_tokens = sampled.token_ids
            for j, i in enumerate(plain):
                seq = sampling[i].seq
                seq.token_ids.append(PENDING)
                seq.num_pending += 1
                seq.pending_source = (plain_tokens, j)
            # The sampler computed the logprobs (every row, the largest k asked) from this step's own logits (a
            # replayed graph's outputs are the next step's by the time the process half runs): they come back with
            # the tokens.
            extra = [t for t in (sampled.logprobs, sampled.top_ids, sampled.top_logprobs) if t is not None]
            host, ready = self._copy_to_host([plain_tokens, *extra])
            host_tokens, host_logprobs = host[0], host[1:]
        return LaunchedStep(
            scheduled,
            sampling,
            snapshots,
            scratch,
            hidden,
            logits,
            offsets,
            plain,
            plain_tokens,
            starts,
            t_start,
            prompt_scores,
            host_tokens,
            host_logprobs,
            ready,
        )

    def _pending_inputs(self, scheduled) -> tuple[list[int], torch.Tensor] | None:
        """(rows of the step's flat input, their token values on the device) for the sequences fed a PENDING token;
        None when there are none. Every such token comes from the one step launched before this one, so the values
        are one slice of its sampled tokens (a steady decode batch) or one gather, never a launch per row."""
        rows, picks, row, source = [], [], 0, None
        for s in scheduled:
            seq = s.seq
            if seq.num_pending:
                assert s.num_tokens == 1 and not s.draft and seq.num_cached == len(seq.token_ids) - 1
                src, j = seq.pending_source
                assert source is None or src is source, "PENDING tokens of two launched steps"
                source = src
                rows.append(row)
                picks.append(j)
            row += s.num_tokens
        if not rows:
            return None
        return rows, take_rows(source, picks)

    def _copy_to_host(self, tensors: list[torch.Tensor]):
        """Starts the copies of step results to the host; returns (host tensors, event to wait for or None)."""
        if tensors[0].device.type != "cuda":
            return tensors, None
        host = []
        for t in tensors:
            host.append(torch.empty(t.shape, dtype=t.dtype, pin_memory=True))
            host[-1].copy_(t, non_blocking=True)
        ready = torch.cuda.Event()
        ready.record()
        return host, ready

    def _process(self, step: LaunchedStep) -> list[RequestOutput]:
        """Reads the step's results, commits them, and returns the outputs of the requests that progressed."""
        scheduled, sampling = step.scheduled, step.sampling
        self._finishing = []
        appended = []  # (sequence, tokens, their logprobs or None)
        if step.plain:
            if step.ready is not None:
                step.ready.synchronize()  # the copies only: a step launched after this one keeps running
            logprobs = self._read_logprobs(step)
            for j, tok in enumerate(step.host_tokens.tolist()):
                seq = sampling[step.plain[j]].seq
                if seq.finished:
                    continue  # aborted since the launch, or stopped at the step before (the extra token is dropped)
                appended.append((seq, [tok], logprobs.get(j)))
        if self.spec is not None:
            verify = [(i, s) for i, s in enumerate(sampling) if s.draft]
            groups = [step.logits[step.offsets[i] : step.offsets[i] + s.num_tokens] for i, s in verify]
            accepted = self.spec.accept([s for _, s in verify], groups, scheduled, step.scratch)
            for (_, s), group, tokens in zip(verify, groups, accepted):
                appended.append((s.seq, tokens, _logprobs_of(group[: len(tokens)], tokens, s.seq.params.logprobs)))
        prompt_logprobs.record(step.prompt_scores)
        for seq, tokens, logprobs in appended:
            if seq.request.max_tokens == 0:  # score the prompt only: the sampled token is not part of the output
                self._finish(seq, "length", None)
                continue
            self._append_tokens(seq, tokens, logprobs)
        t_target = time.perf_counter() - step.t_start
        if self.spec is not None:
            ntok = sum(s.num_tokens for s in scheduled)
            self.spec.draft(scheduled, step.hidden, step.starts, t_target, ntok)
        for seq in self._finishing:
            self.scheduler.finish(seq)
        # A request aborted since the launch is gone, and its id may already name a new request: skip it.
        touched: dict[str, Request] = {
            s.seq.request.request_id: s.seq.request
            for s in sampling
            if self.requests.get(s.seq.request.request_id) is s.seq.request
        }
        outputs = []
        for rid, req in touched.items():
            if req.stream or req.finished:
                outputs.append(req.output())
            if req.finished:
                self.requests.pop(rid, None)
        self._idle_check()
        return outputs

    def _idle_check(self) -> None:
        if self._check_when_idle and not self.has_unfinished():
            self.check_integrity()

    def sampling_row(self, seq: Sequence, extra_output: list[int] = ()) -> SamplingRow:
        p = seq.params
        num_output = seq.num_output + len(extra_output)
        masked = ()
        if num_output < p.min_tokens and seq.grammar is None:  # under a grammar, the grammar says when it ends
            masked = tuple(p.stop_token_ids) + (() if p.ignore_eos else tuple(self.eos_ids))
        # Draft tokens (extra_output) are not committed: the grammar's mask is the one after them.
        mask = seq.grammar.filler(extra_output) if seq.grammar is not None else None
        if not p.penalized:
            # NOTE: the decode hot path: without penalties the sampler reads no history, so copy none.
            return SamplingRow(p, (), (), seq.generator, masked, mask)
        output = seq.output_ids + list(extra_output)
        return SamplingRow(p, seq.token_ids[: seq.num_prompt], output, seq.generator, masked, mask)

    def _read_logprobs(self, step: LaunchedStep) -> dict[int, list[TokenLogprob]]:
        """The plain rows' logprobs, read from the host copies: index in `plain` -> [TokenLogprob]."""
        if not step.host_logprobs:
            return {}
        chosen, *top = (t.tolist() for t in step.host_logprobs)  # no top tensors when every row asked for k = 0
        top_ids, top_lp = top or ([[]] * len(chosen), [[]] * len(chosen))
        tokens = step.host_tokens.tolist()
        out = {}
        for j, i in enumerate(step.plain):
            k = step.sampling[i].seq.params.logprobs
            if k is not None:
                out[j] = [TokenLogprob(tokens[j], chosen[j], list(zip(top_ids[j][:k], top_lp[j][:k])))]
        return out

    def _append_tokens(self, seq: Sequence, tokens: list[int], logprobs: list[TokenLogprob] | None) -> None:
        if logprobs is not None and seq.logprobs is None:
            seq.logprobs = []
        for i, tok in enumerate(tokens):
            if seq.stopped:
                break
            if self._append_token(seq, tok) and logprobs is not None:
                seq.logprobs.append(logprobs[i])

    def _append_token(self, seq: Sequence, token: int) -> bool:
        """Commits the next token: it takes the place of the oldest PENDING entry, or is appended. False when the
        token is refused (outside the sequence's grammar): the sequence ends without it."""
        p = seq.params
        if seq.grammar is not None and not seq.grammar.accept(token):
            # Only when no token was allowed: the tokenizer cannot spell what the grammar needs (a synthetic one),
            # or the grammar can match nothing. The output cannot continue, and this token is not part of it.
            logger.warning(
                "request %s: token %d is outside its grammar (nothing was allowed); finishing",
                seq.request.request_id,
                token,
            )
            self._finish(seq, "stop", None)
            return False
        if seq.num_pending:
            seq.token_ids[len(seq.token_ids) - seq.num_pending] = token
            seq.num_pending -= 1
        else:
            seq.token_ids.append(token)
        self.generation_tokens_total += 1
        grammar_done = seq.grammar is not None and seq.grammar.terminated
        if token in p.stop_token_ids:
            self._finish(seq, "stop", token)
        elif token in self.eos_ids and not p.ignore_eos:
            self._finish(seq, "stop", None)
        elif seq.undecoded is not None:
            seq.undecoded.append(token)
        else:
            delta, stop_hit = seq.detok.step([token], check_stop=len(seq.output_ids) > p.min_tokens)
            seq.text += delta
            if stop_hit is not None:
                self._finish(seq, "stop", stop_hit)
        if grammar_done and not seq.stopped:  # the grammar ended the output (with ignore_eos, EOS does not)
            self._finish(seq, "stop", None)
        committed = len(seq.token_ids) - seq.num_pending
        if not seq.stopped and (
            committed - seq.num_prompt >= seq.request.max_tokens or committed >= self.max_model_len
        ):
            self._finish(seq, "length", None)
        return True

    def _finish(self, seq: Sequence, reason: str, stop_reason) -> None:
        seq.status, seq.finish_reason, seq.stop_reason = SeqStatus.STOPPED, reason, stop_reason
        if seq.num_pending:  # tokens sampled after the stop: dropped (never fed: see Scheduler._at_limit)
            del seq.token_ids[-seq.num_pending :]
            seq.num_pending = 0
        _finish_text(seq)
        # Released at the end of the step: the MTP pass still reads this step's positions of its pages.
        self._finishing.append(seq)

    def reset_prefix_cache(self) -> None:
        """Empties the prefix cache (locked paths of running sequences stay)."""
        self.cache.clear()

    # ---- introspection -------------------------------------------------------------------------------------
    def check_integrity(self) -> None:
        self.cache.check_integrity(self.scheduler.running, self.scheduler.waiting)

    def stats(self) -> dict[str, float]:
        """Point-in-time gauges and cumulative counters (the server's /metrics reads these).

        NOTE: only the thread that steps the engine may call this (it walks queues and the prefix-cache tree that a
        step mutates); other threads read the snapshot `AsyncEngine.stats()` publishes."""
        running = self.scheduler.running
        return {
            "num_running": len({s.request.request_id for s in running}),
            "num_waiting": len({s.request.request_id for s in self.scheduler.waiting}),
            **self.cache.stats(),
            "state_slots_used": len(running),
            "state_slots_total": self.capacity.num_slots,
            "num_preemptions": self.scheduler.num_preemptions,
            "prompt_tokens_total": self.prompt_tokens_total,
            "generation_tokens_total": self.generation_tokens_total,
            **self._spec_stats(),
        }

    def _spec_stats(self) -> dict[str, float]:
        if self.spec is None:
            return {}
        st = self.spec.stats
        out = {
            "spec_draft_tokens": st.drafted,
            "spec_accepted_tokens": st.accepted,
            "spec_verify_steps": st.verify_steps,
            "spec_mean_acceptance_length": st.mean_acceptance_length,
            "spec_num_draft_tokens_chosen": self.spec.policy.last_choice or 0,
        }
        for i, (d, a) in enumerate(zip(st.drafted_at, st.accepted_at)):
            out[f"spec_acceptance_rate_pos{i}"] = a / d if d else 0.0
        return out


def _choose_cpu_threads() -> None:
    """On a CPU, torch's default (a thread per core) competes with the server's own threads and with anything else on
    the machine: on two busy cores it made `bench offline` 40x slower than one thread. Leave one core to the rest of
    the process; OMP_NUM_THREADS, when set, decides instead."""
    if os.environ.get("OMP_NUM_THREADS"):
        return
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    threads = max(1, min(cores - 1, torch.get_num_threads()))
    if threads != torch.get_num_threads():
        torch.set_num_threads(threads)
        logger.info("CPU: %d compute thread(s) of %d cores (set OMP_NUM_THREADS to choose)", threads, cores)


def _logprobs_of(rows_logits: torch.Tensor, tokens: list[int], k: int | None) -> list[TokenLogprob] | None:
    """Logprobs of tokens[i] under rows_logits[i], with the top k alternatives (verify groups, read on the host)."""
    if k is None:
        return None
    lp = torch.log_softmax(rows_logits, dim=-1)
    top = torch.topk(lp, k, dim=-1)
    ids, lps = top.indices.tolist(), top.values.tolist()
    return [TokenLogprob(t, float(lp[i, t]), list(zip(ids[i], lps[i]))) for i, t in enumerate(tokens)]


def _default_model_dir() -> Path:
    from nextserve.assets import DEFAULT_MODEL_DIR

    return Path(DEFAULT_MODEL_DIR)


def _finish_text(seq: Sequence) -> None:
    """The text is final: what the detokenizer held back (a possible stop-string start, an incomplete character),
    or all of it for a sequence decoded only at the end."""
    if not seq.detok.finished:
        seq.text += seq.detok.step(seq.undecoded or [], finished=True)[0]
        seq.undecoded = None
