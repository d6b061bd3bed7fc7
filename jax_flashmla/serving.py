"""The serving loop: continuous batching over the slots of one batch and one shared page pool.

    server = Server(model, batch_size=8, max_seq_len=4096, num_blocks=256, chunk=32,
                    implementation=None)
    rid = server.submit(Request(prompt, max_new_tokens=64))   # waits for a slot and its pages
    while not server.idle:
      result = server.step()       # admit, reserve pages, run the compiled step, account
      for request in result.completed:
        ...                        # request.output holds every token it generated
    server.cancel(rid)             # at any time: its pages go back to the pool at once

Model-agnostic: any Flax NNX module called as

    logits, caches = model(tokens, caches, num_new=..., metadata=..., implementation=...)

with `tokens [b, s]` int32 (each row's new tokens, left-padded), `caches` one `PagedKVCache` per
layer, `logits [b, vocab]` float32 of each row's last token, `model.config.num_layers` and the
query heads in `model.config.attention.num_heads` (or `model.config.num_heads`); see
`jax_flashmla.demo.DemoModel`.

How a step runs (all scheduling is on the host; the device never waits for it):

- one jitted step, the layer caches donated (updated in place), two compiled shapes: a chunk step
  (`chunk` tokens per row) while some prompt is being read, a one-token step when all rows
  decode. The scheduler records (`get_mla_metadata`) are computed once per step, for every layer;
- admission: the oldest waiting request takes a free slot once its worst case (prompt plus
  budget) fits in the pool beside the worst cases of the running requests; requests behind it
  wait (first come, first served). So a running request always finds the pages it grows into
  and none is ever dropped or preempted; a request that could never fit is refused at `submit`;
- pages are taken as a sequence grows (`PageAllocator.reserve_many`) and go back to the pool when
  the request finishes or is cancelled; the slot's device length is reset in the next step;
- sampled tokens stay on the device and are fetched a few steps later (`output_lag`), in
  batches, so the host never waits for the step it has just dispatched.
"""

from __future__ import annotations

import collections
import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np

try:
  from flax import nnx
except ImportError as e:  # flax is an optional dependency of jax_flashmla
  raise ImportError("jax_flashmla.serving needs Flax: pip install 'jax_flashmla[flax]'") from e

from jax_flashmla.allocator import PageAllocator
from jax_flashmla.cache import NO_PAGE, PagedKVCache
from jax_flashmla.metadata import get_mla_metadata

# Request.status values. "done": every token sampled (the output may still be on its way to the
# host); "cancelled": stopped by `cancel`, its output holds the tokens sampled before.
WAITING, RUNNING, DONE, CANCELLED = "waiting", "running", "done", "cancelled"


def attention_heads(config) -> int:
  """Query heads of a model's MLA layers: `config.attention.num_heads` or `config.num_heads`."""
  attention = getattr(config, "attention", config)
  return int(attention.num_heads)


def make_step(graphdef, implementation, *, return_logits: bool = False):
  """The jitted step: one chunk of tokens per row, caches donated, next tokens sampled.

  Args (of the returned function):
    state: the model's parameters (`nnx.split`).
    caches: one `PagedKVCache` per layer (donated).
    block_table: `[b, max_blocks]` int32 from the allocator (shared by every layer). Not
      donated: the allocator hands out the same array until the table changes.
    tokens: `[b, s]` int32, each row's new tokens left-padded.
    num_new: `[b]` int32 new tokens per row (0: the row is idle this step).
    use_prev: `[b]` bool: the row's one new token is its last sampled token (`prev`).
    restart: `[b]` bool: the row's sequence starts over (length 0) before this step.
    prev: `[b]` int32 last sampled tokens.

  Returns:
    `(caches, next [b] int32)`, greedy; rows with `num_new == 0` keep `prev`. With
    `return_logits`, also the logits `next` was chosen from, `[b, vocab]` float32 (for callers
    that score tokens, e.g. `jax_flashmla.models.deepseek.Generator`).
  """

  def step(state, caches, block_table, tokens, num_new, use_prev, restart, prev):
    model = nnx.merge(graphdef, state)
    caches = tuple(c.replace(block_table=block_table).reset(restart) for c in caches)
    tokens = tokens.at[:, -1].set(jnp.where(use_prev, prev, tokens[:, -1]))
    heads = attention_heads(model.config)
    # The step's scheduler records: once, for every layer (MLA caches one latent head).
    metadata = get_mla_metadata(caches[0].lengths + num_new, tokens.shape[1] * heads, 1,
                                implementation=implementation)
    logits, caches = model(tokens, caches, num_new=num_new, metadata=metadata,
                           implementation=implementation)
    sampled = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    sampled = jnp.where(num_new > 0, sampled, prev)
    return (caches, sampled, logits) if return_logits else (caches, sampled)

  return jax.jit(step, donate_argnums=(1,))


@dataclasses.dataclass(eq=False)
class Request:
  """One prompt and its generation budget; the server fills in the rest.

  Attributes:
    prompt: `[n]` int32 token ids, n >= 1.
    max_new_tokens: tokens to generate (>= 1); a request that is not cancelled gets exactly
      this many.
    output: the generated tokens, appended as they reach the host.
    id: set by `Server.submit`.
    status: "new", then `WAITING`, `RUNNING`, and `DONE` or `CANCELLED`.
    num_generated: tokens sampled so far (counted on the host when the step is dispatched;
      `output` catches up a few steps later).
  """

  prompt: np.ndarray
  max_new_tokens: int
  output: list[int] = dataclasses.field(default_factory=list)
  id: int | None = dataclasses.field(default=None, init=False)
  status: str = dataclasses.field(default="new", init=False)
  num_generated: int = dataclasses.field(default=0, init=False)

  @property
  def max_cached_tokens(self) -> int:  # the last sampled token is never written to the cache
    return len(self.prompt) + self.max_new_tokens - 1


def make_requests(rng: np.random.Generator, n: int, max_prompt_len: int, max_new_tokens: int,
                  vocab_size: int) -> list[Request]:
  """Random prompts of very different lengths (log-uniform in [4, max_prompt_len]) and budgets
  (uniform in [max(1, max_new_tokens // 4), max_new_tokens]), token ids uniform in
  [0, vocab_size)."""
  lens = np.exp(rng.uniform(np.log(4), np.log(max_prompt_len), n)).round().astype(int)
  lens[0] = max_prompt_len  # always one long prompt among short ones
  news = rng.integers(max(1, max_new_tokens // 4), max_new_tokens + 1, n)
  return [Request(rng.integers(0, vocab_size, int(p), dtype=np.int32), int(m))
          for p, m in zip(lens, news, strict=True)]


@dataclasses.dataclass
class _Slot:
  request: Request
  prompt_read: int = 0   # prompt tokens already in the cache
  length: int = 0        # tokens in the cache


@dataclasses.dataclass(frozen=True)
class StepResult:
  """What one `Server.step` did (host-side counts; the step itself may still be running).

  Attributes:
    step: steps run by the server so far, this one included.
    width: tokens per row of the compiled step: `chunk` (some prompt was read) or 1.
    generated: tokens sampled for requests.
    prompt_tokens: prompt tokens read into the cache.
    admitted: ids of the requests that took a slot before the step.
    finished: ids of the requests that sampled their last token (their pages are free again).
    completed: requests handed back, done or cancelled, whose output is complete on the host
      (the server keeps no reference to them).
    pool_wait: a slot was free but the oldest waiting request's worst case did not fit in the
      pool beside the running requests', so it waited.
  """

  step: int
  width: int
  generated: int
  prompt_tokens: int
  admitted: tuple[int, ...]
  finished: tuple[int, ...]
  completed: tuple[Request, ...]
  pool_wait: bool


@dataclasses.dataclass
class ServeStats:
  tokens: int             # generated
  prompt_tokens: int
  seconds: float          # the serving loop, after compilation
  compile_seconds: float
  steps: int
  chunk_steps: int
  peak_pages: int
  pages_reused: int       # page hand-outs that reused a page freed by an earlier request

  @property
  def tokens_per_second(self) -> float:
    return self.tokens / self.seconds


class Server:
  """Continuous batching over `batch_size` slots and one page pool (host-side scheduling).

  Args:
    model: an NNX module that follows the contract in the module docstring.
    batch_size: slots decoded together (rows of every step).
    max_seq_len: tokens one sequence may hold (block-table width).
    num_blocks: pages of 64 tokens in the pool shared by all slots (one pool per layer).
    chunk: prompt tokens read per row and step.
    implementation: attention: None (kernels on Hopper, pure JAX elsewhere), "cuda" or "xla".
    cache_dtype: of the cache pages (the CUDA kernels take bfloat16).
    kv_format: "bf16" (rows of `cache_dtype`) or "fp8" (DeepSeek-V3.2's FP8 rows, 656 bytes
      per token; `PagedKVCache.create`).
    log: where `run_until_done` and `serve` print progress.
    log_every: steps between their progress lines.
    output_lag: sampled tokens are fetched to the host this many steps after they were
      dispatched (in batches of as many steps), so fetching never waits for a running step.

  Counters (cumulative, read them freely): `steps`, `chunk_steps`, `tokens_generated`,
  `prompt_tokens_read`, `peak_pages`, `pages_reused`, `pool_waits` (steps where the pool, not
  the slots, kept the oldest waiting request out), `num_submitted`, `num_finished`,
  `num_cancelled`.
  """

  def __init__(self, model, *, batch_size: int, max_seq_len: int, num_blocks: int, chunk: int,
               implementation: str | None, cache_dtype=jnp.bfloat16, kv_format: str = "bf16",
               log=print,
               log_every: int = 10, output_lag: int = 8):
    for name, v in (("batch_size", batch_size), ("chunk", chunk), ("log_every", log_every),
                    ("output_lag", output_lag)):
      if not isinstance(v, (int, np.integer)) or v < 1:
        raise ValueError(f"{name}: expected a positive int, got {v!r}")
    self.batch_size, self.chunk, self.log, self.log_every = batch_size, chunk, log, log_every
    self.output_lag = output_lag
    self.implementation = implementation
    self.num_layers = int(model.config.num_layers)
    self.num_heads = attention_heads(model.config)
    self.graphdef, self.state = nnx.split(model)
    self.caches = tuple(PagedKVCache.create(batch_size, max_seq_len, num_blocks=num_blocks,
                                            dtype=cache_dtype, kv_format=kv_format)
                        for _ in range(self.num_layers))
    self.allocator = PageAllocator.for_cache(self.caches[0])
    self._device_table, self._table_changed = None, True
    self.step_fn = make_step(self.graphdef, implementation)
    self._compiled = {}
    self.compile_seconds = 0.0

    self._waiting: collections.deque[Request] = collections.deque()
    self._slots: list[_Slot | None] = [None] * batch_size
    self._requests: dict[int, Request] = {}  # submitted and not yet handed back
    self._committed = 0  # pages the running requests may still grow into (admission control)
    self._restart = np.zeros(batch_size, bool)
    self._prev = jnp.zeros((batch_size,), jnp.int32)
    # Per dispatched step: (its sampled tokens on the device, [(request, slot)] that count).
    self._pending: collections.deque = collections.deque()
    self._completed: list[Request] = []
    self._ever_used: set[int] = set()  # pages handed out at least once (at most num_blocks)
    self._next_id = 0

    self.steps = self.chunk_steps = self.tokens_generated = self.prompt_tokens_read = 0
    self.peak_pages = self.pages_reused = self.pool_waits = 0
    self.num_submitted = self.num_finished = self.num_cancelled = 0

  # ---- queries ----------------------------------------------------------------------------------

  @property
  def num_waiting(self) -> int:
    return len(self._waiting)

  @property
  def num_running(self) -> int:
    return sum(sl is not None for sl in self._slots)

  @property
  def idle(self) -> bool:
    """Nothing waits and nothing runs (outputs may still be on the device: see `drain`)."""
    return not self._waiting and not any(self._slots)

  def waiting_ids(self) -> list[int]:
    """Ids of the waiting requests, the next to be admitted first."""
    return [r.id for r in self._waiting]

  def slot_lengths(self) -> np.ndarray:
    """`[b]` tokens each slot's request has in the cache after the last step; -1: no request."""
    return np.array([-1 if sl is None else sl.length for sl in self._slots], np.int64)

  # ---- requests ---------------------------------------------------------------------------------

  def check_fits(self, request: Request, name: str = "request") -> None:
    """Raises ValueError if `request` could never run here (too long for a slot or the pool)."""
    if len(request.prompt) < 1 or request.max_new_tokens < 1:
      raise ValueError(f"{name}: expected a prompt of >= 1 tokens and max_new_tokens >= 1, got "
                       f"{len(request.prompt)} and {request.max_new_tokens}")
    alloc = self.allocator
    need = alloc.pages_for(request.max_cached_tokens)
    if need > min(alloc.num_blocks, alloc.max_blocks_per_seq):
      raise ValueError(f"{name}: {request.max_cached_tokens} tokens need {need} pages; the "
                       f"pool has {alloc.num_blocks}, a sequence at most "
                       f"{alloc.max_blocks_per_seq}")

  def submit(self, request: Request) -> int:
    """Queues `request` (it runs when a slot and its worst case's pages are free); its id."""
    if request.status != "new":
      raise ValueError(f"request: already submitted (id {request.id}, {request.status})")
    self.check_fits(request)
    request.id, self._next_id = self._next_id, self._next_id + 1
    request.status = WAITING
    self._requests[request.id] = request
    self._waiting.append(request)
    self.num_submitted += 1
    return request.id

  def cancel(self, request_id: int) -> bool:
    """Stops a waiting or running request; a running one's pages go back to the pool now.

    Returns False (and changes nothing) if the request is unknown, done or already cancelled.
    The tokens it sampled before stay in its output; it is handed back as completed once they
    have reached the host.
    """
    request = self._requests.get(request_id)
    if request is None or request.status not in (WAITING, RUNNING):
      return False
    if request.status == WAITING:
      self._waiting.remove(request)
    else:
      slot = next(i for i, sl in enumerate(self._slots) if sl and sl.request is request)
      self._release(slot)
    request.status = CANCELLED
    self.num_cancelled += 1
    self._complete_if_fetched(request)
    return True

  # ---- the loop ---------------------------------------------------------------------------------

  def compile(self) -> float:
    """Compiles both step shapes ahead of time; returns the seconds it took."""
    t0 = time.perf_counter()
    b = self.batch_size
    for s in sorted({1, self.chunk}):
      args = self._args(np.zeros((b, s), np.int32), np.zeros(b, np.int32), np.zeros(b, bool),
                        np.zeros(b, bool), jnp.zeros((b,), jnp.int32))
      self._compiled[s] = self.step_fn.lower(*args).compile()
    self.compile_seconds = time.perf_counter() - t0
    return self.compile_seconds

  def _args(self, tokens, num_new, use_prev, restart, prev):
    # The block table is passed beside the caches, never inside them: the caches are donated,
    # and the same device table is passed again until it changes.
    return (self.state, self.caches, self._block_table(), jnp.asarray(tokens),
            jnp.asarray(num_new), jnp.asarray(use_prev), jnp.asarray(restart), prev)

  def _block_table(self) -> jax.Array:
    """The allocator's table on the device, sent again only after it changed.

    Sent from a private host copy rather than by `PageAllocator.device_block_table()`: that
    sends the allocator's own array, which it later edits in place, and the transfer may still
    be reading it when the call has returned (on the CPU it is, and a step then saw pages that
    were reserved or freed after it was dispatched).
    """
    if self._table_changed:
      self._device_table = jnp.asarray(np.array(self.allocator.block_table))
      self._table_changed = False
    return self._device_table

  def _admit(self) -> tuple[list[int], bool]:
    """Moves waiting requests into free slots while their worst case fits in the pool."""
    admitted, pool_wait = [], False
    for slot in range(self.batch_size):
      if not self._waiting:
        break
      if self._slots[slot] is not None:
        continue
      request = self._waiting[0]
      need = self.allocator.pages_for(request.max_cached_tokens)
      if self._committed + need > self.allocator.num_blocks:
        pool_wait = True
        break
      self._committed += need
      self._waiting.popleft()
      request.status = RUNNING
      self._slots[slot] = _Slot(request)
      admitted.append(request.id)
    return admitted, pool_wait

  def step(self) -> StepResult | None:
    """Admits, runs one compiled step over the running requests and accounts for it.

    Returns None when there was nothing to run (nothing waiting or running); outputs still on
    the device are then handed back by `drain`.
    """
    if not self._compiled:
      self.compile()
    alloc, b = self.allocator, self.batch_size
    admitted, pool_wait = self._admit()
    self.pool_waits += pool_wait
    if not any(self._slots):
      return None

    s = self.chunk if any(sl and sl.prompt_read < len(sl.request.prompt)
                          for sl in self._slots) else 1
    tokens = np.zeros((b, s), np.int32)
    num_new = np.zeros(b, np.int32)
    use_prev = np.zeros(b, bool)
    growth = {}
    prompt_tokens = 0
    for slot, sl in enumerate(self._slots):
      if sl is None:
        continue
      prompt = sl.request.prompt
      if sl.prompt_read < len(prompt):
        n = min(s, len(prompt) - sl.prompt_read)
        tokens[slot, s - n:] = prompt[sl.prompt_read: sl.prompt_read + n]
        prompt_tokens += n
      else:
        n, use_prev[slot] = 1, True
      num_new[slot] = n
      growth[slot] = sl.length + n
    # Never raises PagePoolExhausted: admission set every running request's worst case aside.
    for pages in alloc.reserve_many(growth).values():
      self.pages_reused += len(self._ever_used.intersection(pages))
      self._ever_used.update(pages)
      self._table_changed |= bool(pages)
    self.peak_pages = max(self.peak_pages, alloc.num_used)

    self.caches, self._prev = self._compiled[s](*self._args(tokens, num_new, use_prev,
                                                            self._restart, self._prev))
    # A new array, not `[:] = False`: the transfer to the device may still be reading the old
    # one after the call returns (it does on the CPU, and the rows then restart at random).
    self._restart = np.zeros(b, bool)
    self.steps += 1
    self.chunk_steps += s > 1
    self.prompt_tokens_read += prompt_tokens

    counted, finished = [], []
    for slot, sl in enumerate(self._slots):
      if sl is None:
        continue
      request = sl.request
      sl.length += int(num_new[slot])
      if sl.prompt_read < len(request.prompt):
        sl.prompt_read += int(num_new[slot])
        if sl.prompt_read < len(request.prompt):
          continue  # this step's sample is not a token yet: the prompt is not read
      request.num_generated += 1
      counted.append((request, slot))
      if request.num_generated == request.max_new_tokens:
        request.status = DONE
        finished.append(request.id)
        self._release(slot)
    self.tokens_generated += len(counted)
    self.num_finished += len(finished)
    self._pending.append((self._prev, counted))
    if len(self._pending) >= 2 * self.output_lag:
      self._fetch(keep=self.output_lag)

    completed, self._completed = tuple(self._completed), []
    return StepResult(step=self.steps, width=s, generated=len(counted),
                      prompt_tokens=prompt_tokens, admitted=tuple(admitted),
                      finished=tuple(finished), completed=completed, pool_wait=pool_wait)

  def wait(self) -> None:
    """Blocks until the steps dispatched so far have run (to time them, or to read the device
    memory with no step's temporaries in it)."""
    jax.block_until_ready((self.caches, self._prev))

  def drain(self) -> list[Request]:
    """Fetches every output still on the device; returns the requests completed since the last
    step (done or cancelled) and lets go of them."""
    self._fetch(keep=0)
    completed, self._completed = self._completed, []
    return completed

  def run_until_done(self) -> list[Request]:
    """Steps until nothing waits or runs, printing a line every `log_every` steps; returns the
    requests completed meanwhile (their outputs complete)."""
    b, alloc = self.batch_size, self.allocator
    completed = []
    steps = done = 0
    t0 = time.perf_counter()
    while (result := self.step()) is not None:
      completed.extend(result.completed)
      steps += 1
      done += result.generated
      if steps % self.log_every == 0 or self.idle:
        self.wait()
        elapsed = time.perf_counter() - t0
        self.log(f"  step {steps:4d}  {'chunk ' if result.width > 1 else 'decode'}  "
                 f"running {self.num_running}/{b}  waiting {self.num_waiting:2d}  "
                 f"pages {alloc.num_used:3d}/{alloc.num_blocks}  generated {done:5d}  "
                 f"{done / elapsed:8.1f} tok/s")
    return completed + self.drain()

  def serve(self, requests: list[Request]) -> ServeStats:
    """Submits `requests` (all checked first), serves them until every one is done and fills
    their outputs; the loop's statistics."""
    for i, r in enumerate(requests):
      self.check_fits(r, f"request {i}")
    if not self._compiled:
      self.compile()
    before = (self.tokens_generated, self.steps, self.chunk_steps, self.pages_reused)
    t0 = time.perf_counter()
    for r in requests:
      self.submit(r)
    self.run_until_done()
    seconds = time.perf_counter() - t0
    return ServeStats(
        tokens=self.tokens_generated - before[0],
        prompt_tokens=sum(len(r.prompt) for r in requests), seconds=seconds,
        compile_seconds=self.compile_seconds, steps=self.steps - before[1],
        chunk_steps=self.chunk_steps - before[2], peak_pages=self.peak_pages,
        pages_reused=self.pages_reused - before[3])

  # ---- accounting -------------------------------------------------------------------------------

  def _release(self, slot: int) -> None:
    """Frees a slot's pages and its worst-case reservation; the next step resets its length."""
    request = self._slots[slot].request
    self._table_changed |= bool(self.allocator.free(slot))
    self._committed -= self.allocator.pages_for(request.max_cached_tokens)
    self._slots[slot] = None
    self._restart[slot] = True

  def _fetch(self, keep: int) -> None:
    """Copies the sampled tokens of all but the newest `keep` dispatched steps to the outputs."""
    n = len(self._pending) - keep
    if n <= 0:
      return
    batch = [self._pending.popleft() for _ in range(n)]
    for tokens, (_, counted) in zip(jax.device_get([t for t, _ in batch]), batch, strict=True):
      for request, slot in counted:
        request.output.append(int(tokens[slot]))
        if request.status in (DONE, CANCELLED):
          self._complete_if_fetched(request)

  def _complete_if_fetched(self, request: Request) -> None:
    if len(request.output) == request.num_generated:
      self._completed.append(request)
      del self._requests[request.id]

  def audit(self) -> list[str]:
    """The host-side invariants of the pool, checked; a description of each that fails.

    Pages held by the slots plus free pages make the pool, no page is held twice, each slot's
    pages are a prefix of its block-table row and exactly cover its cached tokens (none for an
    empty slot: a finished or cancelled request's pages are back), and the running requests'
    worst cases fit in the pool.
    """
    alloc, problems = self.allocator, []
    table = alloc.block_table
    held_mask = table != NO_PAGE
    held = table[held_mask]
    if held.size + alloc.num_free != alloc.num_blocks:
      problems.append(f"pages: {held.size} held + {alloc.num_free} free != pool of "
                      f"{alloc.num_blocks}")
    if held.size and (held.min() < 0 or held.max() >= alloc.num_blocks):
      problems.append(f"pages: ids outside [0, {alloc.num_blocks}) held")
    if np.unique(held).size != held.size:
      problems.append("pages: a page is held by two slots or twice by one")
    counts = held_mask.sum(axis=1)
    if not np.array_equal(held_mask, np.arange(table.shape[1])[None, :] < counts[:, None]):
      problems.append("pages: a slot's pages are not a prefix of its block-table row")
    lengths = self.slot_lengths()
    want = np.array([alloc.pages_for(n) if n >= 0 else 0 for n in lengths])
    if not np.array_equal(counts, want):
      bad = np.flatnonzero(counts != want).tolist()
      problems.append(f"pages: slots {bad} hold {counts[bad].tolist()} pages for "
                      f"{lengths[bad].tolist()} tokens (-1: no request)")
    committed = sum(alloc.pages_for(sl.request.max_cached_tokens) for sl in self._slots if sl)
    if committed != self._committed or committed > alloc.num_blocks:
      problems.append(f"admission: running requests' worst cases take {committed} pages, "
                      f"counted {self._committed}, pool {alloc.num_blocks}")
    return problems
