set -x
.venv/bin/python experiments/speed/speculative.py --workdir=workdirs/smollm2_heads_copy --draft=chain,auto,tree --draft_vocab=8192 --prompts=4 --prompt_len=64 --max_new_tokens=48 --repeats=2 --forward_iters=8 --forward_repeats=7 --batch_sizes=1,4 --out_name=speculative_smollm2_parallel_drafts
