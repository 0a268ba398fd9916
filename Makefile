# Two commands for a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV ?= .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test venv clean lint

$(STAMP): pyproject.toml
	test -x $(VPY) || $(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	# Where pip's configured local index carries the pinned CPU pair (the development machines), take it;
	# elsewhere pip resolves torch>=2.4 as usual (the user's own CUDA build).
	if $(VPY) -m pip config list 2>/dev/null | grep -q 'file:///opt/pypi'; then \
		$(VPY) -m pip install -q torch==2.14.1 torchvision==0.29.1; fi
	$(VPY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(VPY) -m stalign demo

test: $(STAMP)
	$(VPY) -m pytest -q -m "not gpu" -p no:cacheprovider

lint: $(STAMP)
	$(VPY) -m ruff check stalign stofm data_prep tests benchmarks

clean:
	rm -rf $(VENV) build dist *.egg-info runs out
