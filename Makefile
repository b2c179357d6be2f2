VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install demo demo-video test lint table4-synthetic gpu-wheels gpu-check gpu-standin gpu-standin-check

# One install step for everything: the virtual environment, the pinned stack, this package (editable).
$(STAMP): requirements.txt setup.py
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.txt
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps -e .
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) datasets/prepare_synthetic.py --output datasets/synthetic
	$(PY) tools/train_net.py --config-file configs/synthetic/eomt_tiny_panoptic.yaml

# VidEoMT on the synthetic videos (datasets/prepare_synthetic_video.py): a tiny model from scratch,
# then its VPQ, mIoU / VC and VIS AP / AR (docs/video_training.md). One thread for the model:
# the loader's worker takes the other core (with 2 threads on 2 shared cores it was 10x slower).
demo-video: $(STAMP)
	$(PY) datasets/prepare_synthetic_video.py --output datasets/synthetic_video
	OMP_NUM_THREADS=1 $(PY) tools/train_net.py --config-file configs/synthetic/videomt_tiny.yaml

# The paper's Table 4 (mask annealing) on the synthetic data, 3 seeds, with the tiny model's CPU
# FPS with and without masking: docs/table4_synthetic.md. An interrupted sweep resumes.
TINY := configs/synthetic/eomt_tiny_panoptic.yaml
T4 := output/sweeps/table4_annealing_synthetic

table4-synthetic: $(STAMP)
	$(PY) datasets/prepare_synthetic.py --output datasets/synthetic
	$(PY) tools/sweep.py configs/sweeps/table4_annealing_synthetic.yaml
	$(PY) tools/benchmark.py --config-file $(TINY) model.masked_attn=always --fps \
		--iterations 50 --run masking_masking > $(T4)/benchmark.jsonl
	$(PY) tools/benchmark.py --config-file $(TINY) $(TINY) $(TINY) model.masked_attn=never --fps \
		--iterations 50 --run masking_no_masking no_masking_no_masking annealing_no_masking \
		>> $(T4)/benchmark.jsonl
	$(PY) tools/report.py $(T4) --benchmark $(T4)/benchmark.jsonl --output docs/table4_synthetic

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: lint
	$(VENV)/bin/pytest -q

# The GPU machine (its own python3 with PyTorch, no package registry): `make gpu-wheels` here
# puts what its image lacks into .whl/ (git-ignored; carried with the call), then
# `make gpu-check GPU_OUT=$$OUT` there installs it offline and runs tools/gpu_check.py.
# `make gpu-check DEVICE=cpu` is the dry run of every step at tiny sizes, in this venv.
DEVICE ?= cuda
GPU_OUT ?= output/gpu_check
GPU_SITE ?= /tmp/eomt_gpu_site

gpu-wheels: $(STAMP)
	$(PY) tools/gpu_check.py --build-wheels .whl

ifeq ($(DEVICE),cpu)
gpu-check: $(STAMP)
	$(PY) tools/gpu_check.py --device cpu --output $(GPU_OUT)
else
gpu-check:
	test -n "$$(ls .whl/*.whl 2>/dev/null)" || { echo "no .whl/: run make gpu-wheels first (needs PyPI)"; exit 1; }
	python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target $(GPU_SITE) .whl/*.whl
	PYTHONPATH=$(GPU_SITE):$(CURDIR) python3 tools/gpu_check.py --device cuda --output $(GPU_OUT)
endif

# A stand-in of the GPU machine's Python, here and without a GPU: CPython 3.12 with the image's
# torch, torchvision and triton from the package index, the image's packages that the GPU
# command needs (tools/gpu_environment.py lists them from its imports) and nothing else
# (checked after installing: made afresh each time), and .whl/ installed offline as the GPU
# machine installs it.
# `make gpu-standin-check` then runs the dry run in it: what fails there fails there too.
STANDIN ?= .standin
STANDIN_PY := $(STANDIN)/venv/bin/python
STANDIN_SITE := $(STANDIN)/carried
PYTHON_3_12 ?= /root/.pyenv/versions/3.12.1/bin/python
STANDIN_ENV := PYTHONPATH=$(STANDIN_SITE):$(CURDIR)
STANDIN_OUT ?= output/gpu_check_standin

gpu-standin: gpu-wheels
	rm -rf $(STANDIN) && $(PYTHON_3_12) -m venv $(STANDIN)/venv
	$(PY) -m tools.gpu_environment --standin-requirements > $(STANDIN)/requirements.txt
	$(STANDIN_PY) -m pip install -q --disable-pip-version-check -r $(STANDIN)/requirements.txt
	$(STANDIN_PY) -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target $(STANDIN_SITE) .whl/*.whl
	$(STANDIN_ENV) $(STANDIN_PY) -m tools.gpu_environment --check-installed

gpu-standin-check:
	test -x $(STANDIN_PY) || { echo "no stand-in: run make gpu-standin first"; exit 1; }
	$(STANDIN_ENV) $(STANDIN_PY) tools/gpu_check.py --device cpu --output $(STANDIN_OUT)
