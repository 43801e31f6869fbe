set -x
S=experiments/speed/speculative.py
W=workdirs/smollm2_seq_copy
COMMON="--workdir=$W --draft=chain --prompts=4 --prompt_len=64 --max_new_tokens=48 --repeats=2 --forward_iters=8 --forward_repeats=7"
.venv/bin/python $S $COMMON --draft_vocab=8192 --batch_sizes=1,4 --out_name=speculative_smollm2_sequential
.venv/bin/python $S $COMMON --draft_vocab=0 --batch_sizes=1 --out_name=speculative_smollm2_sequential_full_vocab
.venv/bin/python $S --workdir=$W --draft=chain --prompt_file=experiments/speed/prompts/chat.txt --chat --prompts=4 --max_new_tokens=48 --repeats=2 --forward_iters=8 --forward_repeats=7 --draft_vocab=8192 --batch_sizes=1 --out_name=speculative_smollm2_sequential_chat
