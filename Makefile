# Two entry points: `make run` (the main job) and `make test`.
# Both create .venv on a fresh machine and install what is needed.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# Pinned so that pip takes the build this project is tested with.
TORCH  ?= torch==2.14.1 torchvision==0.29.1

.PHONY: run test install clean allocators

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH)
	$(PY) -m pip install --quiet -e '.[dev]' $(TORCH)
	touch $@

install: $(VENV)/.installed

# tcmalloc and jemalloc for the allocator tests and the profiler's --allocator (skipped when absent);
# installed only where apt-get runs as root, otherwise left to the reader.
allocators:
	-@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		dpkg -s libtcmalloc-minimal4 libjemalloc2 >/dev/null 2>&1 || \
		(apt-get update -qq && apt-get install -y -qq libtcmalloc-minimal4 libjemalloc2); fi

# The main job runs with tcmalloc when installed (DENSENET_ZOO_ALLOCATOR=default turns it off).
run: install
	$(PY) -c "import sys; from densenet_zoo.allocator import run_script; sys.exit(run_script(['examples/main_job.py']))"

# The numerics- and dtype-sensitive tests run a second time with ATen's and oneDNN's kernels capped at
# AVX2, so that a machine with AVX-512 (or AMX) also checks what an AVX2-only CPU computes. That run
# keeps torch.compile's kernels in a cache of its own: inductor's cache key does not include the ATen
# cap, and a kernel built under it aborts an uncapped process that finds it.
AVX2_CAP := ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2

test: install allocators
	$(PY) -m pytest -q
	cache=$$(mktemp -d) && TORCHINDUCTOR_CACHE_DIR=$$cache $(AVX2_CAP) $(PY) -m pytest -q -m numerics; \
		status=$$?; rm -rf "$$cache"; exit $$status

clean:
	rm -rf $(VENV) build *.egg-info
