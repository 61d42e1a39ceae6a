# The two commands of the README:  `make report`  (demo report)  and  `make test`.
# Both build .venv from the pinned requirements.lock on first use.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PARAMS ?= params/demo.yaml

.PHONY: report test venv lock clean
report: $(VENV)/.installed
	$(PY) run_all.py $(PARAMS)

test: $(VENV)/.installed
	$(PY) -m pytest $(PYTEST_ARGS)

venv: $(VENV)/.installed

$(VENV)/.installed: requirements.lock pyproject.toml
	$(PYTHON) -c 'import sys; sys.exit("perturbnmf needs Python >= 3.11, found " + sys.version.split()[0]) if sys.version_info < (3, 11) else None'
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.lock
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
	touch $@

# Re-resolve the pins from pyproject.toml's ranges (needs the package index).
lock:
	rm -rf build/lockvenv && $(PYTHON) -m venv build/lockvenv
	build/lockvenv/bin/pip install --quiet ".[test]" "setuptools>=64"
	{ sed -n '1,2p' requirements.lock; build/lockvenv/bin/pip freeze --all --exclude-editable | grep -v -e '^pip==' -e '^perturbnmf'; } > requirements.lock.new
	mv requirements.lock.new requirements.lock

clean:
	rm -rf $(VENV) build
