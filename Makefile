# capattn — `make help` lists the targets.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
CAPATTN := $(BIN)/capattn
export HF_DATASETS_OFFLINE ?= 1
export HF_HUB_OFFLINE ?= 1
export WANDB_MODE ?= offline

.DEFAULT_GOAL := help

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  \033[36m%-10s\033[0m %s\n", $$1, $$2}'

$(BIN)/capattn: pyproject.toml constraints.txt
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# constraints.txt pins torch/torchvision, so pip never pulls a multi-GB CUDA torch. pip
	# byte-compiles what it installs on one core; compileall does the same on all of them (the
	# install of a fresh clone: 50 s against 56 s on 2 cores). Files that do not compile (test
	# fixtures inside some packages) are skipped, as pip skips them.
	$(BIN)/pip install --quiet --no-compile -c constraints.txt -e '.[dev]'
	$(BIN)/python -m compileall -q -j 0 $(VENV)/lib > /dev/null || true
	touch $@

install: $(BIN)/capattn  ## create .venv and install capattn with its dev tools

# The two fits run side by side, one core and one torch thread each: these small models use a
# second thread poorly, so two one-thread runs finish in about half the time of two in a row.
# Show and Tell logs to runs/demo/show_tell.log; Show, Attend and Tell shows its progress bar.
demo: install  ## train both baselines on the built-in shapes data, print a table, write attention PNGs
	@mkdir -p runs/demo
	@echo "Training Show and Tell (log: runs/demo/show_tell.log) and Show, Attend and Tell side by side…"
	@OMP_NUM_THREADS=1 $(CAPATTN) fit --config experiments/demo_show_tell.yaml \
		--trainer.enable_progress_bar=false > runs/demo/show_tell.log 2>&1 & st=$$!; \
	trap 'kill $$st 2>/dev/null' INT TERM; \
	OMP_NUM_THREADS=1 $(CAPATTN) fit --config experiments/demo_show_attend_tell.yaml; sat=$$?; \
	wait $$st || { tail -n 30 runs/demo/show_tell.log; echo "Show and Tell failed: see runs/demo/show_tell.log"; exit 1; }; \
	exit $$sat
	$(CAPATTN) report --latest runs/demo

test: install  ## run the fast test suite
	$(BIN)/pytest -q

test-full: install  ## run every test, the slow end-to-end ones too
	$(BIN)/pytest -q -m ''

gpu-check: install  ## on a CUDA machine: GPU-vs-CPU tests, bench_gpu.py, the GPU's data loading, a measured COCO epoch, the demo in bf16-mixed
	@$(BIN)/python -c "import capattn, torch, sys; sys.exit(0 if torch.cuda.is_available() else 'make gpu-check: no CUDA GPU visible to torch here')"
	$(BIN)/pytest -q tests/models/test_cuda.py
	$(BIN)/python benchmarks/bench_gpu.py
	$(BIN)/python benchmarks/bench_data.py --loaders-only --jpegs 600
	$(BIN)/python benchmarks/bench_epoch.py --precision bf16-mixed
	$(BIN)/python benchmarks/bench_epoch.py --precision bf16-mixed --decoder show_tell
	$(CAPATTN) fit --config experiments/demo_show_attend_tell.yaml --trainer.accelerator=gpu \
		--trainer.precision=bf16-mixed --float32_matmul_precision=high --model.decoder.init_args.compile_step=true \
		--run_name=gpu-bf16

lint: install  ## ruff: lint and format check
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

.PHONY: help install demo test test-full gpu-check lint
