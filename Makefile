# The two commands a new user needs: `make demo` and `make test`.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: env browser demo test test-all lint lock clean

env: $(STAMP)

# Re-runs only when the dependency list changes; pip is idempotent anyway.
# constraints.txt pins every package (`make lock`): the same versions on any day.
$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[dev]'
	touch $(STAMP)

# After a change to pyproject.toml's dependencies: resolve them afresh (newest allowed
# versions), run `make test`, then commit constraints.txt.
lock:
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/python -m pip install -q --upgrade -e '.[dev]'
	{ sed -n '/^#/p' constraints.txt; $(BIN)/python -m pip freeze --all --exclude-editable | grep -Ev '^(#|pip==|nvidia-|cuda-|triton==)'; } > constraints.new
	mv constraints.new constraints.txt
	touch $(STAMP)

# The HTML report's test renders it in headless Chromium (Debian packages).
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
	  $(SUDO) sh -c 'apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver'

demo: env
	$(BIN)/diffin demo

test: env browser
	$(BIN)/python -m pytest -q

test-all: env browser
	$(BIN)/python -m pytest -q -m ''

lint: env
	$(BIN)/ruff check pipeline tests jobs benchmarks
	$(BIN)/ruff format --check pipeline tests jobs benchmarks

clean:
	rm -rf $(VENV) runs .pytest_cache
