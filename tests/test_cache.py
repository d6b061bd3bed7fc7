"""PagedKVCache: layout, writes (ragged, across pages, dropped rows), donation in place, and
mla_decode over a cache filled by writes against the float64 oracle."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_flashmla
from jax_flashmla.cache import NO_PAGE, PagedKVCache, mla_decode
from hlo_aliasing import aliased_parameters, parameters_named
from mla_cases import Case, check_decode, oracle


def _numbered(cache: PagedKVCache) -> PagedKVCache:
  """Pages filled with distinct values, to see exactly which rows a write touched."""
  n = np.prod(cache.pages.shape[:3])
  values = np.broadcast_to((np.arange(n) % 251 - 125)[:, None], (n, cache.head_dim))
  return cache.replace(pages=jnp.asarray(values.reshape(cache.pages.shape), cache.pages.dtype))


def _expected_after_write(cache, kv, num_new):
  """numpy model of `write`: row j of sequence i goes to position len + j - (s - num_new), until
  the first row that cannot land (past the table, or no page); its length counts stored rows."""
  pages = np.array(cache.pages, np.float32)
  table, lens = np.asarray(cache.block_table), np.array(cache.lengths)
  s = kv.shape[1]
  for i in range(kv.shape[0]):
    start = lens[i]
    for j in range(s - num_new[i], s):
      pos = start + j - (s - num_new[i])
      page = table[i, pos // 64] if pos // 64 < table.shape[1] else -1
      if not 0 <= page < pages.shape[0]:
        break
      pages[page, pos % 64] = kv[i, j]
      lens[i] += 1
  return pages, lens


def test_create_lays_out_pages_per_sequence_or_as_a_pool():
  c = PagedKVCache.create(3, 130)
  assert c.pages.shape == (9, 64, 1, 576) and c.pages.dtype == jnp.bfloat16
  np.testing.assert_array_equal(c.block_table, np.arange(9).reshape(3, 3))
  assert (c.batch_size, c.max_blocks_per_seq, c.max_seq_len, c.num_blocks) == (3, 3, 192, 9)
  np.testing.assert_array_equal(c.lengths, [0, 0, 0])
  pool = PagedKVCache.create(3, 130, num_blocks=5, dtype=jnp.float32)
  assert pool.pages.shape == (5, 64, 1, 576)
  assert (np.asarray(pool.block_table) == NO_PAGE).all()
  leaves, treedef = jax.tree.flatten(pool)
  assert len(leaves) == 3
  assert jax.tree.unflatten(treedef, leaves).num_blocks == 5


def test_write_ragged_rows_across_pages():
  rng = np.random.default_rng(0)
  cache = _numbered(PagedKVCache.create(3, 200, num_blocks=12, dtype=jnp.float32))
  table = rng.permutation(12)[:12].reshape(3, 4).astype(np.int32)
  cache = cache.replace(block_table=jnp.asarray(table),
                        lengths=jnp.asarray([60, 0, 130], jnp.int32))
  kv = rng.standard_normal((3, 9, 1, 576)).astype(np.float32)
  num_new = np.array([9, 4, 0], np.int32)  # row 0 crosses into its second page; row 2 idle
  want_pages, want_lens = _expected_after_write(cache, kv, num_new)
  got = jax.jit(PagedKVCache.write)(cache, jnp.asarray(kv), jnp.asarray(num_new))
  np.testing.assert_array_equal(got.pages, want_pages)
  np.testing.assert_array_equal(got.lengths, want_lens)
  np.testing.assert_array_equal(got.block_table, table)
  # Row 1 took the *last* 4 rows of its (left-padded) block.
  np.testing.assert_array_equal(got.pages[table[1, 0], :4], kv[1, 5:])


def test_write_defaults_to_all_rows_and_casts():
  cache = PagedKVCache.create(2, 64)
  kv = jnp.ones((2, 3, 1, 576), jnp.float32)
  got = cache.write(kv)
  np.testing.assert_array_equal(got.lengths, [3, 3])
  assert got.pages.dtype == jnp.bfloat16 and float(got.pages[1, 2, 0, 0]) == 1.0


@pytest.mark.parametrize("bad", ["no_page", "negative", "huge", "past_table"])
def test_rows_that_cannot_land_are_dropped_and_touch_nothing(bad):
  cache = _numbered(PagedKVCache.create(2, 128, num_blocks=5, dtype=jnp.float32))
  table = np.array([[3, 1], [0, 2]], np.int32)
  lens = np.array([64, 10], np.int32)
  if bad == "past_table":
    lens[0] = 127  # two rows fit, the third is past max_seq_len
  else:
    table[0, 1] = {"no_page": NO_PAGE, "negative": -5, "huge": 2**31 - 1}[bad]
  cache = cache.replace(block_table=jnp.asarray(table), lengths=jnp.asarray(lens))
  kv = np.full((2, 3, 1, 576), 7.0, np.float32)
  got = jax.jit(PagedKVCache.write)(cache, jnp.asarray(kv))
  want_pages, want_lens = _expected_after_write(cache, kv, np.array([3, 3]))
  np.testing.assert_array_equal(got.pages, want_pages)
  np.testing.assert_array_equal(got.lengths, want_lens)
  # Row 0 stops at its page boundary (64) or at max_seq_len (128): lengths count stored rows.
  np.testing.assert_array_equal(got.lengths, [128 if bad == "past_table" else 64, 13])
  landed = (np.asarray(got.pages) != np.asarray(cache.pages)).any(axis=(2, 3)).sum()
  assert landed == 3 + (bad == "past_table")  # row 1's three, and row 0's one that fits


def test_a_write_past_max_seq_len_stores_what_fits():
  """The issue's case: 70 rows into a 64-token cache store 64, and lengths say 64, not 70."""
  cache = PagedKVCache.create(2, 64, dtype=jnp.float32)
  kv = jnp.arange(2 * 70, dtype=jnp.float32).reshape(2, 70, 1, 1) * jnp.ones((1, 1, 1, 576))
  got = jax.jit(PagedKVCache.write)(cache, kv, jnp.asarray([70, 5], jnp.int32))
  np.testing.assert_array_equal(got.lengths, [64, 5])
  np.testing.assert_array_equal(got.pages[0, :, 0, 0], np.arange(64))
  # The decode then sees exactly the stored rows.
  again = jax.jit(PagedKVCache.write)(got, kv[:, :1])
  np.testing.assert_array_equal(again.lengths, [64, 6])


def test_rows_after_a_missing_page_are_not_stored():
  """No holes: a sequence whose next page is missing stops at the page boundary even where a
  later page is assigned."""
  cache = _numbered(PagedKVCache.create(1, 256, num_blocks=4, dtype=jnp.float32))
  cache = cache.replace(block_table=jnp.asarray([[2, NO_PAGE, 0, 1]], jnp.int32),
                        lengths=jnp.asarray([60], jnp.int32))
  kv = jnp.full((1, 80, 1, 576), 7.0, jnp.float32)   # positions 60..139 would reach page 0
  got = jax.jit(PagedKVCache.write)(cache, kv)
  np.testing.assert_array_equal(got.lengths, [64])
  pages, before = np.asarray(got.pages), np.asarray(cache.pages)
  np.testing.assert_array_equal(pages[[0, 1, 3]], before[[0, 1, 3]])
  np.testing.assert_array_equal(pages[2, 60:], 7.0)


def test_reset_restarts_rows():
  cache = PagedKVCache.create(3, 64).replace(lengths=jnp.asarray([5, 6, 7], jnp.int32))
  np.testing.assert_array_equal(cache.reset(jnp.asarray([False, True, False])).lengths, [5, 0, 7])


def test_write_argument_errors():
  cache = PagedKVCache.create(2, 64)
  with pytest.raises(ValueError, match=r"kv: expected shape \[b=2, s_new, h_kv=1, head_dim=576\]"):
    cache.write(jnp.zeros((2, 3, 576), jnp.bfloat16))
  with pytest.raises(ValueError, match=r"num_new: expected an integer array of shape \(2,\)"):
    cache.write(jnp.zeros((2, 3, 1, 576), jnp.bfloat16), jnp.zeros((3,), jnp.int32))
  with pytest.raises(TypeError, match=r"^kv: expected a jax.Array or numpy array, got list; "
                                      r"wrap it with jnp.asarray$"):
    cache.write(np.zeros((2, 3, 1, 576)).tolist())
  with pytest.raises(TypeError, match=r"^num_new: expected a jax.Array or numpy array, got list"):
    cache.write(jnp.zeros((2, 3, 1, 576), jnp.bfloat16), [1, 2])
  with pytest.raises(TypeError, match="cache: expected a PagedKVCache"):
    mla_decode(jnp.zeros((2, 1, 16, 576), jnp.bfloat16), cache.pages)


# ------------------------------------------------------------------------------------------------
# Donation: the write updates the pages in place
# ------------------------------------------------------------------------------------------------

def _compiled_write(dtype, num_blocks=256):
  cache = PagedKVCache.create(4, 1024, num_blocks=num_blocks, dtype=dtype)
  cache = cache.replace(block_table=jnp.arange(4 * 16, dtype=jnp.int32).reshape(4, 16))
  kv = jnp.ones((4, 2, 1, 576), dtype)
  write = jax.jit(PagedKVCache.write, donate_argnums=0)
  return cache, kv, write, write.lower(cache, kv).compile()


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_donated_write_aliases_the_pages_buffer(dtype):
  cache, kv, write, compiled = _compiled_write(dtype)
  text = compiled.as_text()
  (pages_param,) = parameters_named(text, "pages")
  assert aliased_parameters(text).get(pages_param) == 0, text.splitlines()[0]  # output 0: pages
  stats = compiled.memory_analysis()
  assert stats.alias_size_in_bytes >= cache.pages.nbytes
  if dtype == jnp.float32:
    # Nothing pages-sized is allocated besides the aliased buffer. (XLA:CPU widens bf16
    # scatters through a float32 temporary; the GPU tier checks bf16 below.)
    assert stats.temp_size_in_bytes < cache.pages.nbytes // 16, stats

  before = cache.pages.unsafe_buffer_pointer()
  out = write(cache, kv)
  assert cache.pages.is_deleted()
  assert out.pages.unsafe_buffer_pointer() == before  # the same memory, updated in place
  np.testing.assert_array_equal(out.lengths, [2, 2, 2, 2])


@pytest.mark.gpu
def test_donated_bf16_write_needs_no_pages_sized_temporary_on_gpu():
  cache, _, _, compiled = _compiled_write(jnp.bfloat16, num_blocks=4096)
  stats = compiled.memory_analysis()
  text = compiled.as_text()
  (pages_param,) = parameters_named(text, "pages")
  assert aliased_parameters(text).get(pages_param) == 0
  assert stats.temp_size_in_bytes < cache.pages.nbytes // 16, stats


# ------------------------------------------------------------------------------------------------
# mla_decode over a cache filled by writes
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("implementation", [None, pytest.param("cuda", marks=pytest.mark.gpu)])
def test_mla_decode_over_written_cache_matches_oracle(implementation):
  rng = np.random.default_rng(5)
  b, h_q, s_q = 3, 16, 2
  cache = PagedKVCache.create(b, 300, num_blocks=16)
  table = rng.permutation(16)[:15].reshape(b, 5).astype(np.int32)
  cache = cache.replace(block_table=jnp.asarray(table),
                        pages=jnp.full(cache.pages.shape, jnp.nan, jnp.bfloat16))
  write = jax.jit(PagedKVCache.write, donate_argnums=0)
  target = np.array([70, 0, 200])
  for chunk in (50, 50, 50, 50, 50):  # ragged steps of up to `chunk` rows
    n = np.minimum(chunk, target - np.asarray(cache.lengths)).astype(np.int32)
    kv = np.clip(rng.standard_normal((b, chunk, 1, 576)) / 10, -1, 1)
    cache = write(cache, jnp.asarray(kv, jnp.bfloat16), jnp.asarray(n))
  np.testing.assert_array_equal(cache.lengths, target)

  q = jnp.asarray(np.clip(rng.standard_normal((b, s_q, h_q, 576)) / 10, -1, 1), jnp.bfloat16)
  scale = 192**-0.5 * 1.3
  md = jax_flashmla.get_mla_metadata(cache.lengths, s_q * h_q, 1, implementation=implementation)
  out, lse = jax.jit(lambda q, c: mla_decode(q, c, md, softmax_scale=scale,
                                             implementation=implementation))(q, cache)
  case = Case(np.asarray(q), np.asarray(cache.pages), table, target.astype(np.int32),
              causal=True, softmax_scale=scale)
  check_decode(out, lse, *oracle(case))
