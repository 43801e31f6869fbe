"""Pretrained models in and out, against references made by transformers (tests/fixtures/make_hf_fixtures.py).

Import gives transformers' logits (float32, max abs diff <= 1e-4) and greedy tokens for GQA, tied and
untied embeddings, llama3 rope scaling, 4.x and 5.x config.json, f32 / f16 / bf16 and sharded weights;
a Meta MTP layout gives every head's reference logits; export then import is bit-exact; bad input is
one `error:` line with nothing written.
"""
import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtp_jax import interop
from mtp_jax.generate import generate
from mtp_jax.errors import UserError
from mtp_jax.interop.tensors import ConvertError
from mtp_jax.model import build_model

from helpers import FIXTURES, ROOT
HF = ["hf_gqa_untied", "hf_tied_sp", "hf_llama3_sharded"]
TORCHVENV = "/work/torchvenv/bin/python"


def fixture(name):
  return os.path.join(FIXTURES, name)


def logits_of(config, params, tokens):
  model = build_model(config.model)
  return np.asarray(jax.jit(lambda p, t: model.apply({"params": p}, t)[0])(params, jnp.asarray(tokens, jnp.int32)))


def greedy_of(config, params, prompt, n):
  [r] = generate(params, config, [prompt], mode="greedy", max_new_tokens=n, eos_id=-1)
  return r["tokens"]


def assert_same_greedy_up_to_ties(config, params, prompt, want):
  """Our greedy tokens are the reference's, except where two logits tie within float32 noise (1e-4, the
  logits tolerance): another CPU's rounding may then pick the other token and the paths part there."""
  got = greedy_of(config, params, prompt, len(want))
  if got == want:
    return
  assert len(got) == len(want), (got, want)
  i = next(j for j, (a, b) in enumerate(zip(got, want)) if a != b)
  row = logits_of(config, params, [list(prompt) + want[:i]])[0, 0, -1]
  assert row[got[i]] >= row.max() - 1e-4 and row[want[i]] >= row.max() - 1e-4, (
      f"greedy parts from the reference at step {i} ({got[i]} vs {want[i]}) where the logits do not tie: "
      f"{row[got[i]]:.6f} vs {row[want[i]]:.6f}, max {row.max():.6f}")


@pytest.mark.parametrize("name", HF + ["meta_mtp"])
def test_import_matches_reference_logits_and_greedy(name):
  config, params, tok = interop.read_checkpoint(fixture(name))
  ref = np.load(os.path.join(fixture(name), "reference.npz"))
  got = logits_of(config, params, ref["tokens"])
  assert got.shape == ref["logits"].shape      # meta_mtp: all three heads
  assert np.max(np.abs(got - ref["logits"])) <= 1e-4
  g = json.load(open(os.path.join(fixture(name), "greedy.json")))
  assert_same_greedy_up_to_ties(config, params, g["prompt"], g["greedy"])
  assert tok.vocab_size == config.model.vocab_size


def test_fixtures_cover_what_they_claim():
  c = json.load(open(os.path.join(fixture("hf_gqa_untied"), "config.json")))
  assert "rope_theta" in c and "torch_dtype" in c and "rope_parameters" not in c      # 4.x field names
  c = json.load(open(os.path.join(fixture("hf_llama3_sharded"), "config.json")))
  assert c["rope_parameters"]["rope_type"] == "llama3" and c["dtype"] == "bfloat16"  # 5.x field names
  assert os.path.exists(os.path.join(fixture("hf_llama3_sharded"), "model.safetensors.index.json"))
  config, _, _ = interop.read_checkpoint(fixture("hf_tied_sp"))
  assert config.model.tie_embeddings and config.model.n_kv_heads < config.model.n_heads
  # the llama3 scaling changes these logits: without it they are far from transformers'
  config, params, _ = interop.read_checkpoint(fixture("hf_llama3_sharded"))
  ref = np.load(os.path.join(fixture("hf_llama3_sharded"), "reference.npz"))
  config.model.rope_scaling.type = "none"
  assert np.max(np.abs(logits_of(config, params, ref["tokens"]) - ref["logits"])) > 1e-2


def test_added_heads_copy_and_random():
  base, p1, _ = interop.read_checkpoint(fixture("hf_gqa_untied"))
  config, p3, _ = interop.read_checkpoint(fixture("hf_gqa_untied"), n_future=3, head_init="copy")
  assert config.model.n_future == 3 and config.model.n_layers == base.model.n_layers + 2
  assert jax.tree.all(jax.tree.map(np.array_equal, p3["heads_2"], p1["heads_0"]))
  ref = np.load(os.path.join(fixture("hf_gqa_untied"), "reference.npz"))
  assert np.max(np.abs(logits_of(config, p3, ref["tokens"])[0] - ref["logits"][0])) <= 1e-4   # head 1 unchanged
  _, pr, _ = interop.read_checkpoint(fixture("hf_gqa_untied"), n_future=3, head_init="random")
  assert not np.array_equal(pr["heads_1"]["attn"]["q"]["kernel"], p1["heads_0"]["attn"]["q"]["kernel"])
  assert jax.tree.all(jax.tree.map(np.array_equal, pr["trunk"], p1["trunk"]))


def test_added_sequential_modules_wrap_head_1():
  """--head_type=sequential: each added head is a DeepSeek-V3 module around a copy of head 1 whose eh_proj
  passes the hidden state through; head 1's logits stay the checkpoint's; a checkpoint's own
  (parallel) extra heads and an unknown topology are refused by name."""
  _, p1, _ = interop.read_checkpoint(fixture("hf_gqa_untied"))
  config, ps, _ = interop.read_checkpoint(fixture("hf_gqa_untied"), n_future=3, head_type="sequential")
  assert config.model.head_type == "sequential"
  m = ps["heads_2"]
  assert jax.tree.all(jax.tree.map(np.array_equal, m["layer"], p1["heads_0"]))
  d = config.model.d_model
  np.testing.assert_array_equal(m["eh_proj"]["kernel"], np.concatenate([np.zeros((d, d)), np.eye(d)]))
  np.testing.assert_array_equal(m["shared_head"]["norm"]["scale"], p1["final_norm"]["scale"])
  ref = np.load(os.path.join(fixture("hf_gqa_untied"), "reference.npz"))
  assert np.max(np.abs(logits_of(config, ps, ref["tokens"])[0] - ref["logits"][0])) <= 1e-4
  _, pr, _ = interop.read_checkpoint(fixture("hf_gqa_untied"), n_future=3, head_type="sequential", head_init="random")
  assert not np.array_equal(pr["heads_1"]["layer"]["attn"]["q"]["kernel"],
                            p1["heads_0"]["attn"]["q"]["kernel"])
  with pytest.raises(ConvertError, match="extra heads.*--head_type=parallel"):
    interop.read_checkpoint(fixture("meta_mtp"), n_future=3, head_type="sequential")
  with pytest.raises(ConvertError, match="--head_type='linear'"):
    interop.read_checkpoint(fixture("hf_gqa_untied"), n_future=3, head_type="linear")


def test_added_sequential_modules_carry_the_hidden_state_at_its_scale():
  """A copied module's norms put head 1's hidden state at the scale the copied layer reads (the median RMS
  over a probe of token ids), not at RMS 1: checked against head 1's hidden states on the fixture's text."""
  from mtp_jax.model import MTPTransformer, default_positions
  config, ps, _ = interop.read_checkpoint(fixture("hf_gqa_untied"), n_future=3, head_type="sequential")
  model = build_model(config.model)
  tokens = jnp.asarray(np.load(os.path.join(fixture("hf_gqa_untied"), "reference.npz"))["tokens"], jnp.int32)
  pos, seg = default_positions(tokens)
  z, _ = model.apply({"params": ps}, tokens, pos, seg, method=MTPTransformer.run_trunk)
  h, _ = model.apply({"params": ps}, 0, z, None, pos, seg, method=MTPTransformer.run_head)
  rms = float(np.median(np.sqrt(np.mean(np.square(np.asarray(h)), axis=-1))))
  assert abs(np.log(rms)) > np.log(1.5)     # this fixture's hidden state is far from RMS 1
  for k in (1, 2):
    for norm in ("hnorm", "enorm"):
      scale = ps[f"heads_{k}"][norm]["scale"]
      assert np.all(scale == scale[0]) and abs(np.log(scale[0] / rms)) < np.log(1.25), (k, norm, scale[0], rms)


def _bit_equal(a, b):
  la, lb = jax.tree.leaves_with_path(a), jax.tree.leaves_with_path(b)
  assert [p for p, _ in la] == [p for p, _ in lb]
  for (path, x), (_, y) in zip(la, lb):
    x, y = np.asarray(x), np.asarray(y)
    assert x.dtype == y.dtype and x.shape == y.shape and x.tobytes() == y.tobytes(), jax.tree_util.keystr(path)


def run_convert(*args):
  return subprocess.run([sys.executable, "-m", "mtp_jax.convert", *args], cwd=ROOT, capture_output=True, text=True,
                        timeout=300, env={**os.environ, "PYTHONPATH": ROOT})


def test_cli_import_export_import_is_bit_exact(tmp_path):
  """convert import (with 2 added heads) -> the workdir's params; convert export -> HF dir; import it again."""
  w, out = tmp_path / "w", tmp_path / "hf"
  r = run_convert("import", f"--from={fixture('hf_gqa_untied')}", f"--workdir={w}", "--n_future=3",
                  "--head_init=random")
  assert r.returncode == 0, r.stderr
  assert sorted(os.listdir(w)) == ["config.json", "pretrained", "special_tokens.json", "tokenizer.json"]
  r = run_convert("export", f"--workdir={w}", f"--to={out}")
  assert r.returncode == 0, r.stderr
  assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "extra_heads.safetensors",
          "params.json"} <= set(os.listdir(out))
  from mtp_jax.checkpoint import load_params
  params, config = load_params(w)
  config2, params2, _ = interop.read_checkpoint(out)
  assert config2.model.to_dict() == config.model.to_dict()
  _bit_equal(jax.device_get(params), params2)
  # the exported next-token model alone (what transformers loads) still gives transformers' logits
  ref = np.load(os.path.join(fixture("hf_gqa_untied"), "reference.npz"))
  assert np.max(np.abs(logits_of(config2, params2, ref["tokens"])[0] - ref["logits"][0])) <= 1e-4


def test_meta_export_import_is_bit_exact(tmp_path):
  config, params, tok = interop.read_checkpoint(fixture("meta_mtp"))
  from mtp_jax.interop.workdir import write_workdir
  write_workdir(tmp_path / "w", config, params, tok)
  interop.export_workdir(tmp_path / "w", tmp_path / "hf")
  config2, params2, _ = interop.read_checkpoint(tmp_path / "hf")
  assert config2.model.n_future == 3
  _bit_equal(params, params2)


def test_tied_sentencepiece_export_import_is_bit_exact(tmp_path):
  config, params, tok = interop.read_checkpoint(fixture("hf_tied_sp"))
  from mtp_jax.interop.workdir import write_workdir
  write_workdir(tmp_path / "w", config, params, tok)
  interop.export_workdir(tmp_path / "w", tmp_path / "hf")
  assert "tokenizer.model" in os.listdir(tmp_path / "hf")
  _, params2, tok2 = interop.read_checkpoint(tmp_path / "hf")
  assert "unembed" not in params2 and tok2.proto == tok.proto
  _bit_equal(params, params2)


# ----------------------------------------------------------------------------- bad input

def _copy(tmp_path, name="hf_gqa_untied"):
  d = tmp_path / "src"
  shutil.copytree(fixture(name), d)
  return d


def _edit_config(d, **fields):
  c = json.load(open(d / "config.json"))
  c.update(fields)
  json.dump(c, open(d / "config.json", "w"))


def _refused(src, tmp_path, match, **kw):
  w = tmp_path / "w"
  with pytest.raises(ConvertError, match=match):
    interop.import_checkpoint(src, w, **kw)
  assert not w.exists() and not [p for p in os.listdir(tmp_path) if p.startswith(".w.")]


def test_bad_checkpoints_are_refused_by_name(tmp_path):
  d = _copy(tmp_path)
  _refused(tmp_path / "nowhere", tmp_path, "no such directory")
  os.rename(d / "config.json", d / "c.json")
  _refused(d, tmp_path, "has no config.json")
  os.rename(d / "c.json", d / "config.json")
  for fields, match in ((dict(model_type="mistral"), "model_type='mistral'"),
                        (dict(attention_bias=True), "attention_bias=True"),
                        (dict(hidden_act="gelu"), "hidden_act='gelu'"),
                        (dict(sliding_window=64), "sliding_window=64"),
                        (dict(rope_scaling={"rope_type": "yarn", "factor": 2.0}), "rope_type='yarn'"),
                        (dict(num_hidden_layers=4), "lacks tensors .*model.layers.3"),
                        (dict(intermediate_size=128),
                         r"tensor model\.layers\.\d\.mlp\.\w+\.weight has shape \[\d+, 96\]|\[96, \d+\] but"),
                        (dict(vocab_size=400), "tokenizer.json has 384 ids but the model's vocabulary has 400")):
    saved = (d / "config.json").read_text()
    _edit_config(d, **fields)
    _refused(d, tmp_path, match)
    (d / "config.json").write_text(saved)
  os.rename(d / "tokenizer.json", d / "t.json")
  _refused(d, tmp_path, "no tokenizer.json or tokenizer.model")
  os.rename(d / "t.json", d / "tokenizer.json")
  data = (d / "model.safetensors").read_bytes()
  (d / "model.safetensors").write_bytes(data[:len(data) // 2])
  _refused(d, tmp_path, "truncated or damaged")
  from safetensors.numpy import save_file
  from safetensors.numpy import load_file
  t = load_file(str(fixture("hf_gqa_untied") + "/model.safetensors"))
  save_file({**t, "model.layers.0.self_attn.q_proj.bias": np.zeros(64, np.float32)}, str(d / "model.safetensors"))
  _refused(d, tmp_path, "no place for: model.layers.0.self_attn.q_proj.bias")


def test_missing_shard_and_nonempty_workdir(tmp_path):
  d = _copy(tmp_path, "hf_llama3_sharded")
  os.remove(d / "model-00002-of-00002.safetensors")
  _refused(d, tmp_path, "model-00002-of-00002.safetensors is missing")
  w = tmp_path / "busy"
  w.mkdir()
  (w / "keep.txt").write_text("mine")
  with pytest.raises(ConvertError, match="is not empty"):
    interop.import_checkpoint(fixture("hf_gqa_untied"), w)
  assert os.listdir(w) == ["keep.txt"]


def test_cli_errors_are_one_line(tmp_path):
  r = run_convert("import", f"--from={tmp_path}", f"--workdir={tmp_path / 'w'}")
  assert r.returncode == 2 and r.stderr.strip().splitlines() == [f"error: {tmp_path} has no config.json: not a "
                                                                  f"Hugging Face model directory (give the folder "
                                                                  f"save_pretrained wrote, with config.json and "
                                                                  f"*.safetensors)"]
  assert not (tmp_path / "w").exists()
  (tmp_path / "hf").mkdir()
  (tmp_path / "hf" / "x").write_text("")
  r = run_convert("export", f"--workdir={tmp_path / 'none'}", f"--to={tmp_path / 'hf'}")
  assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "not empty" in r.stderr


def test_meta_pth_needs_torch(tmp_path):
  try:
    import torch  # noqa: F401
  except ImportError:
    with pytest.raises(ConvertError, match="needs torch, which is not installed"):
      interop.read_checkpoint(fixture("meta_mtp_pth"))
  else:
    config, params, _ = interop.read_checkpoint(fixture("meta_mtp_pth"))
    _, ref, _ = interop.read_checkpoint(fixture("meta_mtp"))
    _bit_equal(params, ref)


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists(TORCHVENV), reason="needs /work/torchvenv (torch + transformers)")
def test_export_loads_in_transformers(tmp_path):
  """The exported next-token model, loaded by transformers.LlamaForCausalLM, gives our head 1's logits."""
  config, params, tok = interop.read_checkpoint(fixture("hf_llama3_sharded"), n_future=2, head_init="random")
  from mtp_jax.interop.workdir import write_workdir
  write_workdir(tmp_path / "w", config, params, tok)
  interop.export_workdir(tmp_path / "w", tmp_path / "hf")
  ref = np.load(os.path.join(fixture("hf_llama3_sharded"), "reference.npz"))
  ours = logits_of(config, params, ref["tokens"])[0]
  code = ("import sys, numpy as np, torch, transformers\n"
          "m = transformers.LlamaForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32).eval()\n"
          "t = np.load(sys.argv[2])['tokens']\n"
          "with torch.no_grad(): np.save(sys.argv[3], m(torch.tensor(t)).logits.numpy())\n"
          "transformers.AutoTokenizer.from_pretrained(sys.argv[1])\n")
  r = subprocess.run([TORCHVENV, "-c", code, str(tmp_path / "hf"), os.path.join(fixture("hf_llama3_sharded"),
                      "reference.npz"), str(tmp_path / "t.npy")], capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stderr[-2000:]
  assert np.max(np.abs(np.load(tmp_path / "t.npy") - ours)) <= 1e-4


def test_generate_results_are_json_ready_and_greedy_reports_no_drafts():
  """2-D numpy prompts (as a converter user holds them) give plain-int results; only speculative runs draft."""
  config, params, _ = interop.read_checkpoint(fixture("meta_mtp"))
  prompts = np.array([[3, 4, 5], [6, 7, 8]], np.int32)
  greedy = generate(params, config, prompts, mode="greedy", max_new_tokens=4, eos_id=-1)
  json.dumps(greedy)
  assert greedy[0]["prompt"] == [3, 4, 5] and "draft_proposed" not in greedy[0]["stats"]
  spec = generate(params, config, prompts, mode="speculative", max_new_tokens=4, eos_id=-1)
  json.dumps(spec)
  assert len(spec[0]["stats"]["draft_accepted"]) == 2
  assert [r["tokens"] for r in spec] == [r["tokens"] for r in greedy]   # speculative keeps greedy's output
  from mtp_jax.generate import summarize
  assert summarize(greedy)["acceptance_rate"] == []


def test_runs_from_before_rope_scaling_still_load_and_resume(tmp_path):
  import ml_collections
  from mtp_jax import workdir as workdir_lib
  from mtp_jax.errors import UserError
  from mtp_jax.model import ModelArgs
  from helpers import tiny_config
  c = tiny_config()
  old = c.to_dict()
  del old["model"]["rope_scaling"]
  (tmp_path / "checkpoints" / "10").mkdir(parents=True)   # a trained run: its config.json binds the shape
  (tmp_path / "config.json").write_text(json.dumps(old))
  workdir_lib.check_shape(c, tmp_path)                   # no scaling then, none now: the same shape
  assert ModelArgs.from_config(ml_collections.ConfigDict(old["model"])).rope_scaling is None
  c.model.rope_scaling.type = "llama3"
  with pytest.raises(UserError, match="model.rope_scaling"):
    workdir_lib.check_shape(c, tmp_path)


def test_bucket_import_export_match_local(gcs, tmp_path):
  """--from, --workdir and --to on a bucket (the emulator) give what the local commands give, bit for bit.
  has_pretrained is what training asks before it initialises: on a bucket it used to say no, silently."""
  from mtp_jax import io
  from mtp_jax.checkpoint import load_params
  from mtp_jax.workdir import has_pretrained
  src = "gs://bkt/interop/hf_gqa_untied"
  io.put_tree(fixture("hf_gqa_untied"), src)
  interop.import_checkpoint(src, "gs://bkt/interop/w", n_future=2, head_init="random")
  interop.import_checkpoint(fixture("hf_gqa_untied"), tmp_path / "w", n_future=2, head_init="random")
  assert has_pretrained("gs://bkt/interop/w")
  (remote, _), (local, _) = load_params("gs://bkt/interop/w"), load_params(tmp_path / "w")
  _bit_equal(jax.device_get(remote), jax.device_get(local))
  interop.export_workdir("gs://bkt/interop/w", "gs://bkt/interop/out")
  _bit_equal(interop.read_checkpoint("gs://bkt/interop/out")[1], interop.read_checkpoint(
      interop.export_workdir(tmp_path / "w", tmp_path / "out"))[1])
  with pytest.raises(UserError, match="is not empty"):
    interop.import_checkpoint(src, "gs://bkt/interop/w")
  with pytest.raises(UserError, match="no such directory on the bucket"):
    interop.read_checkpoint("gs://bkt/interop/absent")
