# nasfcos: the two commands of README.md.
#   make demo   venv + install + local Prefect server + the nas-search pipeline on synthetic data (CPU)
#   make test   venv + install + the whole test suite
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-$(shell cksum pyproject.toml | cut -d' ' -f1)
DEMO   ?= runs/demo-fcos

# Offline Prefect: no telemetry, no analytics.
export DO_NOT_TRACK := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false

.PHONY: install lint test demo demo-fcos stop soak ui-shots gpu-bench clean

# pip 26 resolves and unpacks in a third of the CPU time of Python 3.11's bundled pip 23.2.
# Byte-compiled once here, on every core (compileall -j 0: ~36 s on 2 cores), not by pip
# (one core, ~50 s) nor on first import: where PYTHONDONTWRITEBYTECODE is set (these
# machines set it) no .pyc is ever written, and every process compiled the ~4,400 modules
# it imports again, 17-20 s of each process start (a test suite starts hundreds).
# py312_intrinsics is torch test code in Python 3.12 syntax, never imported on 3.11.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check 'pip==26.3'
	$(BIN)/python -m pip install -q --no-compile --disable-pip-version-check -e '.[dev,dask,cluster,export]'
	$(BIN)/python -m compileall -q -j 0 -x 'torch/testing/_internal/py312_intrinsics' "$$($(BIN)/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" > /dev/null
	rm -f $(VENV)/.installed-* && touch $@

install: $(STAMP)

# Our own modules compiled too (no .pyc is written on import here, see install). Two
# pytest workers (pytest-xdist), a test file per worker so that a file's shared
# pipeline run is built once; most tests wait on servers and subprocesses as much as they
# compute (timings: benchmarks/RESULTS.md, "Test suite"). TEST_WORKERS=0: one process.
TEST_WORKERS ?= 2
test: install lint
	$(BIN)/python -m compileall -q nasfcos storage flows atomicio benchmarks tests deployments > /dev/null
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile

# ruff 0.17 (pinned in the dev extra; rules in pyproject.toml): lint and format check of the whole tree.
lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# The whole nas-search pipeline on the synthetic dataset, on a local Prefect server
# (state in .prefect/), through the nas-search/demo deployment. Leaves server and worker running.
# DB=postgres: the server's database in a local PostgreSQL cluster (deployments/postgres.sh).
DB ?= sqlite
demo: install
	DB=$(DB) deployments/demo.sh

# End what `make demo` started (by pid), PostgreSQL included.
stop:
	deployments/stop.sh

# Random SIGKILLs of the real deployment run (own server + worker), N rounds; not in `make test`.
N ?= 20
soak: install
	$(BIN)/python deployments/soak.py --n $(N)

# Headless-chromium screenshots of the latest demo run in the Prefect UI into runs/<id>/ui/
# (server from `make demo` still up; exits 2 with the install line when chromium is missing).
ui-shots: install
	$(BIN)/python deployments/ui_shots.py

# The FPN-FCOS detector alone: train + evaluate on the synthetic dataset (about 3.5 min).
demo-fcos: install
	$(BIN)/nasfcos synthetic $(DEMO)/data --num-train 300 --num-val 60 --seed 0
	$(BIN)/nasfcos train --coco-json $(DEMO)/data/annotations/instances_train.json \
	    --image-root $(DEMO)/data/VOCdevkit/VOC2012/JPEGImages --out $(DEMO)/train \
	    --backbone tiny --width 64 --min-size 144 --max-size 192 --device cpu \
	    --iters 700 --batch-size 16 --lr 0.02 --steps 550 650 --warmup 50 --clip-grad 10 \
	    --num-workers 1 --log-every 50 --checkpoint-every 300
	$(BIN)/nasfcos eval --coco-json $(DEMO)/data/annotations/instances_val.json \
	    --image-root $(DEMO)/data/VOCdevkit/VOC2012/JPEGImages \
	    --checkpoint $(DEMO)/train/checkpoint.pt --device cpu

# The GPU suite of issue #15 (benchmarks/gpu_suite.py): proxy, training, inference, deformable
# convs and the speed switches beside torchvision, on one GPU (<= ~8 min on an H100); tables in
# $(GPU_BENCH)/results.md. Needs no prefect: on a bare machine `python benchmarks/gpu_suite.py --out DIR`.
GPU_BENCH ?= runs/gpu-bench
gpu-bench: install
	$(BIN)/python benchmarks/gpu_suite.py --out $(GPU_BENCH)

clean:
	rm -rf $(VENV) runs .pytest_cache
