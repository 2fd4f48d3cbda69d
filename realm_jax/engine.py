"""`Engine`: the one host driver of decoding (continuous batching, Realm's runtime manager).

The engine owns `max_batch` slots, each a row of one KV cache (and of the draft's, with a
draft). Requests wait in a FIFO queue; whenever a slot is free the next request is prefilled
into it (`steps.decode.prefill`), and one device call (`steps.loop.run_steps`) advances every
occupied slot by up to `steps_per_call` decode or speculative steps, each row stopping at its
own EOS or budget on the device. A request leaves its slot when it stops or is cancelled,
and the next one takes the slot. `rj.generate` and `rj.stream` are this driver with one
request.

Between scheduling points the device keeps working: each call is dispatched before the
previous call's tokens are read, so the host copies tokens out and yields them while the
device runs the next call. When a request waits for a slot, the engine reads first (a call
ends at the first row that stops, `end_at_finish`) and admits before dispatching, so a freed
slot does not sit out a whole call.

Everything here is host bookkeeping in plain Python; the arrays' meaning lives in
`realm_jax.steps`. The host never runs an eager device op: rows and sampling parameters are
built in NumPy and passed to the jitted programs, so that after `warmup()` nothing compiles.
Randomness is keyed by (seed, token position) only (request id 0 in `sampling.token_rngs`),
so a request draws the same tokens alone and batched, whatever slot it lands in.
"""

import collections
import concurrent.futures
import dataclasses
import os
import time
from collections.abc import Iterator, Sequence
from typing import NamedTuple

import jax
import numpy as np
from jax._src.dispatch import BACKEND_COMPILE_EVENT

from realm_jax.errors import AdapterError, RealmError, RequestError
from realm_jax.kv_cache import init_cache
from realm_jax.loading import Model
from realm_jax.lora.adapters import check_adapter, set_adapter_slot, stack_adapters
from realm_jax.lora.tree import LoraAdapter
from realm_jax.requests import (
    GREEDY,
    validate_budget,
    validate_count,
    validate_prompt,
    validate_sampling,
)
from realm_jax.sampling import Sampling, SamplingParams
from realm_jax.steps.decode import bucket, decode_window, prefill
from realm_jax.steps.drafts import LayerSkipDraft, check_draft, draft_spec
from realm_jax.steps.loop import run_steps
from realm_jax.steps.state import NO_STOP, Caches, StepSpec, Weights, host_rows

# Steps per device call: a step called alone pays the host's launches and a wait per token,
# which a call of several pays once (docs/results.md: "the largest gap" and "one request
# path"). Streamed text arrives in bursts of up to this many tokens (k + 1 times that with a
# draft), and a call ends early where a request waits for a slot.
STEPS_PER_CALL = 8


@dataclasses.dataclass
class _Request:
    """One submitted request and its progress (host state, mutable by the scheduler only).

    `unread_min` / `unread_max` bound the tokens this request has in device outputs that the
    host has not read yet (a prefill gives 1; a call of m steps at least m while the row
    runs, at most m * (k + 1)): the next call's step count and window come from them.
    """

    request_id: int
    prompt: np.ndarray  # [T] int32
    max_new_tokens: int
    sampling: Sampling
    seed: int
    adapter: str | None
    stop_at_eos: bool
    tokens: list[int] = dataclasses.field(default_factory=list)
    slot: int | None = None
    cancelled: bool = False
    unread_min: int = 0
    unread_max: int = 0
    accepted: list[int] | None = None  # [k + 1] steps by accepted draft tokens


class _Pending(NamedTuple):
    """A dispatched device call whose outputs the host has not read."""

    outputs: tuple  # (tokens [B', E], counts [B'], accepted [B', k+1] or None, active [B'])
    requests: tuple  # the request in each of its rows at dispatch (a prefill: the one request)
    min_tokens: int  # tokens each running row gets from it at least (`_Request.unread_min`)
    max_tokens: int  # and at most (`_Request.unread_max`)


@dataclasses.dataclass(frozen=True)
class TokenEvent:
    """What `Engine.stream` yields: one new token of a request, or the request's end.

    Attributes:
      request_id: the id `submit` returned.
      token: the new token id, or None for an event that only reports the end.
      done: True on the request's last event (EOS, budget reached, cancelled).
    """

    request_id: int
    token: int | None
    done: bool


class Engine:
    """Continuous batching of many requests over one model (see the module docstring).

    Args:
      model: a loaded `rj.Model`.
      max_batch: number of slots (rows of every step).
      max_seq_len: cache positions per slot; a request's prompt + max_new_tokens must fit.
      draft: an `rj.Model` with the model's vocabulary, or `rj.layer_skip_draft(model, n)`:
        every step is then a speculative step for all slots, each row accepting its own
        number of tokens. A layer-skip draft drafts with each row's adapter too.
      num_draft_tokens: k, the tokens the draft proposes per step when `draft` is given.
      implementation: attention implementation (see `rj.attention`).
      steps_per_call: the most decode or speculative steps one device call runs.

    Raises:
      RealmError: invalid sizes or draft.
    """

    def __init__(
        self,
        model: Model,
        max_batch: int = 8,
        max_seq_len: int = 2048,
        draft: Model | LayerSkipDraft | None = None,
        num_draft_tokens: int = 4,
        *,
        implementation: str = "auto",
        steps_per_call: int = STEPS_PER_CALL,
    ):
        if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
            raise RealmError(f"Engine: max_batch must be an integer >= 1, got {max_batch!r}")
        context = model.config.context_length
        if not isinstance(max_seq_len, int) or not 1 <= max_seq_len <= context:
            raise RealmError(
                f"Engine: max_seq_len must be an integer in 1..{context} (the model's context "
                f"length), got {max_seq_len!r}"
            )
        self.steps_per_call = validate_count(steps_per_call, "steps_per_call")
        self.model = model
        self.max_batch = max_batch
        self.max_seq_len = max_seq_len
        self.implementation = implementation
        self.draft = draft
        self._draft_spec = None
        if draft is not None:
            check_draft(model, draft)
            num_draft_tokens = validate_count(num_draft_tokens, "num_draft_tokens")
            self._draft_spec = draft_spec(draft, num_draft_tokens)
        self.num_draft_tokens = num_draft_tokens
        self._per_step = 1 if draft is None else num_draft_tokens + 1
        # A speculative step writes k + 1 positions past a row's length before rolling back.
        self._capacity = max_seq_len + (self._per_step if draft is not None else 0)
        target_cache = self._new_cache(model.config, model)
        draft_cache = None
        if draft is not None:  # a layer-skip draft: the target's layout, its own depth
            layout = model if isinstance(draft, LayerSkipDraft) else draft
            draft_cache = self._new_cache(draft.config, layout)
        self._caches = Caches(target=target_cache, draft=draft_cache)
        # Whether any request so far filters by top-k / top-p: set by the first that does and
        # never cleared, so an engine switches programs at most once (greedy-only traffic
        # never compiles the top-k / top-p searches; see `sampling.SamplingParams`).
        self._filtering = False
        self._rows = self._idle_rows()
        self._slots: list[_Request | None] = [None] * max_batch
        self._queue: collections.deque[_Request] = collections.deque()
        self._requests: dict[int, _Request] = {}  # submitted and not yet finished
        self._finished: dict[int, list[int]] = {}  # finished since the last `run`
        self._finished_accepted: dict[int, list[int]] = {}  # their `accepted` counts
        self._pending: list[_Pending] = []
        self._next_id = 0
        # Tenants: name -> (slot in the adapter stack, adapter). Stack slot 0 is the base
        # model (zeros); the stack grows by doubling, so adding tenants recompiles the steps
        # only log2(count) times, and a removed tenant's slot is zeroed and reused.
        self._adapters: dict[str, tuple[int, LoraAdapter]] = {}
        self._stack = None
        self._eos = model.tokenizer.eos_id if model.tokenizer is not None else None

    def _new_cache(self, config, layout: Model):
        """A cache of `config`'s layers in `layout`'s layer layout and dtype."""
        stacked = not isinstance(layout.params.layers, tuple)
        return init_cache(config, self.max_batch, self._capacity, layout.dtype, stacked)

    def _idle_rows(self, filtering: bool | None = None):
        """Rows for an engine with every slot free (host arrays: no device program runs)."""
        b = self.max_batch
        sampling = SamplingParams.from_rows([GREEDY] * b)
        filtering = self._filtering if filtering is None else filtering
        sampling = dataclasses.replace(sampling, filtering=filtering)
        zeros = np.zeros(b, np.int32)
        return host_rows(zeros, np.zeros(b, bool), zeros, zeros - 1, sampling, zeros, zeros, zeros)

    @property
    def _weights(self) -> Weights:
        separate = self.draft is not None and not isinstance(self.draft, LayerSkipDraft)
        return Weights(
            params=self.model.params,
            lora=self._stack,
            draft=self.draft.params if separate else None,
        )

    # Tenants ----------------------------------------------------------------------------

    def add_adapter(self, name: str, adapter: LoraAdapter) -> None:
        """Register a tenant's adapter; requests may then name it (also while running).

        Raises:
          AdapterError: a name already in use, or an adapter that does not fit the model.
        """
        if not isinstance(name, str) or not name:
            raise AdapterError(f"adapter name must be a non-empty string, got {name!r}")
        if name in self._adapters:
            raise AdapterError(f"adapter {name!r} is already registered: remove it first")
        check_adapter(adapter, self.model.params, self.model.config)
        used = {slot for slot, _ in self._adapters.values()}
        size = self._stack.num_adapters if self._stack is not None else 1
        free = [slot for slot in range(1, size) if slot not in used]
        if free:
            self._stack = set_adapter_slot(self._stack, free[0], adapter)
            self._adapters[name] = (free[0], adapter)
            return
        # No free slot: rebuild the stack with twice the slots (base, tenants, free ones).
        names = sorted(self._adapters, key=lambda n: self._adapters[n][0]) + [name]
        adapters = [self._adapters[n][1] for n in names[:-1]] + [adapter]
        slots = [None, *adapters] + [None] * (max(2, 2 * size) - 1 - len(adapters))
        self._stack = stack_adapters(slots)
        self._adapters = {
            n: (i + 1, a) for i, (n, a) in enumerate(zip(names, adapters, strict=True))
        }

    def remove_adapter(self, name: str) -> None:
        """Unregister a tenant's adapter.

        Raises:
          AdapterError: an unknown name, or requests (queued or running) still using it;
            nothing changes then.
        """
        if name not in self._adapters:
            raise AdapterError(f"unknown adapter {name!r}")
        users = sorted(r.request_id for r in self._requests.values() if r.adapter == name)
        if users:
            raise AdapterError(
                f"adapter {name!r} is still used by requests {users}: wait for them or "
                "cancel them first"
            )
        slot, _ = self._adapters.pop(name)
        self._stack = set_adapter_slot(self._stack, slot, None)

    @property
    def adapters(self) -> list[str]:
        """The registered adapter names."""
        return sorted(self._adapters)

    # Requests ---------------------------------------------------------------------------

    def submit(
        self,
        ids: Sequence[int],
        max_new_tokens: int = 64,
        sampling: Sampling = GREEDY,
        seed: int = 0,
        adapter: str | None = None,
        stop_at_eos: bool = True,
    ) -> int:
        """Queue a request and return its id.

        Raises:
          RequestError: empty or out-of-vocabulary prompt, max_new_tokens < 1, prompt +
            max_new_tokens beyond `max_seq_len`, invalid sampling or seed, unknown adapter.
            Nothing is queued then, and the requests already submitted are not affected.
        """
        prompt = validate_prompt(self.model.config, ids)
        budget = validate_budget(
            prompt.size, max_new_tokens, self.max_seq_len, "the engine's max_seq_len"
        )
        validate_sampling(sampling, seed)
        if adapter is not None and adapter not in self._adapters:
            raise RequestError(f"unknown adapter {adapter!r}; registered: {sorted(self._adapters)}")
        request = _Request(
            request_id=self._next_id,
            prompt=prompt,
            max_new_tokens=budget,
            sampling=sampling,
            seed=int(seed),
            adapter=adapter,
            stop_at_eos=bool(stop_at_eos),
            accepted=[0] * self._per_step,
        )
        self._next_id += 1
        self._filtering |= sampling.filters
        self._requests[request.request_id] = request
        self._queue.append(request)
        return request.request_id

    def cancel(self, request_id: int) -> None:
        """End a request with the tokens it has so far (at the next step; a finished one is
        left as it is).

        Raises:
          RequestError: `request_id` was never returned by this engine's `submit`.
        """
        if (
            isinstance(request_id, bool)
            or not isinstance(request_id, (int, np.integer))
            or not 0 <= request_id < self._next_id
        ):
            raise RequestError(
                f"cancel: unknown request id {request_id!r} (this engine has issued ids "
                f"0..{self._next_id - 1})"
            )
        if request_id in self._requests:
            self._requests[request_id].cancelled = True

    @property
    def pending(self) -> int:
        """Requests submitted and not yet finished (queued or in a slot)."""
        return len(self._requests)

    def accepted(self, request_id: int) -> list[int] | None:
        """[k + 1] for a request (running, or finished since the last `run`): element a counts
        the steps in which it accepted exactly a draft tokens (k = 0 without a draft); what
        `rj.stream`'s `stats` reports. None for an id not known."""
        request = self._requests.get(request_id)
        if request is None:
            return self._finished_accepted.get(request_id)
        return list(request.accepted)

    # Scheduling -------------------------------------------------------------------------

    def _finish(self, request: _Request, token: int | None = None) -> TokenEvent:
        if request.slot is not None:
            self._slots[request.slot] = None
            request.slot = None
        del self._requests[request.request_id]
        self._finished[request.request_id] = list(request.tokens)
        self._finished_accepted[request.request_id] = list(request.accepted)
        return TokenEvent(request.request_id, token, True)

    def _spec(self, attn_len: int) -> StepSpec:
        return StepSpec(self.model.config, attn_len, self.implementation, self._draft_spec)

    def _sync_filtering(self) -> None:
        """Give the rows the engine's filtering flag (static: a host-side replace)."""
        if self._rows.sampling.filtering != self._filtering:
            sampling = dataclasses.replace(self._rows.sampling, filtering=self._filtering)
            self._rows = dataclasses.replace(self._rows, sampling=sampling)

    def _request_row(self, request: _Request):
        """The request's own `Rows` (fields [1]) for `prefill`."""
        sampling = SamplingParams.from_rows([request.sampling])
        sampling = dataclasses.replace(sampling, filtering=self._filtering)
        stop = self._eos if (request.stop_at_eos and self._eos is not None) else NO_STOP
        adapter = self._adapters[request.adapter][0] if request.adapter else 0
        return host_rows(
            [0], [True], [request.max_new_tokens], [stop], sampling, [request.seed], [0], [adapter]
        )

    def _prefill_args(self, prompt: np.ndarray, slot: int, row):
        padded = bucket(prompt.size, self.max_seq_len)
        tokens = np.zeros((1, padded), np.int32)
        tokens[0, : prompt.size] = prompt
        num_tokens = np.asarray([prompt.size], np.int32)
        args = (self._weights, tokens, num_tokens, self._caches, self._rows, row, np.int32(slot))
        return args, self._spec(padded)

    def _admit(self, request: _Request, slot: int) -> None:
        """Dispatch the request's prefill into `slot` (its first token is read later)."""
        self._sync_filtering()
        request.slot = slot
        self._slots[slot] = request
        args, spec = self._prefill_args(request.prompt, slot, self._request_row(request))
        self._caches, self._rows, token, active = prefill(*args, spec=spec)
        request.unread_min = request.unread_max = 1
        outputs = (token, np.ones(1, np.int32), None, active)
        self._pending.append(_Pending(outputs, (request,), 1, 1))

    def _steps_args(self, num_steps: int):
        """The arguments and spec of a call of `num_steps` steps over the occupied slots."""
        reach = 0  # the longest row's length after the call, at most
        for request in self._slots:
            if request is not None:
                length = request.prompt.size + len(request.tokens) + request.unread_max - 1
                cap = request.prompt.size + request.max_new_tokens - 1 + self._per_step - 1
                reach = max(reach, min(length + num_steps * self._per_step, cap))
        live = np.asarray([r is not None for r in self._slots])
        end_at_finish = np.bool_(bool(self._queue))
        args = (self._weights, self._rows, self._caches, live, np.int32(num_steps), end_at_finish)
        return args, self._spec(decode_window(reach, self._capacity))

    def _dispatch_steps(self) -> bool:
        """Dispatch one call over the occupied slots if any may still need a step."""
        running = [r for r in self._slots if r is not None]
        left = [r.max_new_tokens - len(r.tokens) - r.unread_min for r in running]
        num_steps = min(self.steps_per_call, max(left, default=0))
        if num_steps <= 0:
            return False
        self._sync_filtering()
        args, spec = self._steps_args(num_steps)
        self._rows, self._caches, out = run_steps(*args, spec=spec, max_steps=self.steps_per_call)
        most = num_steps * self._per_step
        for request in running:
            request.unread_min += num_steps
            request.unread_max += most
        outputs = (out.tokens, out.counts, out.accepted, out.active)
        self._pending.append(_Pending(outputs, tuple(self._slots), num_steps, most))
        return True

    def _read(self, pending: _Pending) -> list[TokenEvent]:
        """Copy a call's outputs to the host and turn them into events."""
        events = []
        tokens, counts, accepted, active = jax.device_get(pending.outputs)
        for b, request in enumerate(pending.requests):
            if request is None:
                continue
            request.unread_min -= pending.min_tokens
            request.unread_max -= pending.max_tokens
            if request.request_id not in self._requests:  # cancelled since the dispatch
                continue
            if accepted is not None:
                request.accepted = [
                    a + int(n) for a, n in zip(request.accepted, accepted[b], strict=True)
                ]
            new = tokens[b, : counts[b]].tolist()
            request.tokens.extend(new)
            events.extend(TokenEvent(request.request_id, t, False) for t in new[:-1])
            if not active[b]:
                events.append(self._finish(request, new[-1] if new else None))
            elif new:
                events.append(TokenEvent(request.request_id, new[-1], False))
        return events

    def step(self) -> list[TokenEvent]:
        """Cancel, admit (prefilling into free slots), dispatch one call of up to
        `steps_per_call` steps, and read what the device finished before it.

        Returns:
          the events read in this step, in order.
        """
        events = []
        for request in [r for r in self._requests.values() if r.cancelled]:
            if request.slot is None:
                self._queue.remove(request)
            events.append(self._finish(request))
        if self._queue and None not in self._slots:
            # A waiting request may get a slot that an unread call freed: read it first.
            while self._pending:
                events.extend(self._read(self._pending.pop(0)))
        while self._queue and None in self._slots:
            self._admit(self._queue.popleft(), self._slots.index(None))
        dispatched = self._dispatch_steps()
        while len(self._pending) > int(dispatched):
            events.extend(self._read(self._pending.pop(0)))
        return events

    def stream(self) -> Iterator[TokenEvent]:
        """Run until every submitted request is finished, yielding events as they happen.

        Requests may be submitted or cancelled between events; they join the running batch.
        """
        while self._requests or self._pending:
            yield from self.step()

    def run(self) -> dict[int, list[int]]:
        """Run until every submitted request is finished.

        Returns:
          {request id: new token ids} for every request finished since the last `run`
          (a cancelled request keeps the tokens it had).
        """
        for _ in self.stream():
            pass
        finished, self._finished = self._finished, {}
        self._finished_accepted = {}
        return finished

    # Warm-up ----------------------------------------------------------------------------

    def programs(self) -> list[tuple]:
        """Every (function, args, spec, extra statics) this engine's configuration can run:
        a prefill per prompt bucket and a call of steps per attention window, each with and
        without the top-k / top-p searches, over the adapter stack as it is now."""
        row = self._request_row(
            _Request(0, np.zeros(1, np.int32), 1, GREEDY, 0, None, True, accepted=[])
        )
        prompt_buckets = sorted({bucket(n, self.max_seq_len) for n in _powers(self.max_seq_len)})
        windows = sorted({decode_window(n, self._capacity) for n in _powers(self._capacity)})
        programs = []
        for filtering in (False, True):
            rows = self._idle_rows(filtering)
            one = dataclasses.replace(
                row, sampling=dataclasses.replace(row.sampling, filtering=filtering)
            )
            for size in prompt_buckets:
                weights, tokens, num_tokens, caches, _, _, slot = self._prefill_args(
                    np.zeros(size, np.int32), 0, one
                )[0]
                args = (weights, tokens, num_tokens, caches, rows, one, slot)
                programs.append((prefill, args, dict(spec=self._spec(size))))
            live = np.zeros(self.max_batch, bool)
            for window in windows:
                args = (self._weights, rows, self._caches, live, np.int32(0), np.bool_(False))
                statics = dict(spec=self._spec(window), max_steps=self.steps_per_call)
                programs.append((run_steps, args, statics))
        return programs

    def warmup(self, threads: int | None = None) -> dict:
        """Compile every program this engine can run (`programs`), side by side on `threads`
        threads (default: the CPUs, at most 8; XLA compiles outside the GIL), so that
        afterwards no request it accepts
        triggers a compilation. Adding a tenant that grows the adapter stack changes the
        programs' shapes: warm up again after it.

        Returns:
          {"programs": how many it lowered, "compilations": XLA compilations counted (fewer
          when some were compiled already), "seconds": wall time}.
        """
        start = time.perf_counter()

        def compile_one(program):
            function, args, statics = program
            function.lower(*args, **statics).compile()

        programs = self.programs()
        threads = threads or min(8, os.cpu_count() or 1)
        with _count_compilations() as counter:
            with concurrent.futures.ThreadPoolExecutor(threads) as pool:
                list(pool.map(compile_one, programs))
        return dict(
            programs=len(programs),
            compilations=counter.count,
            seconds=time.perf_counter() - start,
        )


def _powers(limit: int) -> list[int]:
    """1, 2, 4, ... up to the first power >= limit, and limit itself."""
    values, n = [limit], 1
    while n < limit:
        values.append(n)
        n *= 2
    return values + [n]


class _count_compilations:
    """A context that counts XLA backend compilations (`jax.monitoring` events)."""

    def __enter__(self):
        self.count = 0
        self._active = True

        def listener(event, duration, **kwargs):
            if self._active and event == BACKEND_COMPILE_EVENT:
                self.count += 1

        jax.monitoring.register_event_duration_secs_listener(listener)
        return self

    def __exit__(self, *exc):
        self._active = False
        return False
