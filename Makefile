# The README's two commands: `make demo` (install and run the CPU demo) and `make test`
# (install everything, including the torch references, and run every test).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: demo test lint lessons lessons-open student bench gpu-check docs serve browser clean

$(VENV)/.runtime: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e .
	touch $@

$(VENV)/.dev: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev,reference,docs]'
	touch $(VENV)/.runtime $(VENV)/.docs $@

demo: $(VENV)/.runtime
	$(PY) -m minimask demo

test: $(VENV)/.dev
	$(PY) -m ruff check minimask tests
	$(PY) -m pytest

lint: $(VENV)/.dev
	$(PY) -m ruff check minimask tests
	$(PY) -m ruff format --check minimask tests

# Re-run every lesson in place, outputs and pictures included (each runs with lessons/ as its cwd).
lessons: $(VENV)/.dev
	$(VENV)/bin/jupyter nbconvert --to notebook --execute --inplace \
		--ExecutePreprocessor.timeout=120 --ExecutePreprocessor.record_timing=False \
		--ExecutePreprocessor.store_widget_state=False lessons/*.ipynb

# JupyterLab on the lessons, in the project's environment (the `lessons` extra: jupyterlab and
# ipywidgets, for the sliders of lessons 3, 4 and 7).
$(VENV)/.lessons: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[lessons]'
	touch $(VENV)/.runtime $@

lessons-open: $(VENV)/.lessons
	$(VENV)/bin/jupyter lab lessons/

# The student edition: every solution replaced by `raise NotImplementedError()`, answers' outputs
# cleared (minimask/lessons_tool.py), written to build/student/.
student: $(VENV)/.runtime
	$(PY) -m minimask.lessons_tool student lessons build/student

bench: $(VENV)/.dev
	$(PY) -m minimask.bench conv
	$(PY) -m minimask.bench ops

# On a machine with an NVIDIA GPU: install the gpu extra, then run the GPU tests, the GPU
# benchmark and a timed 300-iteration COCO-mini training, into one report,
# runs/gpu-check/report.md (docs/benchmarks.md, "GPU"). A Python that already has CuPy and CUDA
# torch can skip the install: `make gpu-check GPU_PYTHON=python3`.
GPU_PYTHON ?=
COCO_MINI ?= ../shared/data/coco-mini

$(VENV)/.gpu: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[gpu,dev,reference]'
	touch $(VENV)/.runtime $(VENV)/.dev $@

gpu-check: $(if $(GPU_PYTHON),,$(VENV)/.gpu)
	$(or $(GPU_PYTHON),$(PY)) -m minimask.bench.gpu_check --coco-root $(COCO_MINI)

# The course website (docs/site.md): `make docs` builds docs/ and lessons/ into site/ without the
# network; `make serve` previews it at http://127.0.0.1:8000 and rebuilds on every edit. `docs`
# also installs Chromium and its driver (Debian's packages; needs root) for tests/test_site.py.
$(VENV)/.docs: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[docs]'
	touch $(VENV)/.runtime $@

docs: $(VENV)/.docs browser
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build
	@echo "built site/: open site/index.html, or run make serve"

serve: $(VENV)/.docs
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs serve

browser:
	@if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
			apt-get install -y -qq chromium chromium-driver >/dev/null; \
	else \
		echo "chromium and chromium-driver are missing: tests/test_site.py will skip its browser checks"; \
	fi

clean:
	rm -rf $(VENV) runs site .pytest_cache .hypothesis
