"""Hugging Face configs into `MLAConfig` and `DeepseekConfig`: the published configs of
DeepSeek-V2(-Lite), V3, R1, V3.1 and Kimi-K2 (tests/data/deepseek/configs) give the softmax
scale, YaRN cos/sin factor and frequencies that transformers computes for them
(expected_rope.json, written by tests/data/deepseek/make_golden.py)."""

import json
import math
import pathlib

import numpy as np
import pytest

nnx = pytest.importorskip("flax.nnx")

from jax_flashmla import rope  # noqa: E402
from jax_flashmla.layers import MLAConfig  # noqa: E402
from jax_flashmla.models import hf  # noqa: E402
from jax_flashmla.models.deepseek import DeepseekConfig  # noqa: E402

DATA = pathlib.Path(__file__).parent / "data" / "deepseek"
CONFIGS = sorted(p.stem for p in (DATA / "configs").glob("*.json"))
EXPECTED = json.loads((DATA / "expected_rope.json").read_text())["configs"]


def _published(name):
  return json.loads((DATA / "configs" / f"{name}.json").read_text())


def test_every_published_config_has_expected_values():
  assert set(CONFIGS) == set(EXPECTED) == {"deepseek-v2-lite", "deepseek-v2", "deepseek-v3",
                                            "deepseek-r1", "deepseek-v3.1", "kimi-k2"}


@pytest.mark.parametrize("name", CONFIGS)
def test_softmax_scale_and_yarn_are_transformers(name):
  config = MLAConfig.from_hf(DATA / "configs" / f"{name}.json")
  want = EXPECTED[name]
  assert math.isclose(config.softmax_scale, want["softmax_scale"], rel_tol=1e-12)
  assert math.isclose(rope.rope_attention_factor(config.rope_scaling), want["attention_factor"],
                      rel_tol=1e-12)
  # transformers computes the frequencies in float32; ours are float64.
  freqs = rope.rope_frequencies(config.qk_rope_head_dim, config.rope_theta, config.rope_scaling)
  np.testing.assert_allclose(freqs, want["inv_freq"], rtol=2e-6)


@pytest.mark.parametrize("name", CONFIGS)
def test_every_attention_field_is_read(name):
  c = _published(name)
  config = MLAConfig.from_hf(c)
  scaling = c["rope_scaling"]
  assert (config.hidden_size, config.num_heads, config.q_lora_rank, config.qk_nope_head_dim,
          config.v_head_dim, config.rope_theta, config.rms_norm_eps) == (
              c["hidden_size"], c["num_attention_heads"], c["q_lora_rank"],
              c["qk_nope_head_dim"], c["v_head_dim"], c["rope_theta"], c["rms_norm_eps"])
  assert config.rope_scaling == rope.YarnScaling(
      factor=scaling["factor"], original_max_position_embeddings=4096,
      beta_fast=scaling["beta_fast"], beta_slow=scaling["beta_slow"], mscale=scaling["mscale"],
      mscale_all_dim=scaling["mscale_all_dim"])
  assert config.rope_interleave


def test_v3_yarn_is_not_the_default_one():
  # MLAConfig's defaults are V2's (mscale 0.707): a V3 model built by hand with them gets a
  # softmax scale 15% too small (and YaRN's cos/sin are fine, so nothing looks wrong). from_hf
  # reads the published 1.0.
  v3 = MLAConfig.from_hf(_published("deepseek-v3"))
  assert v3.rope_scaling.mscale == v3.rope_scaling.mscale_all_dim == 1.0
  assert MLAConfig().rope_scaling.mscale_all_dim == 0.707
  assert v3.softmax_scale / MLAConfig(q_lora_rank=1536).softmax_scale > 1.17


@pytest.mark.parametrize("name, want", [
    ("deepseek-v2-lite", dict(num_layers=27, num_routed_experts=64, num_experts_per_tok=6,
                              num_shared_experts=2, first_k_dense_replace=1,
                              scoring_func="softmax", topk_method="greedy", n_group=1,
                              routed_scaling_factor=1.0, norm_topk_prob=False)),
    ("deepseek-v2", dict(num_layers=60, num_routed_experts=160, num_experts_per_tok=6,
                         scoring_func="softmax", topk_method="group_limited_greedy", n_group=8,
                         topk_group=3, routed_scaling_factor=16.0)),
    ("deepseek-v3", dict(num_layers=61, num_routed_experts=256, num_experts_per_tok=8,
                         num_shared_experts=1, first_k_dense_replace=3, scoring_func="sigmoid",
                         topk_method="noaux_tc", n_group=8, topk_group=4,
                         routed_scaling_factor=2.5, norm_topk_prob=True, vocab_size=129280)),
    ("kimi-k2", dict(num_layers=61, num_routed_experts=384, first_k_dense_replace=1,
                     scoring_func="sigmoid", topk_method="noaux_tc", n_group=1, topk_group=1,
                     routed_scaling_factor=2.827, vocab_size=163840)),
])
def test_decoder_config(name, want):
  config = DeepseekConfig.from_hf(DATA / "configs" / f"{name}.json")
  for key, value in want.items():
    assert getattr(config, key) == value, key
  assert not config.is_moe_layer(config.first_k_dense_replace - 1)
  assert config.is_moe_layer(config.first_k_dense_replace)


def test_transformers_5_spelling_reads_the_same():
  # transformers 5 saves `rope_parameters` (theta inside, `rope_type`) and drops V3's
  # scoring_func / topk_method; both spellings give one config.
  published = _published("deepseek-v3")
  saved = {k: v for k, v in published.items()
           if k not in ("rope_scaling", "rope_theta", "scoring_func", "topk_method")}
  rp = dict(published["rope_scaling"], rope_type="yarn", rope_theta=10000.0)
  saved["rope_parameters"] = rp
  assert MLAConfig.from_hf(saved) == MLAConfig.from_hf(published)
  assert DeepseekConfig.from_hf(saved) == DeepseekConfig.from_hf(published)
  # A config transformers 5 wrote (the tiny golden checkpoints).
  tiny = DeepseekConfig.from_hf(DATA / "tiny-v3")
  assert tiny.scoring_func == "sigmoid" and tiny.topk_method == "noaux_tc"
  assert tiny.attention.rope_scaling.factor == 4.0
  assert not MLAConfig.from_hf(DATA / "tiny-v3-fp8" / "config.json").rope_interleave


def test_sources_a_path_a_directory_a_dict_and_a_config_object(tmp_path):
  c = _published("deepseek-v2-lite")
  (tmp_path / "config.json").write_text(json.dumps(c))

  class TransformersLike:
    def to_dict(self):
      return c

  configs = {MLAConfig.from_hf(s) for s in (tmp_path, tmp_path / "config.json",
                                            str(tmp_path), c, TransformersLike())}
  assert len(configs) == 1


def test_missing_yarn_keys_take_deepseeks_defaults():
  c = dict(_published("deepseek-v2-lite"), rope_scaling={"type": "yarn", "factor": 40,
                                                         "original_max_position_embeddings": 4096})
  s = MLAConfig.from_hf(c).rope_scaling
  assert (s.beta_fast, s.beta_slow, s.mscale, s.mscale_all_dim) == (32.0, 1.0, 1.0, 0.0)
  # No mscale_all_dim: the softmax keeps 192 ** -0.5, cos/sin take mscale(40, 1).
  assert MLAConfig.from_hf(c).softmax_scale == 192**-0.5
  assert math.isclose(rope.rope_attention_factor(s), 0.1 * math.log(40) + 1)
  # No factor: max_position_embeddings / original.
  c["rope_scaling"] = {"type": "yarn", "original_max_position_embeddings": 4096}
  assert MLAConfig.from_hf(c).rope_scaling.factor == 40.0
  c.pop("rope_scaling")
  assert MLAConfig.from_hf(c).rope_scaling is None


@pytest.mark.parametrize("change, message", [
    (dict(attention_bias=True), "attention_bias false"),
    (dict(kv_lora_rank=256), "kv_lora_rank, qk_rope_head_dim: expected 512, 64"),
    (dict(rope_scaling={"type": "linear", "factor": 2.0}), "'yarn'.*got 'linear'"),
    (dict(rope_scaling={"type": "yarn", "factor": 4.0, "truncate": False}), "truncate"),
    (dict(qk_nope_head_dim=None), r"expected the keys \['qk_nope_head_dim'\]"),
])
def test_mla_config_errors(change, message):
  with pytest.raises(ValueError, match=message):
    MLAConfig.from_hf(dict(_published("deepseek-v3"), **change))


@pytest.mark.parametrize("change, message", [
    (dict(hidden_act="gelu"), "hidden_act 'silu'"),
    (dict(mlp_bias=True), "mlp_bias false"),
    (dict(scoring_func="softplus"), "scoring_func: expected one of"),
    (dict(n_group=7), "n_group: expected a divisor of num_routed_experts=256"),
    (dict(topk_group=9), r"topk_group: expected 1..8"),
    (dict(num_experts_per_tok=300), r"num_experts_per_tok: expected 1..256"),
])
def test_decoder_config_errors(change, message):
  with pytest.raises(ValueError, match=message):
    DeepseekConfig.from_hf(dict(_published("deepseek-v3"), **change))


def test_config_source_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="config: expected a config.json"):
    hf.read_hf_config(tmp_path)
  with pytest.raises(TypeError, match="config: expected a path, a dict or a transformers config"):
    hf.read_hf_config(42)
