# Every target sets itself up: a fresh machine needs only python3 (and nvcc for the CUDA extension).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU machines carry torch 2.13.0 as a local file; elsewhere override, e.g.
#   make test TORCH_SPEC='torch --index-url https://download.pytorch.org/whl/cpu'
TORCH_SPEC ?= torch==2.13.0
CUTLASS_SPEC ?= nvidia-cutlass==4.2.0.0
STAMP := $(VENV)/.tokenforge-installed
BUILD_INPUTS := setup.py pyproject.toml $(wildcard csrc/*)

# The GPU machine runs triton 3.6: the compile gate runs a second time under it (sm_90, the GPU
# machine's architecture), from a --target folder put ahead of the venv's own triton.
TRITON_GPU_SPEC ?= triton==3.6.0
TRITON36 := $(VENV)/triton36
TRITON36_STAMP := $(TRITON36)/.installed

.PHONY: test test-suite gate-triton36 gpu-check-dry demo bench gpu-check install clean prebuild-ext fetch-peers

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

# Editable install: Python changes need no reinstall; a change to csrc/ or setup.py rebuilds _C.
$(STAMP): $(PY) $(BUILD_INPUTS)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install --quiet $(TORCH_SPEC)
	$(PY) -m pip install --quiet "setuptools>=64" wheel "pybind11>=2.10" "ninja>=1.10"
	# CUTLASS/CuTe headers for csrc/*_sm90.cu; headers only, so not its Python deps (cuda-python, scipy).
	$(PY) -m pip install --quiet --no-deps "$(CUTLASS_SPEC)"
	$(PY) -m pip install --quiet --no-build-isolation -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

# The whole suite, CPU or GPU: Triton kernels run under the interpreter when there is no GPU,
# benchmarks run once each as tests (timing disabled), the compile gate and the nvcc build run too;
# then the compile gate under the GPU machine's triton 3.6, and gpu_check.sh's dry run (every test
# and benchmark id it names exists, every command line runs), so the GPU script cannot rot.
test: test-suite gate-triton36 gpu-check-dry

# Two pytest-xdist workers, work-stealing: most of the suite is the Triton interpreter, one Python
# thread per process, so one process leaves a 2-core CI machine's second core idle (64 min serial,
# stop 36). On a GPU machine more workers would share one GPU: keep it small there too.
TEST_WORKERS ?= 2
XDIST := -n $(TEST_WORKERS) --dist worksteal

test-suite: $(STAMP)
	$(PY) -m pytest tests bench -q -ra --benchmark-disable $(XDIST)

$(TRITON36_STAMP): $(PY)
	rm -rf $(TRITON36)
	$(PY) -m pip install --quiet --no-deps --target $(TRITON36) "$(TRITON_GPU_SPEC)" "numpy<2.4"
	touch $(TRITON36_STAMP)

gate-triton36: $(STAMP) $(TRITON36_STAMP)
	PYTHONPATH=$(TRITON36) TRITON_INTERPRET=0 TOKENFORGE_GATE_ARCHS=sm_90 \
	  $(PY) -m pytest tests -q -p no:cacheprovider -m compile_gate $(XDIST)
	PYTHONPATH=$(TRITON36) $(PY) -c "import triton; assert triton.__version__.startswith('3.6'), triton.__version__; print('compile gate ran under triton', triton.__version__)"

gpu-check-dry: $(STAMP)
	PYTHON=$(PY) OUT=$(CURDIR)/bench/results/latest/dry-run bash bench/gpu_check.sh --dry-run

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

# On a GPU machine (bench/README.md): install, CUDA tests, headline benchmarks, e2e, report.
gpu-check:
	bash bench/gpu_check.sh

# Before a GPU lease, here: tokenforge._C for the GPU machine's Python 3.12 and sm_90a (.prebuilt/),
# and the peers' wheels (.whl/); both folders are git-ignored and travel with the device tool's carry.
prebuild-ext:
	bash bench/prebuild_ext.sh

fetch-peers:
	bash bench/fetch_peers.sh

clean:
	rm -rf build dist *.egg-info pysrc/*.egg-info pysrc/tokenforge/_C*.so pysrc/tokenforge/_build_info.json $(VENV)
