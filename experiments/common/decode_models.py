"""Models the decoding benchmarks decode with, beside a trained workdir's."""


def tiny_drafting_model():
  """(params, config) of the tiny recipe at 48 tokens, 5 layers and 4 heads, randomly initialised, heads 1-3
  copies of head 0: random heads seldom agree with head 0, copies draft often enough to run every path."""
  import jax
  from mtp_jax.config import load as load_recipe
  from mtp_jax.model import build_model, init_params
  config = load_recipe("tiny")
  config.model.update(dict(vocab_size=48, n_layers=5, n_future=4))
  params = jax.jit(lambda k: init_params(build_model(config.model), k))(jax.random.key(0))
  return {**params, **{f"heads_{i}": params["heads_0"] for i in range(1, 4)}}, config


def with_workdir_draft_vocab(params, vocab_size: int, workdir: str, n: int):
  """params drafting among the n most frequent tokens the workdir ranks (draft_vocab.npy); UserError where the
  workdir has no such ranking or n is out of range."""
  from mtp_jax import decode, workdir as workdir_lib
  return decode.with_draft_vocab(params, workdir_lib.read_draft_vocab(workdir, n), vocab_size)
