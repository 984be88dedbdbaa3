# Owns the virtual environments. `make demo` runs the embedded CPU default, `make test` the whole suite.
PYTHON ?= python3.11
# A working python3.12: on PATH, or one that pyenv has installed but not activated.
PYTHON312 ?= $(shell for p in $$(command -v python3.12) /root/.pyenv/versions/3.12*/bin/python3.12; do \
	"$$p" -c 'import sys; assert sys.version_info[:2] == (3, 12)' >/dev/null 2>&1 && echo "$$p" && break; done)
VENV ?= .venv
VENV312 ?= .venv312
PY := $(VENV)/bin/python

.PHONY: venv environments demo test test-main test-loop test-megatron-019 test-megatron-019-then-loop clean

$(VENV)/.installed: setup.py launch/sglang-cpu-requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	# The CPU torch wheel this machine provides; a bare `torch` would pull a multi-GB CUDA build.
	$(VENV)/bin/pip install -q torch==2.13.0
	# SGLang, lean: its dependencies without its torch==2.14.1 (CUDA) pin, then SGLang itself with --no-deps.
	echo 'torch==2.13.0' > $(VENV)/torch-pin.txt
	$(VENV)/bin/pip install -q -c $(VENV)/torch-pin.txt -r launch/sglang-cpu-requirements.txt
	$(VENV)/bin/pip install -q --no-deps sglang==0.5.23
	$(VENV)/bin/pip install -q -c $(VENV)/torch-pin.txt -e '.[test]'
	touch $@

venv: $(VENV)/.installed

demo: venv
	$(PY) -m alp_megatron.demo

# The environments are built once; then two lanes run side by side (a leg keeps about 1.4 of 2 cores busy:
# gloo ranks wait on each other and on servers), their output kept apart. Lane 1: every test of the main
# environment but the loop's end-to-end runs. Lane 2: the megatron-core 0.19.x leg, then those runs (the
# longest tests), so that the two lanes end together rather than one running alone at the end.
test:
	$(MAKE) environments
	$(MAKE) -j2 -Otarget test-main test-megatron-019-then-loop

# A failure in either keeps the other from being skipped; the lane fails if either did.
test-megatron-019-then-loop:
	@status=0; $(MAKE) test-megatron-019 || status=$$?; $(MAKE) test-loop || status=$$?; exit $$status

# Both environments at once: each is a mostly single-threaded pip, so side by side they take the time of one.
environments:
	$(MAKE) -j2 -Otarget $(VENV)/.installed $(if $(PYTHON312),$(VENV312)/.installed)

LOOP_TESTS = tests/run/test_rl_loop.py

test-main: venv
	$(PY) -m pytest -q --durations=25 --ignore=$(LOOP_TESTS)

test-loop: venv
	$(PY) -m pytest -q --durations=15 $(LOOP_TESTS)

# The Megatron tests again on the newest supported megatron-core (0.19.x needs Python >= 3.12, and
# PyPI has only a CUDA torch build for it, which runs on CPU); not those that need SGLang (absent there) or
# that test this project's own data path rather than megatron-core's API (marked plumbing).
$(VENV312)/.installed: setup.py
	$(PYTHON312) -m venv $(VENV312)
	$(VENV312)/bin/pip install -q --upgrade pip
	$(VENV312)/bin/pip install -q torch==2.13.0 'megatron-core>=0.19,<0.20'
	$(VENV312)/bin/pip install -q -e '.[test]'
	touch $@

test-megatron-019:
	@if [ -n "$(PYTHON312)" ]; then \
		$(MAKE) $(VENV312)/.installed && \
		$(VENV312)/bin/python -c "import megatron.core as m; print('megatron-core', m.__version__, 'on Python 3.12')" && \
		$(VENV312)/bin/python -m pytest -q -m "megatron and not sglang and not plumbing"; \
	else \
		echo "SKIPPED: megatron-core 0.19.x tests: no working python3.12 on this machine"; \
	fi

clean:
	rm -rf $(VENV) $(VENV312) *.egg-info
