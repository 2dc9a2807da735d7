# kvserve build.
#
#   make            build ./kvserve (portable x86-64; SIMD chosen at run time)
#   make test       install deps, build, fetch the default model, run every test
#   make run        install deps, build, fetch the default model, start the main job
#   make model      fetch and verify the default model into $(MODEL_DIR)
#   make SAN=address|undefined|address,undefined   sanitizer build in build-san-*/
#   make CUDA=1     reserved for the GPU backend
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
ifeq ($(CUDA),1)
$(error CUDA=1: the GPU backend is not part of this build yet)
endif

CC      ?= cc
PYTHON  ?= python3
MODEL_DIR ?= $(HOME)/.cache/kvserve
MODEL   := $(MODEL_DIR)/SmolLM2-135M-Instruct.Q4_1.gguf
SHARED  ?= $(abspath ../shared)

ifeq ($(SAN),)
BUILD   ?= build
OPT     := -O2
ALLOC   := -lmimalloc
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
LDLIBS  += -luv -ljansson $(ALLOC) -lm

AVX2_FLAGS   := -mavx2 -mfma -mf16c
AVX512_FLAGS := -mavx512f -mavx512bw -mavx512vl -mavx512dq -mfma -mf16c

LIB_SRC  := $(filter-out server/main.c,$(wildcard engine/*.c cache/*.c api/*.c server/*.c))
LIB_OBJ  := $(LIB_SRC:%.c=$(BUILD)/%.o) \
            $(addprefix $(BUILD)/llhttp/,llhttp.o api.o http.o)
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
            node-llhttp python3 python3-pip curl

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

run: deps
	$(MAKE) all model
	./kvserve generate --model $(MODEL) --chat --max-tokens 64 \
	  --prompt "What is the capital of France?"

# ---- tests ------------------------------------------------------------------

# Unit tests run under ASan+UBSan; end-to-end tests drive the optimized binary.
test: deps
	$(MAKE) all model
	$(MAKE) SAN=address,undefined unit
	$(MAKE) e2e

unit: $(TEST_BIN)
	@fail=0; for t in $(TEST_BIN); do \
	  echo "== $$t"; \
	  KVSERVE_SHARED=$(SHARED) KVSERVE_MODEL=$(MODEL) ASAN_OPTIONS=detect_leaks=1 \
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

-include $(shell find $(BUILD) -name '*.d' 2>/dev/null)
