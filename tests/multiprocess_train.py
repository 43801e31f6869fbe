"""One process of a localhost multi-process run (tests/test_prepare.py starts two, plus a one-process
reference with two host devices):

    python tests/multiprocess_train.py PROCESS_ID NUM_PROCESSES PORT PREPARED WORKDIR CACHE OUT.json

Joins jax.distributed through a loopback coordinator (CPU, one device per process), writes the window
numbers this process reads in the first epoch to OUT.json, then trains from the prepared shards.
"""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402


def main(process_id, num_processes, port, prepared, workdir, cache, out):
  if num_processes > 1:
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=num_processes,
                               process_id=process_id, initialization_timeout=120)
  from configs.tiny import get_config
  from mtp_jax import data, train
  c = get_config("bytes")
  c.data.source, c.data.path, c.data.cache_dir = "prepared", prepared, cache
  c.train.update(steps=6, batch_size=4, log_every=1, eval_every=6, checkpoint_every=6, warmup_steps=1)
  d = data.build(c)
  n = data.num_windows(d.train, c.data.seq_len)
  per_epoch = n // c.train.batch_size * data.local_batch_size(c.train.batch_size)
  ds = data.window_indices(d.train, c)
  seen = [int(ds[i]) for i in range(per_epoch)]
  with open(out, "w") as f:
    json.dump({"windows": n, "seen": seen, "devices": jax.device_count(), "processes": jax.process_count()}, f)
  train.train_and_evaluate(c, workdir)


if __name__ == "__main__":
  a = sys.argv[1:]
  main(int(a[0]), int(a[1]), int(a[2]), *a[3:])
