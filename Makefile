# pix2pix_dist: every target sets up the project virtualenv on first use, then reuses it.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

SOURCE ?= sample
# shards/<folder or zip name>: only the archive suffix sources.py reads (.zip) is stripped, so
# SOURCE=coco.v2 (a folder) gives shards/coco.v2.
NAME   ?= $(notdir $(patsubst %.zip,%,$(patsubst %.ZIP,%,$(SOURCE:%/=%))))
SHARDS ?= shards/$(NAME)
RESIZE ?=
LIMIT  ?=
PRESET ?=
RUN    ?= runs/demo
ARGS   ?=

# GPUs visible here (0 without nvidia-smi): `make train` uses all of them.
NGPUS := $(shell nvidia-smi -L 2>/dev/null | grep -c '^GPU')

.PHONY: help setup train eval test shards bench clean

help:
	@echo "make train   train (demo on the bundled sample shards unless SHARDS=... PRESET=...)"
	@echo "make eval    colorization metrics of a run vs the gray baseline (RUN=runs/demo, SHARDS=its own)"
	@echo "make test    run the test suite"
	@echo "make shards  images -> WebDataset shards (SOURCE=/data/coco/train2017, default: sample photos)"
	@echo "make bench   reference vs our training step end to end + input pipelines (benchmarks/results/)"
	@echo "make clean   remove the virtualenv, caches, runs and built shards"

setup: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

shards/sample/manifest.json: | $(STAMP)
	$(PY) -m pix2pix_dist.shards --source sample --output shards/sample

shards: $(STAMP)
	$(PY) -m pix2pix_dist.shards --source $(SOURCE) --output $(SHARDS) \
		$(if $(RESIZE),--resize $(RESIZE)) $(if $(LIMIT),--limit $(LIMIT)) $(ARGS)

# The demo ends with its eval table (model vs gray baseline); other runs: `make eval RUN=...`.
train: $(STAMP) $(if $(filter shards/sample,$(SHARDS)),shards/sample/manifest.json)
ifeq ($(NGPUS),0)
	$(PY) train.py --preset $(or $(PRESET),cpu-demo) $(if $(filter shards/sample,$(SHARDS)),,data.shards=$(SHARDS)) $(ARGS)
else
	$(VENV)/bin/accelerate launch --config_file launch/gpu.yaml --num_processes $(NGPUS) \
		$(if $(filter-out 1,$(NGPUS)),--multi_gpu) \
		train.py --preset $(or $(PRESET),gpu-demo) $(if $(filter shards/sample,$(SHARDS)),,data.shards=$(SHARDS)) $(ARGS)
endif
	$(if $(PRESET)$(ARGS),,$(PY) -m pix2pix_dist.evaluate runs/demo --gallery 4)

# Every GPU when there are several; --shards only when SHARDS is given.
eval: $(STAMP)
ifeq ($(filter-out 0 1,$(NGPUS)),)
	$(PY) -m pix2pix_dist.evaluate $(RUN) $(if $(filter command line environment,$(origin SHARDS)),--shards $(SHARDS)) $(ARGS)
else
	$(VENV)/bin/accelerate launch --config_file launch/gpu.yaml --num_processes $(NGPUS) --multi_gpu \
		-m pix2pix_dist.evaluate $(RUN) $(if $(filter command line environment,$(origin SHARDS)),--shards $(SHARDS)) $(ARGS)
endif

test: $(STAMP)
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) -m pix2pix_dist.bench $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info runs wandb shards/*/
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
