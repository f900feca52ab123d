# cellseg-kfp: `make help` lists the targets.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
OUT ?= out
PREVIEW ?= 4

.PHONY: help setup data convert test lint format bench lock compile pipeline-run schedule \
	unschedule compare serve serve-kserve mlflow-ui images push base-image deploy clean bench-gpu \
	gpu-wheels quality crds doctor mlflow-user

CRON ?= 0 0 3 * * 1
REGISTRY ?= registry.example.com/cellseg
GIT_SHA := $(shell git rev-parse --short HEAD 2>/dev/null || echo dev)
IMAGE_REF ?= $(REGISTRY)/cellseg-kfp:$(GIT_SHA)
OVERLAY ?= generic-gpu
# the data of a DVC data repository at a revision (docs/data.md), instead of the volume
DATA_ARGS = $(if $(DATA_REPO),--data-repo $(DATA_REPO)) $(if $(DATA_REV),--data-rev $(DATA_REV))
MLFLOW_PORT ?= 5000

help: ## List the targets, one line each
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z_-]+:.*## / {printf "  %-14s %s\n", $$1, $$2}' $(MAKEFILE_LIST)

$(STAMP): pyproject.toml requirements.lock
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -c requirements.lock -e '.[test]'
	@touch $@

setup: $(STAMP) ## Create .venv and install the project with its test extras (once)

data: setup ## Obtain raw BCCD into data/BCCD (from BCCD_MIRROR if set) and verify it against data.dvc
	$(BIN)/cellseg data

convert: data ## Convert data/BCCD into the instance-segmentation dataset under out/dataset
	$(BIN)/cellseg convert --source data/BCCD --out $(OUT)/dataset --preview $(PREVIEW)

compile: setup ## Compile the pipeline to pipelines/cellseg_pipeline.yaml (IMAGE=... for a cluster)
	$(BIN)/python -m pipelines.compile $(if $(IMAGE),--image $(IMAGE))

pipeline-run: setup ## The whole pipeline: locally (kfp.local, CPU; RUNNER=container: in the image; PORTABLE=1: AVX2 kernels) or, with KFP_HOST, on the cluster
ifdef KFP_HOST
	IMAGE="$${IMAGE:-$(IMAGE_REF)}" $(BIN)/python -m pipelines.submit run $(DATA_ARGS)
else
	$(MAKE) --no-print-directory data
	$(BIN)/python -m pipelines.run_local --source data/BCCD --pipeline-root $(OUT)/kfp \
		$(if $(filter container,$(RUNNER)),--runner container --image $(IMAGE_REF)) \
		$(if $(PORTABLE),--portable-kernels)
endif

schedule: setup ## Weekly retraining on KFP_HOST: CRON="0 0 3 * * 1" (6 fields, seconds first), @weekly, "@every 168h"; DATA_REPO=, DATA_REV=branch
	IMAGE="$${IMAGE:-$(IMAGE_REF)}" $(BIN)/python -m pipelines.submit schedule --cron "$(CRON)" $(DATA_ARGS)

unschedule: setup ## Remove the scheduled retraining from KFP_HOST
	$(BIN)/python -m pipelines.submit unschedule

compare: setup ## Compare the last pipeline runs and registry versions (RUNS=A,B: two side by side)
	$(BIN)/cellseg compare $(if $(RUNS),--runs $(RUNS))

MODEL ?= models:/cellseg@champion
SERVE_PORT ?= 5001
serve: setup ## Serve MODEL (default: the champion) over HTTP on 127.0.0.1:$(SERVE_PORT)
	PATH="$(CURDIR)/$(BIN):$$PATH" MLFLOW_TRACKING_URI="$${MLFLOW_TRACKING_URI:-sqlite:///$(CURDIR)/mlruns/mlflow.db}" \
		$(BIN)/mlflow models serve -m "$(MODEL)" --env-manager local --host 127.0.0.1 --port $(SERVE_PORT)

serve-kserve: setup ## Serve MODEL with the server KServe runs (V2 + V1, python -m cellseg.serving) on port $(SERVE_PORT)
	MLFLOW_TRACKING_URI="$${MLFLOW_TRACKING_URI:-sqlite:///$(CURDIR)/mlruns/mlflow.db}" \
		$(BIN)/python -m cellseg.serving --model_dir "$(MODEL)" --model_name cellseg \
		--http_port $(SERVE_PORT) --enable_grpc false

mlflow-ui: setup ## Serve the embedded MLflow store on http://127.0.0.1:5000 (MLFLOW_PORT=...)
	$(BIN)/mlflow ui --host 127.0.0.1 --port $(MLFLOW_PORT) \
		--backend-store-uri sqlite:///$(CURDIR)/mlruns/mlflow.db \
		--default-artifact-root $(CURDIR)/mlruns/artifacts

lint: setup ## Ruff lint and format check
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: setup ## Apply ruff fixes and formatting
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

test: lint ## Lint, then run the whole test suite
	$(BIN)/pytest

bench: data ## Print the benchmarks (conversion rate, ..., serving over HTTP; SECTION=serving: that one)
	$(BIN)/python -m benchmarks.bench $(if $(SECTION),--only $(SECTION))

quality: data ## Train PROFILE (default local) from scratch: val/test box AP@0.5 per class, minutes (SET="k=v ...", TUNE=1)
	$(BIN)/python -m benchmarks.quality --source data/BCCD --profile $(or $(PROFILE),local) \
		$(foreach kv,$(SET),--set $(kv)) $(if $(TUNE),--tune) $(if $(PORTABLE),--portable-kernels)

bench-gpu: data ## The whole GPU check on a CUDA machine, JSON in out/gpu-check/ (QUICK=1: CPU dry run)
	$(BIN)/python -m benchmarks.gpu_check --source data/BCCD --out $(OUT)/gpu-check $(if $(QUICK),--quick)

# What a bare GPU box with Python 3.12 and torch lacks for the training path (versions as locked).
GPU_WHEELS := pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 \
	albumentations==2.0.8 albucore==0.0.24 simsimd==6.5.16 stringzilla==5.3.2 pycocotools==2.0.11
gpu-wheels: setup ## Download those wheels into .whl/ (cp312, manylinux) to carry to such a box
	$(BIN)/python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
		--implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
		--platform manylinux2014_x86_64 -d .whl $(GPU_WHEELS)

lock: setup ## Re-resolve requirements.lock from pyproject.toml (needs network)
	$(BIN)/python -m pip install -q uv
	$(BIN)/uv pip compile pyproject.toml --python-version 3.11 \
		--python-platform x86_64-manylinux_2_28 --no-header --annotation-style line \
		-o requirements.lock

LOCAL_BASE ?= localhost/debian-python:3.11
images: setup ## Build the project image (docker, else podman, else buildah; CONTAINER_ENGINE=, BASE_IMAGE=) and print its figures
	$(BIN)/python -m images.build build --tag $(IMAGE_REF) $(if $(BASE_IMAGE),--base $(BASE_IMAGE)) \
		$(if $(CONTAINER_ENGINE),--engine $(CONTAINER_ENGINE))
	@echo "next: make push  (then make compile IMAGE=$(IMAGE_REF), or IMAGE=$(IMAGE_REF) make pipeline-run)"

push: setup ## Push the image built by `make images` to REGISTRY
	$(BIN)/python -m images.build push --tag $(IMAGE_REF) $(if $(CONTAINER_ENGINE),--engine $(CONTAINER_ENGINE))

base-image: ## A local stand-in base (Debian bookworm minbase, Python 3.11) for offline builds: $(LOCAL_BASE)
	@mkdir -p $(OUT)  # mmdebstrap refuses a target whose folder is missing (a clean clone has no out/)
	mmdebstrap --variant=minbase --include=python3,python3-venv,python3-pip,ca-certificates,passwd \
		bookworm $(abspath $(OUT))/base.tar "deb http://deb.debian.org/debian bookworm main" \
		"deb http://deb.debian.org/debian bookworm-updates main" \
		"deb http://deb.debian.org/debian-security bookworm-security main"
	ctr=$$(buildah from scratch) && mnt=$$(buildah mount $$ctr) && tar -xf $(OUT)/base.tar -C $$mnt \
		&& buildah umount $$ctr && buildah config --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
		--cmd /bin/bash $$ctr && buildah commit -q $$ctr $(LOCAL_BASE) && buildah rm $$ctr >/dev/null
	rm -f $(OUT)/base.tar
	@echo "next: make images BASE_IMAGE=$(LOCAL_BASE)"

crds: setup ## Download the pinned upstream CRDs the tests validate against (checksums) into ~/.cache/cellseg/crds
	$(BIN)/python -m tests.crds

doctor: setup ## Check the cluster against the requirements, one line each (ENGINE=trainjob, QUEUE=..., NAMESPACE=..., SERVICE=...)
	$(BIN)/cellseg doctor $(if $(ENGINE),--training-engine $(ENGINE)) $(if $(QUEUE),--queue-name $(QUEUE)) \
		$(if $(NAMESPACE),--namespace $(NAMESPACE)) $(if $(SERVICE),--inference-service $(SERVICE))

mlflow-user: setup ## mlflow-team: create the pipeline's MLflow user from its Secret, as the admin (MLFLOW_TRACKING_URI=http://localhost:5000 after a port-forward)
	$(BIN)/cellseg mlflow-user $(if $(NAMESPACE),--namespace $(NAMESPACE))

deploy: setup ## Apply the cluster manifests (OVERLAY=generic-gpu|gke-h100|kueue|kubeflow) with kubectl
	$(BIN)/kubectl apply -k manifests/overlays/$(OVERLAY)

clean: ## Remove outputs (keeps .venv and data/)
	rm -rf $(OUT) .pytest_cache .ruff_cache
