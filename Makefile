# LoSA-TAL entry points. Everything runs inside .venv, which `make setup` creates on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

DATASET ?= thumos
CONFIG ?= configs/train/thumos_vitg_losa.json
# losa or head_only (the baseline: the LoSA recipe without adapters); empty: the config's.
MODEL ?=
SEED ?= 0
# Optional overrides; empty means "the preset's or config's own value".
VIDEOS ?=
CKPT ?=
STORE ?=
ANNOTATIONS ?=
OUT ?=

.PHONY: setup test test-fast demo extract train bench gpu-check gpu-check-rehearsal clean

setup: $(STAMP)

# Re-installs when the dependency list changes.
$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test,plots,demo]'
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest

# The quick subset, about 2 minutes on 2 shared cores at load 5: skips what is marked slow (the
# end-to-end trainings, the crash/resume and hostile-input campaigns, the multi-process runs).
test-fast: $(STAMP)
	$(PY) -m pytest -m "not slow"

demo: $(STAMP)
	$(PY) cli.py demo --out demo_out --seed $(SEED) $(if $(CKPT),--checkpoint "$(CKPT)")

extract: $(STAMP)
	$(PY) cli.py extract --preset $(DATASET) \
		$(if $(VIDEOS),--videos "$(VIDEOS)") $(if $(CKPT),--checkpoint "$(CKPT)") \
		$(if $(STORE),--out "$(STORE)") $(if $(ANNOTATIONS),--annotations "$(ANNOTATIONS)")

train: $(STAMP)
	$(PY) cli.py train --config $(CONFIG) $(if $(MODEL),--model $(MODEL)) \
		$(if $(STORE),--store "$(STORE)") $(if $(ANNOTATIONS),--annotations "$(ANNOTATIONS)") \
		$(if $(OUT),--out "$(OUT)")

bench: $(STAMP)
	$(PY) bench/eval_speed.py
	$(PY) bench/extract.py
	$(PY) bench/train.py
	$(PY) bench/loader.py

# The GPU check (docs/gpu_check.md): about 6 minutes on one H100 (estimated), a reduced version
# at toy sizes without CUDA; figures in gpu_check_out/summary.json. On a bare GPU machine
# without this venv, docs/gpu_check.md gives the one command to run there.
gpu-check: $(STAMP)
	PY=$(PY) bench/gpu_check.sh --out gpu_check_out

# The reduced check as the bare GPU machine would run it: only its packages importable
# (bench/offline/gpu_machine_packages.txt) plus what the wheels bring.
gpu-check-rehearsal: $(STAMP)
	PY=$(PY) bench/gpu_check.sh --rehearse --out gpu_check_out

clean:
	rm -rf demo_out .pytest_cache .hypothesis
