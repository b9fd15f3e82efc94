# Every target sets itself up: a fresh machine needs only python3 (and nvcc for the CUDA extension).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU machines carry torch 2.13.0 as a local file; elsewhere override, e.g.
#   make test TORCH_SPEC='torch --index-url https://download.pytorch.org/whl/cpu'
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.tokenforge-installed
BUILD_INPUTS := setup.py pyproject.toml $(wildcard csrc/*)

.PHONY: test demo bench gpu-check install clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

# Editable install: Python changes need no reinstall; a change to csrc/ or setup.py rebuilds _C.
$(STAMP): $(PY) $(BUILD_INPUTS)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install --quiet $(TORCH_SPEC)
	$(PY) -m pip install --quiet "setuptools>=64" wheel "pybind11>=2.10" "ninja>=1.10"
	$(PY) -m pip install --quiet --no-build-isolation -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

# The whole suite, CPU or GPU: Triton kernels run under the interpreter when there is no GPU,
# benchmarks run once each as tests (timing disabled), the compile gate and the nvcc build run too.
test: $(STAMP)
	$(PY) -m pytest tests bench -q -ra --benchmark-disable

# The main job: what the kernels buy on this device (a short train --compare on the embedded corpus:
# tiny preset on a CPU, 125m on a GPU), then the cost model's seed table from those measurements.
demo: $(STAMP)
	$(PY) -m tokenforge info
	$(PY) bench/rms_norm_demo.py
	mkdir -p bench/results/latest
	$(PY) -m tokenforge train --compare --max-steps 30 --eval-every 0 --progress plain --json bench/results/latest/demo_compare.json
	$(PY) -m tokenforge cost --seed-table --from-results bench/results/latest/demo_compare.json

bench: $(STAMP)
	mkdir -p bench/results/latest
	# The report runs even when a benchmark fails: it is what flags a wrong kernel result as WRONG.
	$(PY) -m pytest bench -q --benchmark-json=bench/results/latest/benchmarks.json; rc=$$?; \
	$(PY) bench/report.py bench/results/latest/benchmarks.json --out-dir bench/results/latest; exit $$rc

# On a GPU machine (see ../shared/GPU.md): build for sm_90a, test on CUDA, benchmark, report.
gpu-check:
	bash bench/gpu_check.sh

clean:
	rm -rf build dist *.egg-info pysrc/*.egg-info pysrc/tokenforge/_C*.so pysrc/tokenforge/_build_info.json $(VENV)
