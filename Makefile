# Thin wrappers: each target is one script or command. `make help` lists them.
SHELL := /bin/bash
VENV := .venv
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
export DVC_NO_ANALYTICS := true

.PHONY: help setup demo demo-digits test ui stop bench clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/'

setup:  ## create .venv with the pinned environment (idempotent)
	@scripts/setup_env.sh

demo: setup  ## run the whole pipeline on the default data (dvc repro), then show the metrics
	dvc repro && python -m flows.summary

demo-digits: setup  ## the whole pipeline on 8x8 digits images (profiles/digits.yaml through DVC); back: git checkout params.yaml
	python -m flows.profile digits && python -m flows.summary

test: setup  ## run the test suite
	python -m pytest $(PYTEST_ARGS)

ui: setup  ## Prefect UI + MLflow UI (127.0.0.1) and the pipeline deployments; prints the URLs, Ctrl-C stops all
	@scripts/ui.sh

stop:  ## stop the project-local Prefect server started by stage runs
	python -m flows server stop

bench: setup  ## run every benchmark (benchmarks/run_all.py; results in benchmarks/results/*.json); hours on a CPU
	python benchmarks/run_all.py

clean:  ## remove every pipeline output (dvc.yaml outs and metrics, run records, checkpoints), listing each
	python -m flows.clean
