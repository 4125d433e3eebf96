# Every target creates .venv when it is missing and (re)installs requirements.txt when it changed
# (the installed file's hash is kept in .venv/.requirements.sha256), so a second run is quick.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.requirements.sha256

.PHONY: setup demo test test-slow op help

help:
	@echo "make demo   train + evaluate Deformable-DETR and KS-Deformable-DETR on the synthetic data set (CPU, about 8 min)"
	@echo "make test   run the test suite (CPU)"
	@echo "make setup  create .venv and install requirements.txt"
	@echo "make op     build the MSDeformAttn CUDA extension (needs nvcc; TORCH_CUDA_ARCH_LIST picks the GPUs)"

$(PY):
	$(PYTHON) -m venv $(VENV)

setup: | $(PY)
	@want=$$(sha256sum requirements.txt | cut -d' ' -f1); \
	if [ "$$want" != "$$(cat $(STAMP) 2>/dev/null)" ]; then \
	  echo "installing requirements.txt into $(VENV)"; \
	  $(PY) -m pip install --quiet --disable-pip-version-check -r requirements.txt && echo $$want > $(STAMP); \
	fi

# Trains both demo rows (a finished row is skipped, an interrupted one resumes), then regenerates
# the demo table, the demo Fig. 4 and the pictures of the KS row (detections, attention).
demo: setup
	$(PY) -m experiments run demo --resume
	$(PY) -m analysis tables --manifest demo
	$(PY) -m analysis fig4 --manifest demo --row ks_def_r18
	$(PY) -m analysis show --manifest demo --row ks_def_r18
	$(PY) -m analysis attention --manifest demo --row ks_def_r18

test: setup
	$(PY) -m pytest -q

test-slow: setup
	$(PY) -m pytest -q -m slow

op: setup
	$(PY) -m models.ops.ms_deform_attn.build
