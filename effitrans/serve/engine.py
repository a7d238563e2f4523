"""A batched serving engine: slot-based continuous batching over one preallocated KV cache.

The engine owns a cache for `max_batch` rows of `max_len` tokens (any attention family: the cache is
whatever `model.init_cache` returns). Each `step()`:
  1. admits queued requests into free rows with one batched, jitted prefill (prompts right-padded to a
     power-of-two bucket, so few shapes compile; padding sits after each prompt, where causal attention
     never looks, and each row's length is then set to its true prompt length) that samples each request's
     first token. Caches other than PADDABLE_CACHES (ring buffers) are prefilled unpadded, grouped by length;
  2. runs one jitted decode step for every row (idle rows compute too and are reset to length 0), samples
     with each row's own temperature / top-k / top-p and random key (from the request's seed and its token
     count, so sampled tokens do not depend on the rest of the batch), and finishes rows that produced a
     stop token or reached max_new_tokens.

Every field of a request is checked at submission (types included: numpy integers count as ints, bools do
not, inf/NaN are not numbers here); a request that cannot be served is rejected with a message naming the
field, its value and what is allowed, and the engine keeps serving everyone else: token ids outside the
vocabulary, a prompt that with its max_new_tokens does not fit the cache, a batch larger than the allocated
rows, a prefix cache built for another model config (shapes, dtypes or family differ), bad sampling
parameters. An exception inside a step fails only the requests it concerns: a batched prefill that raises is
retried one request at a time; a decode step that raises fails the running requests (its rows cannot be told
apart) and the cache starts empty. Every request ends finished, rejected or failed, with a reason.

With `early_exit=True` (a model built with config.model.exits: its exits.measure and exits.threshold decide)
or `early_exit={"measure": ..., "threshold": ...}` (either overridden), step 2 runs
effitrans.cascades.early_exit.ExitDecoder instead of the jitted step: each occupied row leaves at the first
exit whose confidence is above the threshold, exited rows' remaining layers only receive keys/values (CALM's
propagation) and the rows still running are compacted into power-of-two buckets, so per-row exits inside the
continuous batch remove work; idle rows are not run at all. `exit_stats()` counts tokens per exit and the
blocks run.

Cache protocol this relies on (every family's cache): a pytree whose array leaves all have the batch on
axis 0, with a `lengths` int32 [B] field and flax.struct's `.replace`.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import reprlib
import time
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx

from effitrans.attention.cache import KVCache
from effitrans.attention.latent import LatentCache
from effitrans.serve.generate import vocab_size
from effitrans.serve.sampling import check_sampling, is_int, sample_tokens

# Caches that hold token t in slot t: padding written after a prompt is never read (it sits past the row's
# length) and later appends overwrite it. Any other cache (e.g. a sliding-window ring buffer, where padding
# would overwrite live slots) is prefilled with exact prompt lengths, grouped by length.
PADDABLE_CACHES = (KVCache, LatentCache)


@dataclasses.dataclass
class Request:
    """One generation request. prefix_cache: an optional batch-1 cache (from `model.init_cache(1, max_len)`
    and decode calls) that already holds prompt[:n] with n = its length; only prompt[n:] is prefilled.
    seed: an int in [0, 2**32) fixes the sampled tokens whatever else the engine serves; None draws one
    from the engine's seed."""

    prompt: Sequence[int]
    max_new_tokens: int
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    stop_tokens: Sequence[int] = ()
    prefix_cache: Any = None
    seed: int | None = None


@dataclasses.dataclass
class Result:
    """status: queued | running, then finished, rejected (at submit) or failed (in a step; the tokens emitted
    before the failure are kept). finish_reason: stop | length. error: why it was rejected or failed.
    Times: perf_counter s."""

    request_id: int
    status: str
    tokens: list = dataclasses.field(default_factory=list)
    finish_reason: str | None = None
    error: str | None = None
    submit_time: float = 0.0
    first_token_time: float | None = None
    finish_time: float | None = None

    @property
    def terminal(self) -> bool:
        """True once the request is finished, rejected or failed: its result no longer changes."""
        return self.status in ("finished", "rejected", "failed")

    @property
    def ttft(self) -> float | None:
        return None if self.first_token_time is None else self.first_token_time - self.submit_time

    @property
    def latency(self) -> float | None:
        return None if self.finish_time is None else self.finish_time - self.submit_time


def _bucket(n: int, cap: int, floor: int = 8) -> int:
    """The power of two >= n (at least `floor`), capped at `cap`."""
    return int(min(cap, max(floor, 1 << max(0, (n - 1).bit_length()))))


def _token_ids(name: str, value, vocab: int) -> tuple[int, ...]:
    """`value` as a tuple of ints; raises TypeError / ValueError naming `name` unless it is a sequence (or 1-D
    numpy or jax array) of ints in [0, vocab)."""
    allowed = f"a sequence of int token ids in [0, vocab_size={vocab})"
    if isinstance(value, jax.Array):
        value = np.asarray(value)
    if (
        isinstance(value, (str, bytes))
        or not isinstance(value, (Sequence, np.ndarray))
        or getattr(value, "ndim", 1) != 1
    ):
        raise TypeError(f"{name}={reprlib.repr(value)} must be {allowed}")
    for i, t in enumerate(value):
        if not is_int(t) or not 0 <= t < vocab:
            raise ValueError(f"{name}[{i}]={reprlib.repr(t)} is not a token id: {name} must be {allowed}")
    return tuple(int(t) for t in value)


def cache_mismatch(cache, expected) -> str | None:
    """None if `cache` has exactly the structure, shapes and dtypes of `expected` (arrays or ShapeDtypeStructs),
    else a message naming the first difference."""
    if jax.tree.structure(cache) != jax.tree.structure(expected):
        got_types = sorted({type(c).__name__ for c in (cache if isinstance(cache, list) else [cache])})
        want_types = sorted({type(c).__name__ for c in (expected if isinstance(expected, list) else [expected])})
        return (
            f"its structure {got_types} x {len(cache) if isinstance(cache, list) else 1} does not match this "
            f"engine's {want_types} x {len(expected) if isinstance(expected, list) else 1} (another attention "
            f"family or layer count?)"
        )
    got = jax.tree_util.tree_flatten_with_path(cache)[0]
    want = jax.tree.leaves(expected)
    for (path, a), b in zip(got, want):
        if tuple(a.shape) != tuple(b.shape) or jnp.dtype(a.dtype) != jnp.dtype(b.dtype):
            return (
                f"cache{jax.tree_util.keystr(path)} has shape {tuple(a.shape)} {jnp.dtype(a.dtype)}, expected "
                f"{tuple(b.shape)} {jnp.dtype(b.dtype)} (a cache from another model config?)"
            )
    return None


class _RowSampling(NamedTuple):
    """Per-row sampling parameters, each [B]. A row draws with key fold_in(key(seed), count)."""

    temperature: np.ndarray  # float32
    top_k: np.ndarray  # int32
    top_p: np.ndarray  # float32
    seed: np.ndarray  # uint32
    count: np.ndarray  # int32: tokens the row generated so far

    @classmethod
    def idle(cls, b: int) -> _RowSampling:
        """b rows of greedy decoding without filters."""
        zeros = lambda dtype: np.zeros(b, dtype)
        return cls(zeros(np.float32), zeros(np.int32), np.ones(b, np.float32), zeros(np.uint32), zeros(np.int32))

    def set_row(self, i: int, req: Request) -> None:
        """Row i samples for `req` (a validated request), from its first token on."""
        for field, value in zip(self, (req.temperature, req.top_k, req.top_p, req.seed, 0)):
            field[i] = value


def _sample_rows(logits: jax.Array, sampling: _RowSampling) -> jax.Array:
    """logits [B, V] -> token ids int32 [B]: each row drawn by `sample_tokens` with its own parameters and key,
    so a request's tokens do not depend on the other rows of the batch."""

    def row(logits_v, temperature, top_k, top_p, seed, count):
        key = jax.random.fold_in(jax.random.key(seed), count)
        return sample_tokens(logits_v[None], key, temperature=temperature, top_k=top_k, top_p=top_p)[0]

    return jax.vmap(row)(logits, *sampling)


# The jitted bodies live at module level with the model's graphdef static, so engines over models of the
# same structure (same config) share compilations.


@functools.partial(jax.jit, static_argnums=(0,), donate_argnums=(2,))
def _prefill_step(graphdef, state, cache, rows, tokens, suffix_lens, slots, sampling):
    """rows: cache for b new requests; tokens [b, P] right-padded; writes the rows into cache[slots]."""
    model = nnx.merge(graphdef, state)
    start = rows[0].lengths  # [b]
    logits, rows = model(tokens, cache=rows, decode=True)  # [b, P, V]
    last = jnp.take_along_axis(logits, (suffix_lens - 1)[:, None, None], axis=1)[:, 0]  # [b, V]
    first = _sample_rows(last, sampling)
    rows = [r.replace(lengths=start + suffix_lens) for r in rows]  # drop the padding
    cache = jax.tree.map(lambda big, new: big.at[slots].set(new, mode="drop"), cache, rows)
    return first, cache


@functools.partial(jax.jit, static_argnums=(0,), donate_argnums=(2,))
def _decode_step(graphdef, state, cache, tokens, active, sampling):
    model = nnx.merge(graphdef, state)
    logits, cache = model(tokens[:, None], cache=cache, decode=True)  # [B, 1, V]
    nxt = _sample_rows(logits[:, 0], sampling)
    cache = [c.replace(lengths=jnp.where(active, c.lengths, 0)) for c in cache]  # idle rows stay empty
    return nxt, cache


_sample_step = jax.jit(_sample_rows)  # the early-exit path samples the logits its decoder assembled


class _Slot:
    def __init__(self, rid: int, request: Request):
        self.rid, self.request = rid, request
        self.stop = frozenset(request.stop_tokens)


EARLY_EXIT_KEYS = ("measure", "threshold")


def _exit_decoder(model, early_exit):
    """The ExitDecoder of early_exit=True (the model's config.model.exits.measure / .threshold) or a dict
    overriding either: {"measure": one of effitrans.cascades.exit_heads.MEASURES, "threshold": a number in
    [0, 1]}. Errors name what is wrong (ValueError; TypeError for a model without exit heads)."""
    # Imported here: serving needs the cascades only when it runs exits.
    from effitrans.cascades.early_exit import ExitDecoder, exits_of

    if early_exit is not True and not (isinstance(early_exit, dict) and set(early_exit) <= set(EARLY_EXIT_KEYS)):
        raise ValueError(
            f"early_exit={reprlib.repr(early_exit)} must be None, True (the model's exits.measure and .threshold) "
            f'or a dict with keys from {list(EARLY_EXIT_KEYS)}, e.g. {{"measure": "learned", "threshold": 0.3}}'
        )
    heads = exits_of(model)
    chosen = {"measure": heads.measure, "threshold": heads.threshold, **({} if early_exit is True else early_exit)}
    return ExitDecoder(model, **chosen)


class ServingEngine:
    """Continuous-batching generation over `model` (any CausalLM whose attention supports decode); with
    `early_exit` (see the module docstring) each row may leave the stack at an exit."""

    def __init__(
        self,
        model: nnx.Module,
        *,
        max_batch: int,
        max_len: int,
        cache_dtype=jnp.float32,
        seed: int = 0,
        early_exit: bool | dict | None = None,
    ):
        if not isinstance(max_batch, int) or max_batch < 1:
            raise ValueError(f"max_batch={max_batch!r} must be an int >= 1")
        if not isinstance(max_len, int) or max_len < 2:
            raise ValueError(f"max_len={max_len!r} must be an int >= 2")
        self.exit_decoder = None if early_exit is None else _exit_decoder(model, early_exit)  # before allocating
        self.max_batch, self.max_len, self.cache_dtype = max_batch, max_len, cache_dtype
        self.graphdef, self.state = nnx.split(model)
        self.cache = model.init_cache(max_batch, max_len, cache_dtype)
        self.row_spec = jax.eval_shape(lambda: model.init_cache(1, max_len, cache_dtype))
        self.vocab_size = vocab_size(self.graphdef, self.state)
        self._seeds = np.random.default_rng(seed)  # for requests without a seed
        self.slots: list[_Slot | None] = [None] * max_batch
        self.queue: collections.deque = collections.deque()
        self.results: dict[int, Result] = {}
        self._next_id = 0
        self._last = np.zeros(max_batch, np.int32)
        self._sampling = _RowSampling.idle(max_batch)
        self._fresh_cache: dict = {}
        self._init_cache = lambda b: model.init_cache(b, max_len, cache_dtype)
        self.pad_prompts = all(isinstance(c, PADDABLE_CACHES) for c in self.cache)
        self._exit_counts = np.zeros(0 if early_exit is None else len(self.exit_decoder.layers) + 1, np.int64)
        self._block_rows = 0

    # -- submission -----------------------------------------------------------------------------------

    def _end(self, rid: int, status: str, error: str) -> int:
        r = self.results[rid]
        r.status, r.error, r.finish_time = status, error, time.perf_counter()
        if status == "failed":
            logging.warning("request %d failed: %s", rid, error)
        return rid

    def _validated(self, req: Request) -> Request:
        """A copy of `req` with plain Python values; raises ValueError / TypeError naming the first bad field."""
        if not isinstance(req, Request):
            raise TypeError(f"request={reprlib.repr(req)} must be an effitrans.serve.Request")
        prompt = _token_ids("prompt", req.prompt, self.vocab_size)
        if not prompt:
            raise ValueError("prompt=[] is empty; it needs at least one token")
        if not is_int(req.max_new_tokens) or req.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={req.max_new_tokens!r} must be an int >= 1")
        if len(prompt) + req.max_new_tokens > self.max_len:
            raise ValueError(
                f"request is longer than the cache: prompt {len(prompt)} + max_new_tokens {req.max_new_tokens} "
                f"= {len(prompt) + req.max_new_tokens} tokens > max_len={self.max_len}"
            )
        problem = check_sampling(req.temperature, req.top_k, req.top_p, self.vocab_size)
        if problem:
            raise ValueError(problem)
        stop_tokens = _token_ids("stop_tokens", req.stop_tokens, self.vocab_size)
        if req.prefix_cache is not None:
            problem = cache_mismatch(req.prefix_cache, self.row_spec)
            if problem:
                raise ValueError(f"prefix_cache does not fit this engine: {problem}")
            n = int(np.asarray(req.prefix_cache[0].lengths)[0])
            if not 0 <= n < len(prompt):
                raise ValueError(f"prefix_cache holds {n} tokens; it must hold fewer than the prompt's {len(prompt)}")
        if req.seed is not None and (not is_int(req.seed) or not 0 <= req.seed < 2**32):
            raise ValueError(f"seed={req.seed!r} must be an int in [0, 2**32), or None to draw one")
        return dataclasses.replace(
            req,
            prompt=prompt,
            max_new_tokens=int(req.max_new_tokens),
            temperature=float(req.temperature),
            top_k=int(req.top_k),
            top_p=float(req.top_p),
            stop_tokens=stop_tokens,
            seed=int(self._seeds.integers(2**32) if req.seed is None else req.seed),
        )

    def submit(self, request: Request) -> int:
        """Queues a request; returns its id. A request that cannot be served is rejected (see results[id]);
        submit never raises because of what it is given."""
        rid, self._next_id = self._next_id, self._next_id + 1
        self.results[rid] = Result(rid, "queued", submit_time=time.perf_counter())
        try:
            request = self._validated(request)
        except (ValueError, TypeError) as e:
            return self._end(rid, "rejected", str(e))
        except Exception as e:  # pylint: disable=broad-except  # e.g. a prefix_cache of foreign objects
            return self._end(rid, "rejected", f"request could not be checked: {type(e).__name__}: {e}")
        self.queue.append((rid, request))
        return rid

    def submit_batch(self, requests: Sequence[Request]) -> list[int]:
        """Queues a batch; a batch larger than the allocated rows is rejected as a whole (each id says why)."""
        requests = list(requests)
        if len(requests) > self.max_batch:
            ids = []
            for _ in requests:
                rid, self._next_id = self._next_id, self._next_id + 1
                self.results[rid] = Result(rid, "queued", submit_time=time.perf_counter())
                ids.append(
                    self._end(
                        rid,
                        "rejected",
                        f"batch of {len(requests)} requests is larger than the engine's "
                        f"allocated batch max_batch={self.max_batch}",
                    )
                )
            return ids
        return [self.submit(r) for r in requests]

    # -- the loop -------------------------------------------------------------------------------------

    @property
    def num_active(self) -> int:
        return sum(s is not None for s in self.slots)

    def has_work(self) -> bool:
        return bool(self.queue) or self.num_active > 0

    def _emit(self, slot_idx: int, token: int, now: float) -> None:
        s = self.slots[slot_idx]
        r = self.results[s.rid]
        r.tokens.append(int(token))
        if r.first_token_time is None:
            r.first_token_time = now
        self._last[slot_idx] = token
        self._sampling.count[slot_idx] = len(r.tokens)
        reason = "stop" if int(token) in s.stop else ("length" if len(r.tokens) >= s.request.max_new_tokens else None)
        if reason:
            r.status, r.finish_reason, r.finish_time = "finished", reason, now
            self.slots[slot_idx] = None

    def _run_prefill(self, group: list, slot_ids: list[int], rows) -> np.ndarray:
        """group: [(rid, request)] all fresh (rows None) or one with a prefix cache (rows = its cache).
        Prefills their rows of the cache; returns each request's first token [len(group)]."""
        n = len(group)
        starts = [0 if rows is None else int(np.asarray(rows[0].lengths)[0]) for _ in group]
        suffixes = [list(req.prompt)[s:] for (_, req), s in zip(group, starts)]
        if rows is None:
            b = _bucket(n, self.max_batch, floor=1)
            longest = max(map(len, suffixes))
            p = _bucket(longest, self.max_len) if self.pad_prompts else longest  # unpadded: all one length
        else:
            b, p = 1, len(suffixes[0])  # exact length: start + p never passes max_len
        tokens = np.zeros((b, p), np.int32)
        lens = np.ones(b, np.int32)
        slots = np.full(b, self.max_batch, np.int32)  # out of range: padded rows are dropped
        sampling = _RowSampling.idle(b)
        for i, ((_, req), suf) in enumerate(zip(group, suffixes)):
            tokens[i, : len(suf)], lens[i], slots[i] = suf, len(suf), slot_ids[i]
            sampling.set_row(i, req)
        if rows is None:
            rows = self._fresh_rows(b)
        first, self.cache = _prefill_step(self.graphdef, self.state, self.cache, rows, tokens, lens, slots, sampling)
        return np.asarray(first)

    def _prefill(self, group: list, slot_ids: list[int], rows) -> None:
        """Admits `group` (as `_run_prefill`) into `slot_ids`, emitting each first token. If the prefill
        raises, a group of several is retried one request at a time, so only requests that raise alone fail."""
        try:
            first = self._run_prefill(group, slot_ids, rows)
        except Exception as e:  # pylint: disable=broad-except  # one bad request must not stop the loop
            error = f"prefill failed: {type(e).__name__}: {e}"
            if not self._cache_intact():
                self._reset(f"the engine's cache was lost when a prefill failed ({type(e).__name__}: {e})")
            if len(group) == 1:
                self._end(group[0][0], "failed", error)
            else:
                for item, slot in zip(group, slot_ids):
                    self._prefill([item], [slot], rows)
            return
        now = time.perf_counter()
        for i, (rid, req) in enumerate(group):
            self.slots[slot_ids[i]] = _Slot(rid, req)
            self._sampling.set_row(slot_ids[i], req)
            self.results[rid].status = "running"
            self._emit(slot_ids[i], first[i], now)

    def _cache_intact(self) -> bool:
        """False if a failed step left the cache unusable (donated buffers deleted, or holding an error)."""
        try:
            leaves = jax.tree.leaves(self.cache)
            if any(x.is_deleted() for x in leaves):
                return False
            jax.block_until_ready(leaves)
            return True
        except Exception:  # pylint: disable=broad-except  # the error the failed step left in its outputs
            return False

    def _reset(self, error: str) -> None:
        """Fails every running request with `error` and starts over from an empty cache."""
        for i, s in enumerate(self.slots):
            if s is not None:
                self._end(s.rid, "failed", error)
                self.slots[i] = None
        self.cache = self._init_cache(self.max_batch)

    def _fresh_rows(self, b: int):
        """An empty cache for b rows, as the model's init_cache makes it (kept per bucket size)."""
        if b not in self._fresh_cache:
            self._fresh_cache[b] = self._init_cache(b)
        return self._fresh_cache[b]

    def step(self) -> None:
        """Admits what fits, then decodes one token for every running request. A prefill that raises fails
        the requests that raise alone; a decode step that raises fails every running request (the rows
        cannot be told apart) and empties the cache; queued requests are served by the next steps."""
        free = [i for i, s in enumerate(self.slots) if s is None]
        fresh, fresh_slots = [], []
        while self.queue and free:
            rid, req = self.queue.popleft()
            slot = free.pop(0)
            if req.prefix_cache is None:
                fresh.append((rid, req))
                fresh_slots.append(slot)
                continue
            self._prefill([(rid, req)], [slot], req.prefix_cache)
        if fresh and self.pad_prompts:
            self._prefill(fresh, fresh_slots, None)
        elif fresh:
            by_len: dict = {}
            for item, slot in zip(fresh, fresh_slots):
                by_len.setdefault(len(item[1].prompt), []).append((item, slot))
            for group in by_len.values():
                self._prefill([g[0] for g in group], [g[1] for g in group], None)
        active = np.array([s is not None for s in self.slots])
        if not active.any():
            return
        try:
            if self.exit_decoder is None:
                nxt, self.cache = _decode_step(
                    self.graphdef, self.state, self.cache, self._last, active, self._sampling
                )
            else:
                nxt = self._exit_step(active)
            nxt = np.asarray(nxt)
        except Exception as e:  # pylint: disable=broad-except  # the running requests fail, the engine serves on
            self._reset(f"decode step failed: {type(e).__name__}: {e}")
            return
        now = time.perf_counter()
        for i in np.flatnonzero(active):
            self._emit(int(i), nxt[i], now)

    def _exit_step(self, active: np.ndarray) -> jax.Array:
        """The decode step with early exit for the occupied rows `active` bool [B]; counts exits and blocks."""
        decoder = self.exit_decoder
        logits, cache, index = decoder.step(jnp.asarray(self._last)[:, None], self.cache, active)
        self.cache = list(cache)
        np.add.at(self._exit_counts, np.asarray(index)[active], 1)
        self._block_rows += decoder.block_rows
        return _sample_step(logits[:, 0], self._sampling)

    def exit_stats(self) -> dict:
        """Early exit so far (decode tokens only; a prompt's first token runs every layer): tokens_per_exit [X + 1]
        (the last entry: the last layer), mean_layers per token, block_share = blocks the running rows ran
        (bucket padding included) / (tokens x layers)."""
        if self.exit_decoder is None:
            raise ValueError("exit_stats: this engine was built without early_exit")
        d = self.exit_decoder
        tokens = int(self._exit_counts.sum())
        layers = np.asarray([*d.layers, d.num_layers])
        return {
            "tokens_per_exit": self._exit_counts.tolist(),
            "mean_layers": float((self._exit_counts * layers).sum() / max(tokens, 1)),
            "block_share": self._block_rows / max(tokens * d.num_layers, 1),
        }

    def run(self, max_steps: int | None = None) -> None:
        """Steps until every queued and running request is finished (or max_steps)."""
        steps = 0
        while self.has_work() and (max_steps is None or steps < max_steps):
            self.step()
            steps += 1

    def generate(self, requests: Sequence[Request]) -> list[Result]:
        """Submits `requests` (one by one, so any number is fine), runs to completion, returns their results."""
        ids = [self.submit(r) for r in requests]
        self.run()
        return [self.results[i] for i in ids]
