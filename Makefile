# Two commands from a fresh clone:  make demo  (install, then score examples/ with the shipped model)
#                                   make test  (install with the test extras, then run the test suite)
# Each creates the virtual environment in $(VENV) when it is missing.
#
# torch comes first, from TORCH_INDEX when one is given: on a machine without a GPU, use PyTorch's CPU
# wheel index (make demo TORCH_INDEX=https://download.pytorch.org/whl/cpu); without it, pip's default
# index gives the CUDA build on Linux (several GB).
VENV ?= .venv
PYTHON ?= python3
TORCH ?= torch==2.13.0
TORCH_INDEX ?=
PY := $(VENV)/bin/python
INDEX := $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX),)

.PHONY: demo test
demo: $(VENV)/.installed
	$(VENV)/bin/radscan score examples/studies --out out/report.csv
	@echo "open out/report.html (the worklist page); CSVs: out/report_studies.csv, out/report.csv; pictures: out/report_residuals/"

test: $(VENV)/.installed-dev
	$(PY) -m pytest -q

# the demo needs radscan and the image codecs; the tests also need the dev extras (pytest, hypothesis,
# Playwright, ruff, and the pacs and dask extras): a user trying the demo does not install them
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(INDEX) "$(TORCH)"
	$(PY) -m pip install --quiet -e '.[torch,codecs]'
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed
	$(PY) -m pip install --quiet -e '.[dev,codecs]'
	touch $@
