# `make demo` and `make test` create the virtual environment on first use.
PYTHON_BASE ?= python3
VENV ?= .venv
PYTHON := $(VENV)/bin/python
STAMP := $(VENV)/.installed
TINY_MODEL := .cache/tiny-sd3
TINY_FLUX := .cache/tiny-flux
TINY_FLUX2_KLEIN := .cache/tiny-flux2-klein
TINY_Z_IMAGE := .cache/tiny-z-image
TINY_QWEN_IMAGE := .cache/tiny-qwen-image

.PHONY: install demo test tiny-model clean

install: $(STAMP)

$(STAMP): requirements.txt setup.py
	test -x $(PYTHON) || $(PYTHON_BASE) -m venv $(VENV)
	$(PYTHON) -m pip install --quiet --upgrade pip setuptools wheel
	$(PYTHON) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

$(TINY_MODEL)/model_index.json: | $(STAMP)
	$(PYTHON) -m flow_grpo.testing $(TINY_MODEL) --family sd3 --geometry minimal

$(TINY_FLUX)/model_index.json: | $(STAMP)
	$(PYTHON) -m flow_grpo.testing $(TINY_FLUX) --family flux --geometry minimal

$(TINY_FLUX2_KLEIN)/model_index.json: | $(STAMP)
	$(PYTHON) -m flow_grpo.testing $(TINY_FLUX2_KLEIN) --family flux2_klein --geometry minimal

$(TINY_Z_IMAGE)/model_index.json: | $(STAMP)
	$(PYTHON) -m flow_grpo.testing $(TINY_Z_IMAGE) --family z_image --geometry minimal

$(TINY_QWEN_IMAGE)/model_index.json: | $(STAMP)
	$(PYTHON) -m flow_grpo.testing $(TINY_QWEN_IMAGE) --family qwen_image --geometry minimal

tiny-model: $(TINY_MODEL)/model_index.json $(TINY_FLUX)/model_index.json $(TINY_FLUX2_KLEIN)/model_index.json \
	$(TINY_Z_IMAGE)/model_index.json $(TINY_QWEN_IMAGE)/model_index.json

demo: $(STAMP) $(TINY_MODEL)/model_index.json
	OMP_NUM_THREADS=1 $(PYTHON) train_sd3.py --config=config/grpo.py:tiny_tp_grpo --config.run_name=demo-$$(date +%Y%m%d-%H%M%S)

# Test processes (pytest-xdist): each runs single-threaded, so two fill a 2-core machine.
TEST_WORKERS ?= 2

test: $(STAMP)
	OMP_NUM_THREADS=1 $(PYTHON) -m pytest -q -n $(TEST_WORKERS) tests

clean:
	rm -rf $(VENV) .cache logs
