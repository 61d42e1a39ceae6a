# The two commands of the README:  `make report`  (demo report)  and  `make test`.
# Both build .venv from the pinned requirements.lock on first use.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PARAMS ?= params/demo.yaml

.PHONY: report test lab venv lock clean
report: $(VENV)/.installed
	$(PY) run_all.py $(PARAMS)

test: $(VENV)/.installed
	$(PY) -m pytest $(PYTEST_ARGS)

# JupyterLab on the notebooks with the project's kernel (extra options: make lab LAB_ARGS="--port 8890 --no-browser").
# The notebooks ask for the kernel `python3`. `ipykernel install --sys-prefix` writes the venv's own python3
# kernelspec (argv: this venv's python, by absolute path), and JUPYTER_PATH puts the venv's share/jupyter
# first in the search, ahead of the user's (~/.local/share/jupyter), the system's and any other JUPYTER_PATH
# entry, whatever JUPYTER_PREFER_ENV_PATH says: a `python3` kernelspec elsewhere cannot shadow it, while the
# other kernels stay listed. (KernelSpecManager.kernel_dirs would be stricter but cannot be configured.)
# As root (a container), JupyterLab refuses to start without --allow-root: given then. Offline machines:
# no news feed or update check from the internet, and (overrides.json) no prompt asking to allow them.
LAB_SETTINGS := $(VENV)/share/jupyter/lab/settings
lab: $(VENV)/.installed
	$(PY) -m ipykernel install --sys-prefix --name python3
	mkdir -p $(LAB_SETTINGS) && printf '%s\n' '{"@jupyterlab/apputils-extension:notification": {"fetchNews": "false", "checkForUpdates": false}}' > $(LAB_SETTINGS)/overrides.json
	JUPYTER_PATH="$(abspath $(VENV))/share/jupyter$${JUPYTER_PATH:+:$$JUPYTER_PATH}" \
		$(PY) -m jupyter lab --ServerApp.root_dir="$(CURDIR)" --LabApp.default_url=/lab/tree/notebooks \
		--LabApp.news_url=None --LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate \
		$(if $(filter 0,$(shell id -u)),--allow-root) $(LAB_ARGS)

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
