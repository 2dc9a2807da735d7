# kvserve build.
#
#   make            build ./kvserve (portable x86-64; SIMD chosen at run time)
#   make test       install deps, build, fetch the default model, run every test
#   make run        install deps, build, fetch the default model, start the main job
#   make model      fetch and verify the default model into $(MODEL_DIR)
#   make SAN=address|undefined|address,undefined   sanitizer build in build-san-*/
#   make CUDA=1     the CUDA build in build-cuda/: the GPU kernels (cache/cuda/) and the cuda
#                   backend (engine/cuda/), nvcc -arch=sm_90, cuBLAS; ./kvserve is then that build
#   make gpu-bins   the standalone GPU test and benchmark (run on an H200: tools/gpu_bench.sh)
#
# Every .c file under engine/ cache/ api/ server/ is part of the library; files
# named *_avx2.c / *_avx512.c are compiled for that instruction set and must only
# be called after a run-time CPU check. tests/**/test_*.c are Criterion unit tests,
# one binary each; tests/e2e/test_*.py drive the real binary.

SAN  ?=
CUDA ?=
comma := ,

ifneq ($(filter-out address undefined address$(comma)undefined undefined$(comma)address,$(SAN)),)
$(error SAN='$(SAN)' is not one of: address, undefined, address$(comma)undefined)
endif
ifneq ($(filter-out 0 1,$(CUDA)),)
$(error CUDA='$(CUDA)' is not one of: 0, 1)
endif
# nvcc: the one on PATH, else the default CUDA install (empty: none here).
NVCC ?= $(firstword $(shell command -v nvcc 2>/dev/null) $(wildcard /usr/local/cuda/bin/nvcc))
CUDA_KERN_SRC := $(wildcard cache/cuda/*.cu)
CUDA_ENG_SRC  := $(wildcard engine/cuda/*.cu)
CUDA_KERN_OBJ  = $(CUDA_KERN_SRC:%.cu=$(BUILD)/%.o)
CUDA_ENG_OBJ   = $(CUDA_ENG_SRC:%.cu=$(BUILD)/%.o)
ifeq ($(CUDA),1)
ifeq ($(NVCC),)
$(error CUDA=1: nvcc not found (set NVCC=/path/to/nvcc))
endif
# A CUDA build lives in its own folder and runs on GPU machines that lack
# the CPU build's shared libraries: libuv and jansson linked statically, no
# mimalloc; cuBLAS and the CUDA runtime from the CUDA install.
BUILD   ?= build-cuda
CFLAGS  += -DKVSERVE_CUDA
CUDA_LIBDIR := $(abspath $(dir $(NVCC))../lib64)
DEP_LIBS = $(shell $(CC) -print-file-name=libuv_a.a) $(shell $(CC) -print-file-name=libjansson.a)
LDLIBS  += -L$(CUDA_LIBDIR) -lcublas -lcublasLt -lcudart_static -ldl -lrt -lstdc++
else
DEP_LIBS = -luv -ljansson
endif

CC      ?= cc
PYTHON  ?= python3
MODEL_DIR ?= $(HOME)/.cache/kvserve
MODEL   := $(MODEL_DIR)/SmolLM2-135M-Instruct.Q4_1.gguf
SHARED  ?= $(abspath ../shared)

ifeq ($(SAN),)
BUILD   ?= build
OPT     := -O2
ALLOC   := $(if $(filter 1,$(CUDA)),,-lmimalloc)
else
BUILD   ?= build-san-$(subst $(comma),-,$(SAN))
OPT     := -O1 -g -fno-omit-frame-pointer -fsanitize=$(SAN) -fno-sanitize-recover=all
ALLOC   :=
endif

LLHTTP_DIR := /usr/share/llhttp
LLHTTP_INC := /usr/share/include/llhttp

CFLAGS  += -std=gnu11 $(OPT) -g -Wall -Wextra -Wno-unused-parameter -Wshadow \
           -Wstrict-prototypes -Wmissing-prototypes -pthread -MMD -MP \
           -I. -I$(LLHTTP_INC)
LDFLAGS += $(if $(SAN),-fsanitize=$(SAN),) -pthread
LDLIBS  += $(DEP_LIBS) $(ALLOC) -lm

AVX2_FLAGS   := -mavx2 -mfma -mf16c
AVX512_FLAGS := -mavx2 -mavx512f -mavx512bw -mavx512vl -mavx512dq -mavx512vnni -mfma -mf16c

LIB_SRC  := $(filter-out server/main.c,$(wildcard engine/*.c cache/*.c api/*.c server/*.c))
LIB_OBJ  := $(LIB_SRC:%.c=$(BUILD)/%.o) \
            $(addprefix $(BUILD)/llhttp/,llhttp.o api.o http.o) \
            $(if $(filter 1,$(CUDA)),$(CUDA_KERN_OBJ) $(CUDA_ENG_OBJ))
MAIN_OBJ := $(BUILD)/server/main.o
TESTS    ?= $(wildcard tests/*/test_*.c)
TEST_SRC := $(TESTS)
TEST_BIN := $(TEST_SRC:%.c=$(BUILD)/%)

.PHONY: all deps model run test unit e2e bench clean help
all: kvserve

kvserve: $(BUILD)/kvserve
	cp $< $@

$(BUILD)/kvserve: $(MAIN_OBJ) $(BUILD)/libkvserve.a
	$(CC) $(LDFLAGS) -o $@ $^ $(LDLIBS)

$(BUILD)/libkvserve.a: $(LIB_OBJ)
	@rm -f $@
	ar rcs $@ $^

$(BUILD)/%_avx2.o: %_avx2.c
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) $(AVX2_FLAGS) -c -o $@ $<

$(BUILD)/%_avx512.o: %_avx512.c
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) $(AVX512_FLAGS) -c -o $@ $<

$(BUILD)/%.o: %.c
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) -c -o $@ $<

$(BUILD)/llhttp/%.o: $(LLHTTP_DIR)/%.c
	@mkdir -p $(dir $@)
	$(CC) -std=gnu11 $(OPT) -I$(LLHTTP_INC) -w -c -o $@ $<

$(BUILD)/tests/%: tests/%.c $(BUILD)/libkvserve.a
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) $(LDFLAGS) -o $@ $< $(BUILD)/libkvserve.a -lcriterion $(LDLIBS)

# ---- set-up -----------------------------------------------------------------

DEB_PKGS := build-essential libuv1-dev libjansson-dev libmimalloc-dev libcriterion-dev \
            node-llhttp python3 python3-pip curl \
            prometheus wrk clang

deps:
	@missing=""; for p in $(DEB_PKGS); do \
	  dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "deps: installing$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	fi

model: $(MODEL)
$(MODEL): tools/fetch-model.sh
	MODEL_DIR=$(MODEL_DIR) sh tools/fetch-model.sh

# The daemon on 127.0.0.1:8080 with the laptop profile (RUN_FLAGS: more
# `kvserve serve` flags, e.g. RUN_FLAGS="--port 9000").
run: deps
	$(MAKE) all model
	./kvserve serve --profile laptop --model $(MODEL) $(RUN_FLAGS)

# ---- tests ------------------------------------------------------------------

# Unit tests run under ASan+UBSan; end-to-end tests drive the optimized binary.
JOBS ?= $(shell nproc 2>/dev/null || echo 2)

test: deps
	$(MAKE) -j$(JOBS) all
	$(MAKE) model
	$(MAKE) -j$(JOBS) SAN=address,undefined $(TEST_BIN:$(BUILD)/%=build-san-address-undefined/%)
	$(MAKE) SAN=address,undefined unit
	$(MAKE) cuda-check
	$(MAKE) e2e-deps
	$(MAKE) e2e

unit: $(TEST_BIN) fixtures
	@fail=0; for t in $(TEST_BIN); do \
	  echo "== $$t"; \
	  KVSERVE_SHARED=$(SHARED) KVSERVE_MODEL=$(MODEL) KVSERVE_FIXTURES=$(FIXTURE_DIR) ASAN_OPTIONS=detect_leaks=1 \
	    $$t --jobs 2 || fail=1; \
	done; exit $$fail

e2e: kvserve
	@KVSERVE_SHARED=$(SHARED) KVSERVE_MODEL=$(MODEL) KVSERVE_BIN=$(abspath kvserve) \
	  python3 tests/e2e/run.py

clean:
	rm -rf build build-san-* kvserve

# ---- bench-matmul (owned by the kernels: tools/bench_matmul.c) --------------
# CPU kernel microbenchmark on the SmolLM2-135M shapes; see the file's header.

.PHONY: bench-matmul
bench-matmul: $(BUILD)/tools/bench_matmul

$(BUILD)/tools/bench_matmul: tools/bench_matmul.c $(BUILD)/libkvserve.a
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) $(LDFLAGS) -o $@ $< $(BUILD)/libkvserve.a $(LDLIBS)

# ---- bench-attention (owned by the cache: tools/bench_attention.c) ----------
# Decode attention over the paged cache, SmolLM2-135M shape, per codec; see the
# file's header. Options: make bench-attention BENCH_ARGS="--ctx 4096 --threads 2"

.PHONY: bench-attention
bench-attention: $(BUILD)/tools/bench_attention
	$(BUILD)/tools/bench_attention $(BENCH_ARGS)

$(BUILD)/tools/bench_attention: tools/bench_attention.c $(BUILD)/libkvserve.a
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) $(LDFLAGS) -o $@ $< $(BUILD)/libkvserve.a $(LDLIBS)

# ---- plot-concurrency (owned by the scheduler: tools/plot_concurrency.sh) ----
# Output tokens/s against concurrency, one line per KV codec, from
# `kvserve bench --concurrency N --json`, drawn with gnuplot, for two
# workloads: generation-heavy (16 prompt + 256 generated tokens per request:
# docs/concurrency.png) and chat-like (128 + 128: docs/concurrency_128.png).
# Options: make plot-concurrency PLOT_ENV='CODECS="f16 int8" CONCURRENCY="1 4 16"'

.PHONY: plot-concurrency
plot-concurrency: kvserve model
	env KVSERVE_BIN=$(abspath kvserve) MODEL=$(MODEL) CONCURRENCY="1 4 8 16" PROMPT_LEN=16 GEN_LEN=256 \
	    OUT=docs/concurrency.png $(PLOT_ENV) sh tools/plot_concurrency.sh
	env KVSERVE_BIN=$(abspath kvserve) MODEL=$(MODEL) CONCURRENCY="1 4 8 16" PROMPT_LEN=128 GEN_LEN=128 \
	    OUT=docs/concurrency_128.png $(PLOT_ENV) sh tools/plot_concurrency.sh

# ---- http daemon (owned by the daemon: server/http.c, api/, tests/fuzz) ----
# e2e-deps: the Python packages the HTTP end-to-end tests use (the openai SDK).
# fuzz (not part of make test): libFuzzer over HTTP parsing, routing and JSON
# validation, built with clang in build-fuzz/: make fuzz FUZZ_RUNS=1000000

.PHONY: e2e-deps fuzz clean-fuzz
clean: clean-fuzz
clean-fuzz:
	rm -rf build-fuzz

e2e-deps:
	@$(PYTHON) -c "import openai" 2>/dev/null || $(PYTHON) -m pip install --quiet openai || \
	  $(PYTHON) -m pip install --quiet --break-system-packages openai

# fixtures: GGUF files written by gguf-py (the reference writer, from PyPI),
# generated into the cache rather than committed: the tokenizer loader's odd
# vocabularies, test_gguf's pywriter.gguf, and the tiny Llama fixture
# (tests/fixtures/models/llama, safetensors) converted the way llama.cpp's
# converter does, in f32 and q8_0.
FIXTURE_DIR ?= $(MODEL_DIR)/fixtures
.PHONY: fixtures
fixtures:
	@$(PYTHON) -c "import gguf, numpy, safetensors" 2>/dev/null || \
	  $(PYTHON) -m pip install --quiet gguf numpy safetensors || \
	  $(PYTHON) -m pip install --quiet --break-system-packages gguf numpy safetensors
	@mkdir -p $(FIXTURE_DIR)/llama
	@$(PYTHON) tests/fixtures/tokenizer/make_gguf_fixtures.py $(FIXTURE_DIR)
	@$(PYTHON) tests/fixtures/gguf/gen_gguf_fixture.py $(FIXTURE_DIR) > /dev/null
	@for q in f32 q8_0; do $(PYTHON) tools/hf_to_gguf_fixture.py tests/fixtures/models/llama \
	  $(FIXTURE_DIR)/llama/model-$$q.gguf $$q > /dev/null; done

FUZZ_RUNS   ?= 1000000
FUZZ_DIR    := build-fuzz
FUZZ_CFLAGS := -std=gnu11 -O1 -g -fno-omit-frame-pointer -fsanitize=fuzzer-no-link,address,undefined \
               -fno-sanitize-recover=all -MMD -MP -I. -I$(LLHTTP_INC)
FUZZ_OBJ    := $(addprefix $(FUZZ_DIR)/,tests/fuzz/fuzz_http.o server/http.o api/route.o api/request.o \
               api/response.o engine/sampler.o engine/sampler_avx2.o llhttp/llhttp.o llhttp/api.o llhttp/http.o)

fuzz: $(FUZZ_DIR)/fuzz_http
	@mkdir -p $(FUZZ_DIR)/corpus
	$(FUZZ_DIR)/fuzz_http -runs=$(FUZZ_RUNS) -max_len=4096 -dict=tests/fuzz/http.dict \
	  -print_final_stats=1 $(FUZZ_DIR)/corpus tests/fuzz/seeds

$(FUZZ_DIR)/fuzz_http: $(FUZZ_OBJ)
	clang -fsanitize=fuzzer,address,undefined -o $@ $^ -luv -ljansson -lm

$(FUZZ_DIR)/%_avx2.o: %_avx2.c
	@mkdir -p $(dir $@)
	clang $(FUZZ_CFLAGS) $(AVX2_FLAGS) -c -o $@ $<

$(FUZZ_DIR)/llhttp/%.o: $(LLHTTP_DIR)/%.c
	@mkdir -p $(dir $@)
	clang $(FUZZ_CFLAGS) -w -c -o $@ $<

$(FUZZ_DIR)/%.o: %.c
	@mkdir -p $(dir $@)
	clang $(FUZZ_CFLAGS) -c -o $@ $<

-include $(wildcard $(FUZZ_DIR)/*/*.d $(FUZZ_DIR)/*/*/*.d)

# ---- CUDA (owned by the GPU kernels: cache/cuda/, engine/cuda/, tests/cuda/) --
# Every cache/cuda/*.cu is compiled for sm_90 (H100/H200). gpu-bins builds three
# standalone programs that link only the cache's C files, the kernels and the
# static CUDA runtime (the GPU machine has no libuv, mimalloc or Criterion):
# $(BUILD)/gpu/gpu_test (kernels against the CPU cache code),
# $(BUILD)/gpu/gpu_bench (timings against the memory floor) and
# $(BUILD)/gpu/rows_test (the cuda backend's fused products, engine/cuda/rows.cu,
# against a CPU reference), $(BUILD)/gpu/cands_test (the logit rows' records,
# engine/cuda/cands.cu, against the CPU sampler's). tools/gpu_bench.sh runs them there. With CUDA=1, $(BUILD)/kvserve has the cuda backend
# (engine/cuda/) and $(BUILD)/gpu/gpu_engine checks it against the CPU
# backend on a real model (tools/gpu_bench.sh STEPS=engine). cuda-check (part
# of `make test`) compiles and links all of it in build-cuda/ and is skipped,
# saying so, only where nvcc is absent.

NVCCFLAGS ?= -O3 -lineinfo
NVCC_ALL  := -arch=sm_90 -std=c++17 -I. -MMD -MP -Xcompiler -Wall,-Wextra,-Wno-unused-parameter $(NVCCFLAGS)
GPU_C_SRC := $(wildcard cache/*.c)
GPU_C_OBJ  = $(GPU_C_SRC:%.c=$(BUILD)/gpu/%.o)
GPU_CFLAGS := -std=gnu11 -O2 -g -Wall -Wextra -Wno-unused-parameter -pthread -MMD -MP -I.

.PHONY: gpu-bins cuda-check
gpu-bins: $(BUILD)/gpu/gpu_test $(BUILD)/gpu/gpu_bench $(BUILD)/gpu/rows_test $(BUILD)/gpu/rows_bench \
          $(BUILD)/gpu/cands_test

cuda-check:
	@if [ -z "$(NVCC)" ]; then echo "cuda-check: nvcc not found: CUDA sources NOT compiled"; \
	else $(MAKE) -j$(JOBS) CUDA=1 BUILD=build-cuda gpu-bins build-cuda/kvserve build-cuda/gpu/gpu_engine && \
	  echo "cuda-check: CUDA sources compile"; fi

# The nvcc command line, rewritten only when it changes: every CUDA object
# and program depends on it, so a changed flag (an architecture, a -D)
# rebuilds them all instead of linking old objects with new ones.
NVCC_STAMP := $(BUILD)/gpu/nvcc.cmd
.PHONY: nvcc-stamp-check
nvcc-stamp-check:
	@mkdir -p $(dir $(NVCC_STAMP))
	@echo '$(NVCC) $(NVCC_ALL)' | cmp -s - $(NVCC_STAMP) || echo '$(NVCC) $(NVCC_ALL)' > $(NVCC_STAMP)
$(NVCC_STAMP): nvcc-stamp-check

$(BUILD)/cache/cuda/%.o: cache/cuda/%.cu $(NVCC_STAMP)
	@mkdir -p $(dir $@)
	$(NVCC) $(NVCC_ALL) -c -o $@ $<

$(BUILD)/engine/cuda/%.o: engine/cuda/%.cu $(NVCC_STAMP)
	@mkdir -p $(dir $@)
	$(NVCC) $(NVCC_ALL) -c -o $@ $<

ifeq ($(CUDA),1)
$(BUILD)/gpu/gpu_engine: tests/cuda/gpu_engine.c $(BUILD)/libkvserve.a
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) $(LDFLAGS) -o $@ $< $(BUILD)/libkvserve.a $(LDLIBS)
endif

$(BUILD)/gpu/%_avx2.o: %_avx2.c
	@mkdir -p $(dir $@)
	$(CC) $(GPU_CFLAGS) $(AVX2_FLAGS) -c -o $@ $<

$(BUILD)/gpu/%_avx512.o: %_avx512.c
	@mkdir -p $(dir $@)
	$(CC) $(GPU_CFLAGS) $(AVX512_FLAGS) -c -o $@ $<

$(BUILD)/gpu/%.o: %.c
	@mkdir -p $(dir $@)
	$(CC) $(GPU_CFLAGS) -c -o $@ $<

.SECONDARY: $(CUDA_KERN_OBJ) $(CUDA_ENG_OBJ) $(GPU_C_OBJ)
$(BUILD)/gpu/rows_test: tests/cuda/rows_test.cu $(BUILD)/engine/cuda/rows.o $(NVCC_STAMP)
	@mkdir -p $(dir $@)
	$(NVCC) $(NVCC_ALL) -o $@ $< $(BUILD)/engine/cuda/rows.o
$(BUILD)/gpu/rows_bench: tests/cuda/rows_bench.cu $(BUILD)/engine/cuda/rows.o $(NVCC_STAMP)
	@mkdir -p $(dir $@)
	$(NVCC) $(NVCC_ALL) -o $@ $< $(BUILD)/engine/cuda/rows.o -lcublas
$(BUILD)/gpu/cands_test: tests/cuda/cands_test.cu $(BUILD)/engine/cuda/cands.o $(BUILD)/gpu/engine/sampler.o \
                         $(BUILD)/gpu/engine/sampler_avx2.o $(NVCC_STAMP)
	@mkdir -p $(dir $@)
	$(NVCC) $(NVCC_ALL) -o $@ $< $(filter %.o,$^) -lm
$(BUILD)/gpu/%: tests/cuda/%.cu $(CUDA_KERN_OBJ) $(GPU_C_OBJ) $(NVCC_STAMP)
	@mkdir -p $(dir $@)
	$(NVCC) $(NVCC_ALL) -o $@ $< $(CUDA_KERN_OBJ) $(GPU_C_OBJ) -lpthread -lm

-include $(shell find $(BUILD) -name '*.d' 2>/dev/null)
