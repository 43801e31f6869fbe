"""Heads trained on cached trunk features (mtp_jax/feature_heads.py), for every head topology it serves:
the loss on features equals the model's own forward, acceptance equals the forward's argmaxes, training
moves the added heads only, and bad arguments are refused."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtp_jax import feature_heads as fh
from mtp_jax.errors import UserError
from mtp_jax.model import build_model, init_params

from helpers import tiny_config
from tolerances import assert_close, network_k

TYPES = ["parallel", "causal", "sequential"]
N, T = 3, 16


def _setup(head_type, seed=0):
  config = tiny_config(n_future=N, head_type=head_type)
  model = build_model(config.model)
  params = init_params(model, jax.random.key(seed))
  tokens = np.random.default_rng(seed).integers(0, config.model.vocab_size, (8, T)).astype(np.int32)
  first, greedy = fh.trunk_features(model, params, jnp.asarray(tokens))
  feats = fh.Features(np.asarray(first), np.asarray(greedy), tokens)   # float32: exact against the forward
  return config, model, params, feats


def _split(params):
  added = {f"heads_{i}": params[f"heads_{i}"] for i in range(1, N)}
  return added, {k: v for k, v in params.items() if k not in added}


def _forward(model, params, tokens):
  """Every head's logits [n, B, T, V] of the model's own forward (sequential modules read the tokens ahead)."""
  return model.apply({"params": params}, jnp.asarray(tokens), lookahead=jnp.zeros((len(tokens), N - 1), jnp.int32))[0]


@pytest.mark.parametrize("head_type", TYPES)
def test_loss_on_features_equals_the_forward(head_type):
  config, model, params, feats = _setup(head_type)
  logits = _forward(model, params, feats.tokens)
  want = []
  for i in range(1, N):   # data targets: head i (0-based) predicts x_{t+i+1}
    lg, tg = logits[i][:, :T - i - 1], feats.tokens[:, i + 1:]
    want.append(jnp.mean(jax.nn.logsumexp(lg, -1) - jnp.take_along_axis(lg, tg[..., None], -1)[..., 0]))
  added, frozen = _split(params)
  loss = fh.make_loss(model, "data")
  got, metrics = loss(added, frozen, feats.z, feats.greedy, feats.tokens)
  k = network_k(config, len(feats.tokens))
  assert_close(metrics["head_losses"], np.array(want), k)
  # Every position picked is the same loss; a subset is the mean over those positions.
  all_picks = np.tile(np.arange(T, dtype=np.int32), (len(feats.tokens), 1))
  assert_close(loss(added, frozen, feats.z, feats.greedy, feats.tokens, all_picks)[0], got, k)
  picks = all_picks[:, ::3]
  lg, tg = logits[1], np.roll(feats.tokens, -2, axis=1)
  nll = jax.nn.logsumexp(lg, -1) - jnp.take_along_axis(lg, tg[..., None], -1)[..., 0]
  keep = picks < T - 2
  rows = np.arange(len(picks))[:, None]
  want_1 = np.sum(np.where(keep, np.asarray(nll)[rows, picks], 0)) / np.sum(keep)
  assert_close(loss(added, frozen, feats.z, feats.greedy, feats.tokens, picks)[1]["head_losses"][0], want_1, k)


@pytest.mark.parametrize("head_type", TYPES)
def test_acceptance_is_the_forwards_argmax_against_greedy(head_type):
  _, model, params, feats = _setup(head_type)
  logits = np.asarray(_forward(model, params, feats.tokens))
  greedy = logits[0].argmax(-1)
  common = T - (N - 1)
  hits = np.stack([logits[i].argmax(-1)[:, :common] == greedy[:, i:i + common] for i in range(1, N)])
  got = fh.head_acceptance(model, params, feats, batch=4)
  assert got["positions"] == len(feats.tokens) * common
  np.testing.assert_allclose(got["accuracy"], hits.mean(axis=(1, 2)))
  chain = np.cumprod(hits, axis=0)
  assert got["expected_tokens_per_forward"] == pytest.approx(1 + chain.sum() / got["positions"])
  assert got["chain_acceptance"][1] == pytest.approx(chain[1].sum() / max(chain[0].sum(), 1))


@pytest.mark.parametrize("head_type", ["parallel", "sequential"])
def test_training_moves_only_the_added_heads_and_learns(head_type):
  _, model, params, feats = _setup(head_type)
  before = fh.head_acceptance(model, params, feats, batch=4)
  trained, log = fh.train_heads(model, params, feats, steps=40, batch=4, lr=3e-3, warmup=5, ce_positions=8,
                                log=None, log_every=10)
  for key in params:
    same = jax.tree.all(jax.tree.map(np.array_equal, trained[key], params[key]))
    assert same == (key not in ("heads_1", "heads_2")), key
  assert log[-1]["loss"] < log[0]["loss"]
  after = fh.head_acceptance(model, trained, feats, batch=4)
  assert after["expected_tokens_per_forward"] > before["expected_tokens_per_forward"]


def test_bad_arguments_are_refused():
  config, model, params, feats = _setup("parallel")
  with pytest.raises(UserError, match="batch=9"):
    fh.train_heads(model, params, feats, steps=1, batch=9, log=None)
  with pytest.raises(UserError, match="ce_positions=17"):
    fh.train_heads(model, params, feats, steps=1, batch=2, ce_positions=17, log=None)
  with pytest.raises(UserError, match="target='corpus'"):
    fh.make_loss(model, "corpus")(*_split(params), feats.z, feats.greedy, feats.tokens)
  one = build_model(tiny_config(n_future=1).model)
  with pytest.raises(UserError, match="--n_future >= 2"):
    fh.train_heads(one, init_params(one, jax.random.key(0)), feats, steps=1, batch=2, log=None)
  with pytest.raises(UserError, match="fewer than seq_len=64"):
    fh.windows_of([[1, 2, 3]], 64, eos_id=0)


def test_draft_vocab_ranking_is_greedy_frequency_then_id():
  greedy = np.array([[5, 3, 5], [3, 5, 9]])
  ranking = fh.draft_vocab_ranking(greedy, 10)
  assert ranking.tolist()[:3] == [5, 3, 9] and sorted(ranking.tolist()) == list(range(10))
  assert ranking.tolist()[3:] == [0, 1, 2, 4, 6, 7, 8]


def test_draft_vocab_loss_and_acceptance_are_the_full_softmax_restricted_to_it():
  config, model, params, feats = _setup("parallel")
  vocab = np.random.default_rng(1).permutation(config.model.vocab_size)[:config.model.vocab_size // 2].astype(np.int32)
  logits = np.asarray(_forward(model, params, feats.tokens))[:, :, :, vocab]   # [n, B, T, N]
  index = np.full(config.model.vocab_size, -1)
  index[vocab] = np.arange(len(vocab))
  want = []
  for i in range(1, N):   # model targets: head 1's argmax i positions ahead, where the vocabulary holds it
    tg = index[np.roll(feats.greedy, -i, axis=1)]
    keep = (tg >= 0) & (np.arange(T)[None, :] < T - i)
    lg = logits[i]
    nll = jax.nn.logsumexp(lg, -1) - np.take_along_axis(lg, np.maximum(tg, 0)[..., None], -1)[..., 0]
    want.append(np.sum(np.where(keep, nll, 0)) / keep.sum())
  added, frozen = _split(params)
  got = fh.make_loss(model, "model", jnp.asarray(vocab))(added, frozen, feats.z, feats.greedy, feats.tokens)[1]
  assert_close(got["head_losses"], np.array(want), network_k(config, len(feats.tokens)))
  common = T - (N - 1)
  greedy = np.asarray(_forward(model, params, feats.tokens))[0].argmax(-1)
  hits = np.stack([vocab[logits[i].argmax(-1)][:, :common] == greedy[:, i:i + common] for i in range(1, N)])
  acc = fh.head_acceptance(model, params, feats, batch=4, vocab=vocab)
  np.testing.assert_allclose(acc["accuracy"], hits.mean(axis=(1, 2)))


def test_greedy_path_keeps_the_positions_where_the_text_is_greedys_own():
  rng = np.random.default_rng(0)
  greedy = rng.integers(0, 3, (4, 12)).astype(np.int32)
  tokens = rng.integers(0, 3, (4, 12)).astype(np.int32)
  for i in (1, 2, 3):
    want = np.zeros_like(tokens, bool)
    for b in range(4):
      for t in range(12 - i):
        want[b, t] = all(tokens[b, t + j] == greedy[b, t + j - 1] for j in range(1, i + 1))
    np.testing.assert_array_equal(fh.on_greedy_path(jnp.asarray(greedy), jnp.asarray(tokens), i), want)
    targets, mask = fh.head_targets(jnp.asarray(greedy), jnp.asarray(tokens), i, "greedy_path")
    np.testing.assert_array_equal(mask, want)
    np.testing.assert_array_equal(np.asarray(targets)[want], np.roll(greedy, -i, axis=1)[want])
  _, model, params, feats = _setup("parallel")
  acc = fh.head_acceptance(model, params, feats, batch=4)
  assert acc["greedy_path_positions"][0] >= acc["greedy_path_positions"][1]
