# mora-lab: `make help` lists the targets.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PROFILE ?= tiny
SEED ?=
SEEDS ?=
TASKS ?=
CELLS ?=
TABLES ?=
QUICK ?=
SET ?=
LAUNCHER ?=
NPROC ?=
DRY_RUN ?=
SUBMIT ?=
SLURM ?=
OUT ?=
# the one table runner (experiments/reproduce.py); SEED/SEEDS, TASKS, CELLS, SET (Hydra overrides for every run),
# LAUNCHER, NPROC, SUBMIT=slurm with SLURM="partition=gpu time=720" (configs/cluster/slurm.yaml), DRY_RUN=1,
# KEEP_GOING=1 (after a failed run, the next) and OUT (the table's folder, default results/<table>) reach it
REPRODUCE_ARGS = --profile $(PROFILE) $(if $(NPROC),--nproc $(NPROC)) $(if $(OUT),--out $(OUT)) \
	$(if $(TASKS),--tasks $(TASKS)) $(if $(CELLS),--cells $(CELLS)) $(if $(SET),--set $(SET)) $(if $(LAUNCHER),--launcher $(LAUNCHER)) \
	$(if $(SUBMIT),--submit $(SUBMIT)) $(if $(SLURM),--slurm $(SLURM)) $(if $(DRY_RUN),--dry-run) \
	$(if $(KEEP_GOING),--keep-going)
# SEED / SEEDS, else 3 seeds; the paper profile runs the authors' one seed (42: PAPER.md §2.1) unless told otherwise
TABLE_SEEDS = $(if $(SEED),$(SEED),$(if $(SEEDS),$(SEEDS),$(if $(filter paper,$(PROFILE)),42,0 1 2)))
# the regime sweeps on CPU: 2 seeds
REGIME_SEEDS = $(if $(SEED),$(SEED),$(if $(SEEDS),$(SEEDS),0 1))

export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1
export DS_ACCELERATOR ?= cpu
export WANDB_MODE ?= offline

.PHONY: help install test test-fast lint reproduce-table1 reproduce-table2 reproduce-table2-regime reproduce-table3 reproduce-table3-regime reproduce-table3-regime-long reproduce-table4 reproduce-methods reproduce-methods-regime budgets rehearse smoke prefetch bench inspect wheelhouse gpu-check clean

help: ## list the targets
	@grep -E '^[a-zA-Z0-9_-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*## "}; {printf "  %-29s %s\n", $$1, $$2}'

$(STAMP): requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# compiled at install: where PYTHONDONTWRITEBYTECODE is set (as on CI) nothing is cached at import, and every
	# process would compile torch, transformers and PEFT again (import mora.train: 15 s instead of 6 s)
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps -e .
	touch $(STAMP)

install: $(STAMP) ## create .venv and install the pinned dependencies (torch CPU wheel in the same install)

test: $(STAMP) ## run the whole test suite
	WANDB_MODE=disabled $(PY) -m pytest --durations=15

test-fast: $(STAMP) ## run the tests without the slow and multi-process ones
	WANDB_MODE=disabled $(PY) -m pytest -m "not slow and not multiprocess"

lint: $(STAMP) ## ruff check + format check
	$(VENV)/bin/ruff check mora tests experiments scripts bench
	$(VENV)/bin/ruff format --check mora tests experiments scripts bench

reproduce-table1: $(STAMP) ## Tables 1, 6, 7: PROFILE=tiny|paper, SEEDS="0 1 2" (paper: 42), TASKS=, CELLS=, SET=, LAUNCHER=, NPROC=, DRY_RUN=1 -> results/table1/
	$(PY) experiments/reproduce.py table1 $(REPRODUCE_ARGS) --seeds $(TABLE_SEEDS)

reproduce-table2: $(STAMP) ## Table 2 (UUID memorization): PROFILE=tiny|gpu|paper, SEEDS="0 1 2" or SEED=0 (paper: 42) -> results/table2/
	$(PY) experiments/reproduce.py table2 $(REPRODUCE_ARGS) --seeds $(TABLE_SEEDS)

reproduce-table2-regime: $(STAMP) ## Table 2's regime sweep on CPU (3 widths, SEEDS="0 1", about 40 min) -> results/table2/regime/
	for point in w64 w128 w256; do \
		$(PY) experiments/reproduce.py table2_regime_$$point $(REPRODUCE_ARGS) --seeds $(REGIME_SEEDS) || exit 1; \
	done

reproduce-table3: $(STAMP) ## Table 3, Figs. 4-5 (C4 pretraining from scratch): PROFILE=tiny|paper, SEEDS="0 1 2" (paper: 42) -> results/table3/
	$(PY) experiments/reproduce.py table3 $(REPRODUCE_ARGS) --seeds $(TABLE_SEEDS)

# Table 3's regime sweep: the points up to 1,000 steps (about 75 min on 2 cores) and, apart, the 3,000-step point at
# the paper's tokens per parameter (about 100 min); CELLS= picks cells (or patterns) of either
reproduce-table3-regime: $(STAMP) ## Table 3's regime sweep on CPU up to 1,000 steps (length, width, ablations), SEEDS="0 1" -> results/table3/regime/
	$(PY) experiments/reproduce.py table3_regime $(REPRODUCE_ARGS) --seeds $(REGIME_SEEDS) $(if $(CELLS),,--cells '*-s300' '*-s1000')

reproduce-table3-regime-long: $(STAMP) ## Table 3's regime at 3,000 steps, the paper's tokens per parameter (about 100 min) -> results/table3/regime/
	$(PY) experiments/reproduce.py table3_regime $(REPRODUCE_ARGS) --seeds $(REGIME_SEEDS) $(if $(CELLS),,--cells '*-s3000')

reproduce-table4: $(STAMP) ## Table 4 (MoRA's operators at two ranks): PROFILE=tiny|paper, SEEDS="0 1 2" (paper: 42) -> results/table4/
	$(PY) experiments/reproduce.py table4 $(REPRODUCE_ARGS) --seeds $(TABLE_SEEDS)

reproduce-methods: $(STAMP) ## MoRA against the methods PEFT ships, Table 2's UUID setup: PROFILE=tiny|gpu|paper, SEEDS="0 1 2" (paper: 42) -> results/methods/
	$(PY) experiments/reproduce.py methods $(REPRODUCE_ARGS) --seeds $(TABLE_SEEDS)

reproduce-methods-regime: $(STAMP) ## the methods comparison at Table 2's regime point w128, low budget, SEEDS="0 1" -> results/methods/regime/
	$(PY) experiments/reproduce.py methods_regime_w128 $(REPRODUCE_ARGS) --seeds $(REGIME_SEEDS)

budgets: $(STAMP) ## the methods' budget table: trainable parameters and saved size of every cell beside LoRA's -> results/methods/budgets.md
	$(PY) experiments/budgets.py

rehearse: $(STAMP) ## every run of the GPU profiles at toy sizes, through their own launchers (PROFILE=paper|gpu, TABLES=, CELLS=, QUICK=1) -> runs/rehearsal/
	$(PY) experiments/rehearse.py $(if $(filter paper gpu,$(PROFILE)),--profiles $(PROFILE)) \
		$(if $(TABLES),--tables $(TABLES)) $(if $(CELLS),--cells $(CELLS)) $(if $(QUICK),--quick)

smoke: $(STAMP) ## every adapter on every task for a few steps (tiny profile); checks each run folder
	$(PY) scripts/smoke.py

prefetch: $(STAMP) ## on a networked machine: the models, training data and evaluation sets of PROFILE=paper (TASKS=)
	HF_HUB_OFFLINE=0 HF_DATASETS_OFFLINE=0 TRANSFORMERS_OFFLINE=0 $(PY) scripts/prefetch.py --profile $(if $(filter tiny,$(PROFILE)),paper,$(PROFILE)) $(if $(TASKS),--tasks $(TASKS))

bench: $(STAMP) ## speed and memory benchmarks -> results/bench/ (about 65 min on 2 CPU cores)
	$(PY) bench/layer.py --repeats 5
	$(PY) bench/layer.py --tokens 2x256 1x2048 --dtype bfloat16 --repeats 5
	$(PY) bench/merge.py
	$(PY) bench/model.py
	$(PY) bench/memory.py
	$(PY) bench/table2_time.py

wheelhouse: $(STAMP) ## on a networked machine: wheels of the lock except torch -> wheelhouse/ (WHEELHOUSE_ARGS="--python-version 3.12 --only ...")
	$(PY) scripts/wheelhouse.py $(WHEELHOUSE_ARGS)

gpu-check: ## on one GPU: environment, then PARTS (default layer methods merge; also table3 table2) -> OUT=folder (DRY=1: CPU, tiny)
	bash scripts/gpu_check.sh $(if $(OUT),$(OUT),$(error set OUT=folder for the result files)) $(if $(DRY),--dry) $(if $(PARTS),--parts $(PARTS))

inspect: $(STAMP) ## per-layer r_hat and parameters, e.g. make inspect ARGS="model=llama2_7b adapter=mora adapter.r=8"
	$(PY) -m mora.inspect $(ARGS)

clean: ## remove caches (keeps .venv, runs and results)
	rm -rf .pytest_cache .ruff_cache
