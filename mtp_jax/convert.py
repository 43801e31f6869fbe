"""Pretrained models in and out of mtp_jax.

    mtp-jax-convert import --from=HF_DIR|ORG/NAME|META_DIR|FILE.gguf --workdir=W [--n_future=N] [--head_init=copy|random]
        [--head_type=parallel|causal|sequential]
    python -m mtp_jax.main --config=configs/imported.py:W --workdir=W ...   # fine-tune it from step 0
    python -m mtp_jax.generate --workdir=W --prompt=...                    # or decode it as it is
    python -m mtp_jax.convert export --workdir=W --to=DIR                  # back to Hugging Face

A bad checkpoint, directory or flag is one `error:` line and exit status 2, and nothing is written.
"""
from absl import flags

from mtp_jax.errors import UserError, exit_with, run_cli

flags.DEFINE_string("from", None, "import: a Hugging Face model directory (config.json, *.safetensors, tokenizer), "
                    "a Hub id such as HuggingFaceTB/SmolLM2-135M (fetched into the Hugging Face cache; "
                    "HF_HUB_OFFLINE=1 reads only the cache), a Meta MTP directory (params.json, "
                    "consolidated.pth|.safetensors, tokenizer.model) or a llama GGUF file (*.gguf).")
_WORKDIR = flags.DEFINE_string("workdir", None, "import: the new workdir; export: the workdir to export.")
_TO = flags.DEFINE_string("to", None, "export: the new Hugging Face directory.")
_N_FUTURE = flags.DEFINE_integer("n_future", None, "import: heads in all (default: those in the checkpoint); "
                                 "the added ones are one transformer layer each.")
_HEAD_INIT = flags.DEFINE_enum("head_init", "copy", ["copy", "random"], "import: added heads start as a copy of "
                               "head 1 (the checkpoint's last layer) or freshly initialised.")
_PARAM_DTYPE = flags.DEFINE_enum("param_dtype", "float32", ["float32", "bfloat16", "float16"],
                                 "import: the dtype parameters are stored and trained in.")
_SEED = flags.DEFINE_integer("seed", 0, "import: seed of --head_init=random.")
_HEAD_TYPE = flags.DEFINE_string("head_type", "parallel", "import: the added heads' topology: parallel or causal "
                                 "(transformer layers), or sequential (DeepSeek-V3 MTP modules, each around one).")


def main(argv):
  if len(argv) != 2 or argv[1] not in ("import", "export"):
    raise UserError("usage: python -m mtp_jax.convert import --from=DIR --workdir=W | export --workdir=W --to=DIR")
  from mtp_jax import interop
  if argv[1] == "import":
    src = flags.FLAGS["from"].value
    if not src or not _WORKDIR.value:
      raise UserError("import needs --from=<model directory> and --workdir=<new workdir>")
    c = interop.import_checkpoint(src, _WORKDIR.value, _N_FUTURE.value, _HEAD_INIT.value, _PARAM_DTYPE.value,
                                  _SEED.value, _HEAD_TYPE.value)
    m = c.model
    print(f"imported {src} into {_WORKDIR.value}: {m.n_layers - m.n_future} trunk layers + {m.n_future} heads, "
          f"d_model {m.d_model}, vocabulary {m.vocab_size}, tokenizer {c.data.tokenizer}; train it with "
          f"python -m mtp_jax.main --config=configs/imported.py:{_WORKDIR.value} --workdir={_WORKDIR.value}")
  else:
    if not _WORKDIR.value or not _TO.value:
      raise UserError("export needs --workdir=<workdir> and --to=<new directory>")
    out = interop.export_workdir(_WORKDIR.value, _TO.value)
    print(f"exported {_WORKDIR.value} to {out}")


def _parse(argv):
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    exit_with(str(e).strip().splitlines()[0])


def run():
  run_cli(main, _parse)


if __name__ == "__main__":
  run()
