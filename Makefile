# Every target creates .venv when it is missing and (re)installs requirements.txt when it changed
# (the installed file's hash is kept in .venv/.requirements.sha256), so a second run is quick.
# `make test` and `make test-slow` also install requirements-test.txt (pytest, ruff, transformers) the
# same way (hash of both files in .venv/.requirements-test.sha256); demo, setup and op do not.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP      := $(VENV)/.requirements.sha256
TEST_STAMP := $(VENV)/.requirements-test.sha256

.PHONY: setup setup-test demo test test-slow op gpu-check help

help:
	@echo "make demo        train + evaluate Deformable-DETR and KS-Deformable-DETR on the synthetic data set (2 CPU cores, 8-15 min by CPU kind)"
	@echo "make test        lint with ruff, then run the test suite (CPU; installs requirements-test.txt too)"
	@echo "make test-slow   run the slow tests (installs requirements-test.txt too)"
	@echo "make setup       create .venv and install requirements.txt"
	@echo "make setup-test  make setup, then install requirements-test.txt (pytest, ruff, transformers)"
	@echo "make op          build the MSDeformAttn CUDA extension (needs nvcc; TORCH_CUDA_ARCH_LIST picks the GPUs)"
	@echo "make gpu-check   every GPU check in one go, within 9 minutes (results/gpu_check/<date>-<gpu>/)"

$(PY):
	$(PYTHON) -m venv $(VENV)

# $(call install,FILE,HASHED FILES,STAMP): pip-install FILE into .venv unless STAMP holds the
# sha256 of HASHED FILES (written only after a successful install).
define install
	@want=$$(cat $(2) | sha256sum | cut -d' ' -f1); \
	if [ "$$want" != "$$(cat $(3) 2>/dev/null)" ]; then \
	  echo "installing $(1) into $(VENV)"; \
	  $(PY) -m pip install --quiet --disable-pip-version-check -r $(1) && echo $$want > $(3); \
	fi
endef

setup: | $(PY)
	$(call install,requirements.txt,requirements.txt,$(STAMP))

# requirements-test.txt includes requirements.txt, so a change to either file reinstalls it.
setup-test: setup
	$(call install,requirements-test.txt,requirements.txt requirements-test.txt,$(TEST_STAMP))

# Trains both demo rows (a finished row is skipped, an interrupted one resumes), then regenerates
# the demo table, the demo Fig. 4 and the pictures of the KS row (detections, attention).
demo: setup
	$(PY) -m experiments run demo --resume
	$(PY) -m analysis tables --manifest demo
	$(PY) -m analysis fig4 --manifest demo --row ks_def_r18
	$(PY) -m analysis show --manifest demo --row ks_def_r18
	$(PY) -m analysis attention --manifest demo --row ks_def_r18

# the linter first (ruff.toml: pyflakes, pycodestyle, blind excepts), then the tests
test: setup-test
	$(PY) -m ruff check .
	$(PY) -m pytest -q

test-slow: setup-test
	$(PY) -m pytest -q -m slow

op: setup
	$(PY) -m models.ops.ms_deform_attn.build

# every GPU check in one go (benchmarks/gpu_check.py); pytest runs the op's cuda tests
gpu-check: setup-test
	$(PY) -m benchmarks.gpu_check
