#!/usr/bin/env bash
# Probe on one GPU: CUDA numerics of the batched chunk path, layer bench at the gpu profile's shapes, and 30-step
# runs of each Table 2 gpu cell (one LR) through mora.train: startup, tokens/s per window. OUT gets small files only.
set -u
OUT=$1; R=/tmp/probe; rm -rf $R; mkdir -p $R
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 WANDB_MODE=disabled PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
python3 diag/probe_check.py > $OUT/numerics.txt 2>&1; tail -5 $OUT/numerics.txt
timeout 60 python3 bench/layer.py --device cuda --dtype bfloat16 --shapes 1024x1024 1024x2816 2816x1024 --ranks 8 64 --tokens 200x75 --repeats 20 --warmup 5 --operators sharing rope --baselines lora --name layer_gpu_profile --out $OUT > $OUT/layer.log 2>&1; tail -3 $OUT/layer.log
C="profile=gpu experiment=table2 train.progress=false task=uuid seed=0 train.steps=30 train.log_every=5 train.eval_steps=[30]"
run() { n=$1; shift; s=$(date +%s%N); python3 -m mora.train $C "$@" run.dir=$R/$n > $OUT/$n.log 2>&1; echo "$n exit $? process_ms $(( ($(date +%s%N) - s) / 1000000 ))" | tee -a $OUT/procs.txt; }
run base adapter=fft train.lr=3e-4 task.n_pairs=2000 task.data_seed=1
B=model.pretrained=$R/base/adapter
run fft adapter=fft train.lr=1e-4 $B
run lora8 adapter=lora adapter.r=8 adapter.alpha=16 train.lr=1e-3 $B
run mora8 adapter=mora adapter.r=8 adapter.compression=rope train.lr=1e-3 $B
run lora64 adapter=lora adapter.r=64 adapter.alpha=128 train.lr=1e-3 $B
run mora64 adapter=mora adapter.r=64 adapter.compression=sharing train.lr=1e-3 $B
python3 - "$R" "$OUT" <<'PY'
import json, sys, pathlib
R, OUT = map(pathlib.Path, sys.argv[1:])
rows = {}
for d in sorted(R.iterdir()):
    s = json.loads((d / "summary.json").read_text()) if (d / "summary.json").exists() else {}
    m = [json.loads(l) for l in (d / "metrics.jsonl").read_text().splitlines()] if (d / "metrics.jsonl").exists() else []
    rows[d.name] = {k: s.get(k) for k in ("status", "startup_s", "wall_s", "tokens_per_s", "error")}
    rows[d.name]["windows"] = [r["tokens_per_s"] for r in m if "tokens_per_s" in r]
    rows[d.name]["evals"] = [r for r in m if any(k.startswith("eval/") for k in r)]
(OUT / "probe.json").write_text(json.dumps(rows, indent=1)); print(json.dumps(rows, indent=1))
PY
