# mm_megatron developer entry points. See README.md.
#   make install   create .venv (Python >= 3.12) and install mm_megatron[dev]
#   make test      lint + format check + the whole test suite (what .ci/run calls)
#   make test-fast the quick unit tests (no slow marker), for the edit-test loop
#   make demo      the main job on the embedded default (tiny preset, synthetic data, CPU)
PY := .venv/bin/python

.PHONY: install test test-fast lint format demo
install:
	bash tools/setup_env.sh

lint:
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format:
	$(PY) -m ruff format .
	$(PY) -m ruff check --fix .

test: lint
	$(PY) -m pytest -q --durations=30 tests

test-fast:
	$(PY) -m pytest -q -m "not slow" tests/unit

demo:
	$(PY) -m mm_megatron model summary --preset debug-tiny
