"""A draft vocabulary (decode.with_draft_vocab): drafts choose among N token ids only; verification keeps
the full vocabulary, so greedy output and the sampling law are unchanged."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from mtp_jax import decode, errors, workdir

from helpers import MIXED, ROOT, bytes_workdir, chi2_pvalue, check_same, decode_run, exact_joint, tiny_decoder


@pytest.mark.parametrize("head_type", ["parallel", "sequential"])
def test_greedy_output_is_unchanged_and_a_full_vocabulary_drafts_the_same(head_type):
  model, params = tiny_decoder(n=3, head_type=head_type, shared=head_type == "parallel")
  v = model.args.vocab_size
  g = decode_run(model, params, MIXED, "greedy")
  full = decode_run(model, params, MIXED, "speculative", draft="chain")
  # Every token, listed in another order: the same drafts, so the same acceptance.
  perm = decode_run(model, decode.with_draft_vocab(params, np.random.default_rng(0).permutation(v), v), MIXED,
                    "speculative", draft="chain")
  check_same(g, perm, 24)
  np.testing.assert_array_equal(perm.accepted, full.accepted)
  # The most frequent half of greedy's own tokens: still greedy's output, drafts only among them.
  common = np.argsort(-np.bincount(g.tokens[g.tokens >= 0], minlength=v), kind="stable")[:v // 2]
  half = decode_run(model, decode.with_draft_vocab(params, common, v), MIXED, "speculative", draft="chain")
  check_same(g, half, 24)


def test_speculative_sampling_stays_exact_with_a_draft_vocabulary():
  v, rows, prompt = 8, 16384, [1, 2]
  model, params = tiny_decoder(n=3, vocab=v)
  exact, _ = exact_joint(model, params, prompt, 1.0, 0, 1.0)
  ids = np.array([0, 2, 3, 5, 6], np.int32)   # drafts never propose 1, 4 or 7
  out = decode_run(model, decode.with_draft_vocab(params, ids, v), [prompt] * rows, "speculative_sample",
                   max_new_tokens=3, bucket=2, seed=3, draft="chain")
  outcome = (out.tokens[:, 0] * v + out.tokens[:, 1]) * v + out.tokens[:, 2]
  assert chi2_pvalue(outcome, exact) > 1e-4
  acc = out.accepted.sum(0) / (out.forwards - 1).sum()
  assert np.all((acc > 0.05) & (acc < 0.95)), acc


def test_bad_draft_vocabularies_are_refused():
  model, params = tiny_decoder(n=2)
  v = model.args.vocab_size
  for ids, match in (([], "non-empty"), ([[1, 2]], "non-empty"), ([0.5], "non-empty"), ([1, 1], "distinct"),
                     ([v], "distinct"), ([-1], "distinct")):
    with pytest.raises(decode.DecodeError, match=match):
      decode.with_draft_vocab(params, np.array(ids), v)


def test_a_workdirs_ranking_is_read_within_its_length(tmp_path):
  np.save(tmp_path / "draft_vocab.npy", np.arange(10, dtype=np.int32))
  assert list(workdir.read_draft_vocab(tmp_path, 4)) == [0, 1, 2, 3]
  with pytest.raises(errors.UserError, match=r"--draft_vocab=11: .* ranks 10 tokens; use --draft_vocab<=10"):
    workdir.read_draft_vocab(tmp_path, 11)
  np.save(tmp_path / "draft_vocab.npy", np.zeros((2, 5), np.int32))
  with pytest.raises(errors.UserError, match=r"shape \(2, 5\)"):
    workdir.read_draft_vocab(tmp_path, 4)


def _generate(*args):
  return subprocess.run([sys.executable, "-m", "mtp_jax.generate", *args], cwd=ROOT, capture_output=True, text=True,
                        env={**os.environ, "JAX_PLATFORMS": "cpu"})


def test_generate_cli_reads_the_workdirs_ranking(tmp_path):
  w = tmp_path / "run"
  bytes_workdir(w, vocab_size=258, n_future=3)
  common = [f"--workdir={w}", "--prompt=def f(x):", "--max_new_tokens=8"]
  proc = _generate(*common, "--mode=speculative", "--draft_vocab=64")
  assert proc.returncode == 2 and "draft_vocab.npy" in proc.stderr and "Traceback" not in proc.stderr
  np.save(w / "draft_vocab.npy", np.random.default_rng(0).permutation(258).astype(np.int32))
  outs = []
  for extra in (["--mode=greedy"], ["--mode=speculative", "--draft_vocab=64"]):
    proc = _generate(*common, *extra, f"--output={tmp_path / 'out.jsonl'}")
    assert proc.returncode == 0, proc.stderr
    outs.append(json.loads((tmp_path / "out.jsonl").read_text())["tokens"])
  assert outs[0] == outs[1]
  proc = _generate(*common, "--mode=speculative", "--draft_vocab=0")
  assert proc.returncode == 2 and "--draft_vocab=0" in proc.stderr
