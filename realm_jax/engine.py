"""`Engine`: continuous batching over one preallocated KV cache (Realm's runtime manager).

The engine owns `max_batch` slots, each a row of one KV cache. Requests wait in a FIFO queue;
whenever a slot is free the next request is prefilled into it (`prefill_into_slot`), and one
`decode_step` advances every occupied slot at once, free slots masked. A request leaves its slot
at EOS, at its token budget or when cancelled, and the next one takes the slot at once.

Everything here is host-side bookkeeping in plain Python; the arrays' meaning lives in the
jitted steps of `batching.py`, the same ones `rj.generate` runs. Randomness is keyed by
(seed, token position) only (`sampling.token_rngs` with request id 0), so a request draws the
same tokens alone and batched, whatever slot it lands in.
"""

import collections
import dataclasses
from collections.abc import Iterator, Sequence

import jax.numpy as jnp
import numpy as np

from realm_jax.batching import bucket, decode_step, decode_window, prefill_into_slot
from realm_jax.errors import AdapterError, RealmError, RequestError
from realm_jax.generation import GREEDY, validate_ids, validate_sampling
from realm_jax.kv_cache import init_cache
from realm_jax.loading import Model
from realm_jax.lora import LoraAdapter, check_adapter, set_adapter_slot, stack_adapters
from realm_jax.sampling import Sampling, SamplingParams
from realm_jax.speculative import (
    SpeculativeState,
    check_draft,
    draft_lora,
    speculative_step,
)


@dataclasses.dataclass
class _Request:
    """One submitted request and its progress (host state, mutable by the scheduler only)."""

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
      max_batch: number of slots (rows of every decode step).
      max_seq_len: cache positions per slot; a request's prompt + max_new_tokens must fit.
      draft: an `rj.Model` with the model's vocabulary: every step is then a speculative
        step (`speculative.speculative_step`) for all slots, each row accepting its own
        number of tokens. A `layer_skip_draft` of `model` drafts with each row's adapter too.
      num_draft_tokens: k, the tokens the draft proposes per step when `draft` is given.
      implementation: attention implementation (see `rj.attention`).

    Raises:
      RealmError: invalid sizes.
    """

    def __init__(
        self,
        model: Model,
        max_batch: int = 8,
        max_seq_len: int = 2048,
        draft: Model | None = None,
        num_draft_tokens: int = 4,
        *,
        implementation: str = "auto",
    ):
        if not isinstance(max_batch, int) or max_batch < 1:
            raise RealmError(f"Engine: max_batch must be an integer >= 1, got {max_batch!r}")
        context = model.config.context_length
        if not isinstance(max_seq_len, int) or not 1 <= max_seq_len <= context:
            raise RealmError(
                f"Engine: max_seq_len must be an integer in 1..{context} (the model's context "
                f"length), got {max_seq_len!r}"
            )
        if draft is not None:
            check_draft(model, draft)
            if isinstance(num_draft_tokens, bool) or not isinstance(num_draft_tokens, int):
                raise RealmError(
                    f"Engine: num_draft_tokens must be an integer >= 1, got {num_draft_tokens!r}"
                )
            if num_draft_tokens < 1:
                raise RealmError(
                    f"Engine: num_draft_tokens must be an integer >= 1, got {num_draft_tokens!r}"
                )
        self.model = model
        self.max_batch = max_batch
        self.max_seq_len = max_seq_len
        self.num_draft_tokens = num_draft_tokens
        self.implementation = implementation
        self.draft = draft
        # A speculative step writes k + 1 positions past a row's length before rolling back.
        self._capacity = max_seq_len + (num_draft_tokens + 1 if draft is not None else 0)
        self._cache = self._new_cache(model)
        self._draft_cache = self._new_cache(draft) if draft is not None else None
        self._slots: list[_Request | None] = [None] * max_batch
        self._lengths = np.zeros(max_batch, np.int64)  # host mirror of the cache's lengths
        self._next = np.zeros(max_batch, np.int32)  # each slot's newest token, not yet cached
        self._queue: collections.deque[_Request] = collections.deque()
        self._requests: dict[int, _Request] = {}  # submitted and not yet finished
        self._finished: dict[int, list[int]] = {}  # finished since the last `run`
        self._next_id = 0
        # Tenants: name -> (slot in the adapter stack, adapter). Stack slot 0 is the base
        # model (zeros); the stack grows by doubling, so adding tenants recompiles the steps
        # only log2(count) times, and a removed tenant's slot is zeroed and reused.
        self._adapters: dict[str, tuple[int, LoraAdapter]] = {}
        self._stack = None
        self._draft_stack = None  # the draft's part of the stack (see `_set_stack`)
        self._eos = model.tokenizer.eos_id if model.tokenizer is not None else None
        # Whether any request so far filters by top-k / top-p (see `_sampling`): set by the
        # first that does and never cleared.
        self._filtering = False

    def _new_cache(self, model: Model):
        stacked = not isinstance(model.params.layers, tuple)
        return init_cache(model.config, self.max_batch, self._capacity, model.dtype, stacked)

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
            self._set_stack(set_adapter_slot(self._stack, free[0], adapter))
            self._adapters[name] = (free[0], adapter)
            return
        # No free slot: rebuild the stack with twice the slots (base, tenants, free ones).
        names = sorted(self._adapters, key=lambda n: self._adapters[n][0]) + [name]
        adapters = [self._adapters[n][1] for n in names[:-1]] + [adapter]
        slots = [None, *adapters] + [None] * (max(2, 2 * size) - 1 - len(adapters))
        self._set_stack(stack_adapters(slots))
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
        self._set_stack(set_adapter_slot(self._stack, slot, None))

    @property
    def adapters(self) -> list[str]:
        """The registered adapter names."""
        return sorted(self._adapters)

    def _set_stack(self, stack) -> None:
        """Replace the adapter stack, and with it the draft's part (once per change, not per
        step): a layer-skip draft runs the stack's first layers, another draft none."""
        self._stack = stack
        if self.draft is not None:
            self._draft_stack = draft_lora(self.model, self.draft, stack)

    def _lora_kwargs(self, requests: Sequence["_Request | None"]) -> tuple[dict, dict]:
        """forward keyword arguments (target, draft) for rows holding `requests`."""
        if self._stack is None:
            return {}, {}
        target = dict(lora=self._stack, adapter_ids=self._adapter_ids(requests))
        if self._draft_stack is None:
            return target, {}
        return target, dict(target, lora=self._draft_stack)

    def _adapter_ids(self, requests: Sequence["_Request | None"]) -> jnp.ndarray | None:
        if self._stack is None:
            return None
        ids = [self._adapters[r.adapter][0] if r is not None and r.adapter else 0 for r in requests]
        return jnp.asarray(ids, jnp.int32)

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
          RequestError: empty or out-of-vocabulary prompt, prompt + max_new_tokens beyond
            `max_seq_len`, invalid sampling or seed, unknown adapter. Nothing is queued then,
            and the requests already submitted are not affected.
        """
        prompt = validate_ids(self.model, ids, max_new_tokens)
        if prompt.size + max_new_tokens > self.max_seq_len:
            raise RequestError(
                f"prompt ({prompt.size} tokens) + max_new_tokens ({max_new_tokens}) exceeds "
                f"the engine's max_seq_len {self.max_seq_len}"
            )
        validate_sampling(sampling, seed)
        if adapter is not None and adapter not in self._adapters:
            raise RequestError(f"unknown adapter {adapter!r}; registered: {sorted(self._adapters)}")
        request = _Request(
            request_id=self._next_id,
            prompt=prompt,
            max_new_tokens=int(max_new_tokens),
            sampling=sampling,
            seed=int(seed),
            adapter=adapter,
            stop_at_eos=bool(stop_at_eos),
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

    # Scheduling -------------------------------------------------------------------------

    def _finish(self, request: _Request) -> TokenEvent:
        if request.slot is not None:
            self._slots[request.slot] = None
            request.slot = None
        del self._requests[request.request_id]
        self._finished[request.request_id] = list(request.tokens)
        return TokenEvent(request.request_id, None, True)

    def _accept(self, request: _Request, token: int) -> TokenEvent:
        """Record a request's new token; free its slot when it is the last one."""
        request.tokens.append(token)
        done = len(request.tokens) >= request.max_new_tokens or (
            request.stop_at_eos and token == self._eos
        )
        if done:
            self._finish(request)
        else:
            self._next[request.slot] = token
        return TokenEvent(request.request_id, token, done)

    def _sampling(self, rows: Sequence[Sampling]) -> SamplingParams:
        """The rows' `SamplingParams`, their `filtering` flag set once any request so far has
        filtered. A per-batch flag would compile a second program for each shape at every
        switch between batches with and without such a row; this way an engine switches at
        most once (greedy-only traffic never compiles the top-k / top-p searches)."""
        params = SamplingParams.from_rows(rows)
        return dataclasses.replace(params, filtering=params.filtering or self._filtering)

    def _sampling_rows(self) -> tuple[SamplingParams, jnp.ndarray]:
        rows = [r.sampling if r is not None else GREEDY for r in self._slots]
        seeds = [r.seed if r is not None else 0 for r in self._slots]
        return self._sampling(rows), jnp.asarray(seeds, jnp.int32)

    def _prefill(self, request: _Request, slot: int) -> TokenEvent:
        prompt = request.prompt
        padded = bucket(prompt.size, self.max_seq_len)
        tokens = np.zeros((1, padded), np.int32)
        tokens[0, : prompt.size] = prompt
        request.slot = slot
        self._slots[slot] = request
        token, _, self._cache = prefill_into_slot(
            self.model.params,
            jnp.asarray(tokens),
            jnp.asarray([prompt.size], jnp.int32),
            self._cache,
            jnp.asarray(slot, jnp.int32),
            self._sampling([request.sampling]),
            jnp.asarray([request.seed], jnp.int32),
            jnp.zeros((1,), jnp.int32),
            self._stack,
            self._adapter_ids([request]),
            config=self.model.config,
            implementation=self.implementation,
        )
        if self.draft is not None:
            _, draft_kwargs = self._lora_kwargs([request])
            _, _, self._draft_cache = prefill_into_slot(
                self.draft.params,
                jnp.asarray(tokens),
                jnp.asarray([prompt.size], jnp.int32),
                self._draft_cache,
                jnp.asarray(slot, jnp.int32),
                self._sampling([request.sampling]),
                jnp.asarray([request.seed], jnp.int32),
                jnp.zeros((1,), jnp.int32),
                draft_kwargs.get("lora"),
                draft_kwargs.get("adapter_ids"),
                config=self.draft.config,
                implementation=self.implementation,
            )
        self._lengths[slot] = prompt.size
        return self._accept(request, int(token[0]))

    def _speculate(self) -> list[TokenEvent]:
        active = np.array([r is not None for r in self._slots])
        k = self.num_draft_tokens
        window = decode_window(int(self._lengths[active].max()) + k + 1, self._capacity)
        sampling, seeds = self._sampling_rows()
        target_kwargs, draft_kwargs = self._lora_kwargs(self._slots)
        state = SpeculativeState(
            tokens=jnp.asarray(self._next),
            target_cache=self._cache,
            draft_cache=self._draft_cache,
        )
        state, emitted, accepted = speculative_step(
            self.model.params,
            self.draft.params,
            state,
            jnp.asarray(active),
            sampling,
            seeds,
            jnp.zeros((self.max_batch,), jnp.int32),
            target_kwargs,
            draft_kwargs,
            target_config=self.model.config,
            draft_config=self.draft.config,
            num_draft_tokens=k,
            attn_len=window,
            implementation=self.implementation,
        )
        self._cache, self._draft_cache = state.target_cache, state.draft_cache
        emitted, accepted = np.asarray(emitted), np.asarray(accepted)
        self._lengths[active] += accepted[active] + 1
        events = []
        for slot, request in enumerate(list(self._slots)):
            if request is None:
                continue
            for token in emitted[slot, : accepted[slot] + 1]:
                events.append(self._accept(request, int(token)))
                if events[-1].done:  # EOS or budget inside the block: the rest is dropped
                    break
        return events

    def _decode(self) -> list[TokenEvent]:
        if self.draft is not None:
            return self._speculate()
        active = np.array([r is not None for r in self._slots])
        window = decode_window(int(self._lengths[active].max()) + 1, self._capacity)
        sampling, seeds = self._sampling_rows()
        tokens, _, self._cache = decode_step(
            self.model.params,
            jnp.asarray(self._next),
            jnp.asarray(active),
            self._cache,
            sampling,
            seeds,
            jnp.zeros((self.max_batch,), jnp.int32),
            self._stack,
            self._adapter_ids(self._slots),
            config=self.model.config,
            attn_len=window,
            implementation=self.implementation,
        )
        tokens = np.asarray(tokens)
        self._lengths[active] += 1
        return [
            self._accept(request, int(tokens[slot]))
            for slot, request in enumerate(list(self._slots))
            if request is not None
        ]

    def step(self) -> list[TokenEvent]:
        """Cancel, admit (prefilling into free slots) and run one decode step for all slots.

        Returns:
          the events of this step, in order.
        """
        events = []
        for request in [r for r in self._requests.values() if r.cancelled]:
            if request.slot is None:
                self._queue.remove(request)
            events.append(self._finish(request))
        while self._queue and None in self._slots:
            events.append(self._prefill(self._queue.popleft(), self._slots.index(None)))
        if any(r is not None for r in self._slots):
            events.extend(self._decode())
        return events

    def stream(self) -> Iterator[TokenEvent]:
        """Run until every submitted request is finished, yielding events as they happen.

        Requests may be submitted or cancelled between events; they join the running batch.
        """
        while self._requests:
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
        return finished
