# Two entry points: `make run` (the main job) and `make test`.
# Both create .venv on a fresh machine and install what is needed.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# Pinned so that pip takes the build this project is tested with.
TORCH  ?= torch==2.14.1 torchvision==0.29.1

.PHONY: run test install clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH)
	$(PY) -m pip install --quiet -e '.[dev]' $(TORCH)
	touch $@

install: $(VENV)/.installed

run: install
	$(PY) examples/main_job.py

test: install
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) build *.egg-info
