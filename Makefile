# The two commands that do everything on a fresh machine:
#   make demo   - the main job on its embedded defaults
#   make test   - the test suite
# and the long reliability run (about 10 min on 2 busy cores):
#   make soak   - load, repeated crashes, outage, SIGTERM, 10,000 fuzz cases; prints a summary table
# and the model (about 1 h on one free CPU core; every step resumes):
#   make model  - leave-one-subject-out folds, QC validation, the shipped bundle and its card
# and the benchmarks (figures, not pass/fail; about 15 min on 2 cores):
#   make bench  - latency, inference, ingest, concurrency, memory -> benchmarks/results/latest.{json,md}
#   make bench-reanalyse - archive re-analysis on a local Ray, 1 and 2 workers, and a 100,000-study plan (about 6 min)
# and the real-viewer check (OHIF 3.13.2 on Orthanc DICOMweb in headless chromium; about 4 min):
#   make test-viewer  - SEG, SR and PDF as OHIF shows them; screenshots in build/viewer/
#   make screenshots  - the same, then the README's docs/screenshots/*.png
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat requirements.txt requirements-runtime.txt | sha1sum | cut -c1-12)
NODE_STAMP := tests/js/node_modules/.installed
VIEWER_STAMP := tests/viewer/node_modules/.installed
DEMO_DIR ?= build/demo
# Holoscan wants a 32 MB stack.
RUN := ulimit -s 32768 2>/dev/null || true;

SOAK_ARGS ?=
BENCH_ARGS ?=

.PHONY: demo test soak bench bench-reanalyse venv clean-demo model test-viewer screenshots

venv: $(STAMP)

$(STAMP): requirements.txt requirements-runtime.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $$( [ -d /opt/wheels ] && echo --find-links /opt/wheels ) -r requirements.txt
	rm -f $(VENV)/.installed-*; touch $(STAMP)

$(NODE_STAMP): tests/js/package.json tests/js/package-lock.json
	npm ci --silent --prefix tests/js
	touch $(NODE_STAMP)

# The prebuilt OHIF viewer (npm @ohif/app dist/ only: the lock pins that one tarball).
$(VIEWER_STAMP): tests/viewer/package.json tests/viewer/package-lock.json
	npm ci --silent --ignore-scripts --no-audit --no-fund --prefix tests/viewer
	touch $(VIEWER_STAMP)

demo: venv
	$(RUN) $(PY) -m app demo --workdir $(DEMO_DIR)

test: venv $(NODE_STAMP)
	$(RUN) $(PY) -m pytest -q tests --ignore=tests/viewer

# Playwright drives the Debian chromium (/usr/bin/chromium); it never downloads a browser.
test-viewer: venv $(VIEWER_STAMP)
	$(RUN) PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 $(PY) -m pytest -q tests/viewer
	-@cat build/viewer/timings.json 2>/dev/null

screenshots: venv $(VIEWER_STAMP)
	$(RUN) PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 $(PY) -m tools.readme_screenshots

soak: venv
	$(RUN) $(PY) -m reliability.soak $(SOAK_ARGS)

# e.g. make bench BENCH_ARGS="--suites e2e,ingest --repeats 5" (README "Performance")
bench: venv
	$(RUN) $(PY) -m benchmarks $(BENCH_ARGS)

bench-reanalyse: venv
	$(RUN) $(PY) -m benchmarks.reanalyse $(REANALYSE_BENCH_ARGS)

model: venv
	PY=$(PY) bash training/reproduce_model.sh

clean-demo:
	rm -rf $(DEMO_DIR)

# The container image and the MAP (README "Deployment (container)", "Building the MAP"):
#   make image       - docker build of the node image (IMAGE, FLAVOUR=cpu|gpu, BASE_IMAGE; container/build-image.sh)
#   make test-image  - builds the image and exercises it: batch run, serve + health + C-STORE round trip,
#                      graceful stop, a broken image reported unhealthy, the MAP layout run on CPU
#                      (starts its own Docker engine when none answers; skips only where none can start)
#   make map         - monai-deploy package from a clean git archive export (MAP_TAG, MAP_SOURCE)
IMAGE ?= paraspinal-node:dev
FLAVOUR ?= cpu
.PHONY: image test-image map

image:
	IMAGE=$(IMAGE) FLAVOUR=$(FLAVOUR) container/build-image.sh

# No $(RUN) here: a Docker engine started by the test inherits the stack limit as its hard limit.
test-image: venv
	$(PY) -m pytest -q -rs -p no:cacheprovider container/test_image.py; status=$$?; \
	  cat build/image/figures.json 2>/dev/null; exit $$status

map: venv
	PY=$(PY) container/package-map.sh
