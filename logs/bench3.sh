while kill -0 28432 2>/dev/null; do sleep 5; done
.venv/bin/python experiments/real_model/real_model_heads.py --train_windows=256 --valid_windows=24 --steps=100 --ce_positions=32 --head_inits=copy,random --cost_steps=1 --out_workdir= --out_name=real_model_heads_init
