# acmoe: `make demo` runs the main job, `make test` the test suite.
CC       ?= cc
CXX      ?= c++
CFLAGS   ?= -O3
WARN     := -Wall -Wextra -Wpedantic -Werror
CSTD     := -std=c99 -D_POSIX_C_SOURCE=200809L
LDLIBS   := -lm -lpthread
ARM_CC   ?= aarch64-linux-gnu-gcc
QEMU_ARM ?= qemu-aarch64
B        := build
PREFIX   ?= /usr/local
# MAJOR.MINOR.PATCH from acmoe.h's ACMOE_VERSION_* macros, for the pkg-config file.
VERSION  := $(shell awk 'NF == 3 && $$2 ~ /^ACMOE_VERSION_(MAJOR|MINOR|PATCH)$$/ {v = v (v == "" ? "" : ".") $$3} END {print v}' acmoe.h)

TEST_SRC := tests/main.c tests/impl.c tests/test_foundation.c tests/test_routers.c tests/test_moe.c tests/test_lm.c \
            tests/test_hardening.c tests/test_options.c
TEST_HDR := acmoe.h tests/harness.h

.PHONY: study test-study test-mpi test-mpi-train bench-mpi docs-parallel all test test-unit test-readme test-cpp test-examples test-sanitize test-leaks test-tsan test-valgrind test-dispatch test-arm fuzz fuzz-cli bench bench-pytorch bench-openblas bench-compare test-reference examples demo demo-vision clean \
        install uninstall test-install test-small-examples

all: $(B)/tests $(B)/bench examples

$(B):
	mkdir -p $(B)

$(B)/tests: $(TEST_SRC) $(TEST_HDR) | $(B)
	$(CC) $(CSTD) $(CFLAGS) $(WARN) $(TEST_SRC) -o $@ $(LDLIBS)

# The suite, the README's usage example, the header inside a C++ program, and smoke runs of
# the training examples (tiny models, embedded text and drawn digits, the demos' patterns;
# then every router's flags, checked in the options each layer reports (the runs' output is
# in build/*-flags.log), and a bad value); the two short examples; the study's pipeline on
# tiny models; and make install into build/.
test: test-readme test-cpp test-examples test-small-examples test-study test-install test-unit

test-examples: $(B)/train_lm $(B)/train_vit
	./$(B)/train_lm --data builtin --steps 4 --batch 2 --seq 32 --d-model 16 --heads 2 --experts 4 \
	    --d-ff 16 --warmup 2 --eval-every 2 --eval-batches 1 --log-every 2 --sample 20 --compare ggc,ggg --seeds 2 \
	    > $(B)/compare-lm.log; status=$$?; cat $(B)/compare-lm.log; test $$status -eq 0
	grep -q "^ggc (SMoE, SMoE, AC)  *[0-9]" $(B)/compare-lm.log
	grep -q "^ggc (SMoE, SMoE, AC) - ggg (SMoE, SMoE, SMoE), clean: .* bpc (sd .* over 2 seeds)" $(B)/compare-lm.log
	./$(B)/train_vit --data builtin --steps 4 --batch 8 --d-model 16 --heads 2 --experts 4 --d-ff 16 \
	    --warmup 2 --log-every 2 --compare ggc,gma --seeds 2 > $(B)/vit-flags.log
	grep -q "layer 3 AC options: eps 0.0001, clip 1.5, preclip scaling, mad dispersion, weighted" $(B)/vit-flags.log
	grep -q "layer 3 Soft MoE: 1 slot(s) per expert for each image" $(B)/vit-flags.log
	grep -q "^ggc (SMoE, SMoE, AC) - gma (SMoE, Soft MoE, AC Soft MoE), blanked: .* points (sd .* over 2 seeds)" \
	    $(B)/vit-flags.log
	./$(B)/train_vit --data builtin --steps 4 --batch 8 --d-model 16 --heads 2 --experts 4 --d-ff 16 \
	    --warmup 2 --log-every 2 --window 2 --compare "gt|tw,ff|na" > $(B)/swin.log
	grep -q "layer 4 AC options: eps 0.0001, clip 1.5, preclip scaling, mad dispersion, weighted" $(B)/swin.log
	grep -q "layer 2 Swin-MoE gate: noise 1 / E in training, capacity 1.25, load and importance loss 0.01" $(B)/swin.log
	grep -q "^gt|tw (SMoE, Swin-MoE | Swin-MoE, AC Swin-MoE) " $(B)/swin.log
	./$(B)/train_vit --data builtin --pattern "gt|tw" 2>/dev/null; test $$? -eq 2
	./$(B)/train_vit --data builtin --steps 2 --batch 8 --d-model 16 --heads 2 --experts 4 --d-ff 16 --log-every 2 \
	    --noise 0.2 --attack-eps 4 --attack-images 16 --log $(B)/vit-attack.jsonl > $(B)/vit-attack.log
	grep -q "test accuracy:  clean .* noise 0.2 .* blanked" $(B)/vit-attack.log
	grep -q "under attack (first 16 test images; budget in 1/255):  FGSM 4 .*, PGD 4 " $(B)/vit-attack.log
	grep -q '"event":"robust",.*"attack":"pgd","strength":4,"accuracy"' $(B)/vit-attack.jsonl
	grep -q '"event":"layer",.*"mi_expert_class"' $(B)/vit-attack.jsonl
	./$(B)/train_vit --noise 0.1,x 2>/dev/null; test $$? -eq 2
	./$(B)/train_vit --attack-eps 1,2,3,4,5,6,7,8,9 2>/dev/null; test $$? -eq 2
	./$(B)/train_vit --data builtin --window 2 --pattern "gt|wt" 2>/dev/null; test $$? -eq 2
	./$(B)/train_lm --data builtin --steps 2 --batch 2 --seq 32 --d-model 16 --heads 2 --experts 4 \
	    --d-ff 16 --eval-every 2 --eval-batches 1 --sample 0 --pattern gcxum --activation gelu --ac-eps 0.001 \
	    --ac-clip 8 --ac-dispersion variance --usmoe-budget 1.5 --usmoe-rho 0.3 --usmoe-group position \
	    --soft-slots 2 --proj-dim 4 > $(B)/lm-flags.log
	grep -q "layer 2 AC options: eps 0.001, clip 8, per-feature scaling, variance dispersion$$" $(B)/lm-flags.log
	grep -q "layer 3 XMoE projection: 4 wide" $(B)/lm-flags.log
	grep -q "layer 4 USMoE: budget 1.5 pairs per token of each position, rho 0.3" $(B)/lm-flags.log
	grep -q "layer 5 Soft MoE: 2 slot(s) per expert for each position" $(B)/lm-flags.log
	./$(B)/train_lm --ac-scaling none 2>/dev/null; test $$? -eq 2
	@echo "data that cannot be used is an error (status 2, naming the path), never a switch to the builtin data"
	: > $(B)/empty.csv; printf '1,2,3\n' > $(B)/malformed.csv; printf 'too short' > $(B)/short.txt
	(for i in $$(seq 64); do printf '0,'; done; echo 3) > $(B)/one-image.csv
	for program in train_lm train_vit; do for data in /nonexistent $(B)/empty.csv $(B); do \
	    ./$(B)/$$program --data $$data 2> $(B)/data-error.log; test $$? -eq 2 || exit 1; \
	    grep -q "\-\-data $$data: " $(B)/data-error.log || exit 1; done; done
	./$(B)/train_vit --data $(B)/malformed.csv 2> $(B)/data-error.log; test $$? -eq 2
	grep -q "malformed.csv: line 1: 3 values" $(B)/data-error.log
	./$(B)/train_vit --data $(B)/one-image.csv 2>/dev/null; test $$? -eq 2
	./$(B)/train_lm --data $(B)/short.txt 2>/dev/null; test $$? -eq 2
	@echo "a folder of IDX files trains on its own split (two 28 x 28 images each); bad files name themselves"
	rm -rf $(B)/idx && mkdir -p $(B)/idx/ok
	printf '\0\0\10\3\0\0\0\2\0\0\0\34\0\0\0\34' > $(B)/idx/ok/train-images-idx3-ubyte
	head -c 1568 /dev/zero | tr '\0' '\200' >> $(B)/idx/ok/train-images-idx3-ubyte
	printf '\0\0\10\1\0\0\0\2\3\7' > $(B)/idx/ok/train-labels-idx1-ubyte
	cp $(B)/idx/ok/train-images-idx3-ubyte $(B)/idx/ok/t10k-images-idx3-ubyte
	cp $(B)/idx/ok/train-labels-idx1-ubyte $(B)/idx/ok/t10k-labels-idx1-ubyte
	./$(B)/train_vit --data $(B)/idx/ok --steps 2 --batch 2 --d-model 16 --heads 2 --experts 4 --d-ff 16 --warmup 1 \
	    --log-every 2 > $(B)/idx.log
	grep -q "^2 training and 2 test images" $(B)/idx.log && grep -q "49 patches of 16 pixels per image" $(B)/idx.log
	for bad in truncated magic count label; do cp -r $(B)/idx/ok $(B)/idx/$$bad || exit 1; done
	head -c 1000 $(B)/idx/ok/train-images-idx3-ubyte > $(B)/idx/truncated/train-images-idx3-ubyte
	printf '\0\0\10\3\0\0\0\2\3\7' > $(B)/idx/magic/t10k-labels-idx1-ubyte
	printf '\0\0\10\1\0\0\0\3\3\7\1' > $(B)/idx/count/t10k-labels-idx1-ubyte
	printf '\0\0\10\1\0\0\0\2\3\12' > $(B)/idx/label/train-labels-idx1-ubyte
	for bad in "truncated:train-images-idx3-ubyte: truncated: 1000 bytes, where its header's 2 x 28 x 28 needs 1584" \
	    "magic:t10k-labels-idx1-ubyte: bad magic 0x00000803, not 0x00000801" \
	    "count:t10k-labels-idx1-ubyte: 3 labels for the 2 images of t10k-images-idx3-ubyte" \
	    "label:train-labels-idx1-ubyte: label 10 of image 1 is not a class 0..9"; do \
	    dir=$(B)/idx/$${bad%%:*}; ./$(B)/train_vit --data $$dir 2> $(B)/data-error.log; test $$? -eq 2 || exit 1; \
	    grep -qF -- "--data $$dir: $${bad#*:}" $(B)/data-error.log || { cat $(B)/data-error.log; exit 1; }; done
	./$(B)/train_vit --data builtin --patch 3 2> $(B)/data-error.log; test $$? -eq 2
	grep -q "\-\-patch 3 does not divide the images' side, 8" $(B)/data-error.log
	@echo "numbers out of range are refused by flag name, before any data is read"
	./$(B)/train_lm --steps 4294967297 2> $(B)/flag-error.log; test $$? -eq 2
	grep -q "\-\-steps 4294967297 is out of range" $(B)/flag-error.log
	./$(B)/train_lm --pattern $$(printf 'g%.0s' $$(seq 64)) 2>/dev/null; test $$? -eq 2
	./$(B)/train_vit --lr nan 2>/dev/null; test $$? -eq 2
	./$(B)/train_vit --seed 0 2>/dev/null; test $$? -eq 2
	@echo "a resumed run keeps its checkpoint's flags (sampling in its --seq) and refuses others"
	./$(B)/train_lm --data builtin --steps 2 --batch 2 --seq 64 --d-model 16 --heads 2 --experts 4 --d-ff 16 \
	    --eval-every 2 --eval-batches 1 --sample 0 --lr 0.003 --save $(B)/resume-lm.safetensors > /dev/null
	./$(B)/train_lm --data builtin --resume $(B)/resume-lm.safetensors --steps 4 --eval-batches 1 --sample 80 \
	    > $(B)/resume-lm.log
	grep -q "at step 2 of 4: pattern ggc, seq 64, batch 2, seed 1, lr 0.003" $(B)/resume-lm.log
	./$(B)/train_lm --data builtin --resume $(B)/resume-lm.safetensors --seq 32 2> $(B)/flag-error.log; test $$? -eq 2
	grep -q "\-\-seq 32 conflicts with the checkpoint's 64" $(B)/flag-error.log
	./$(B)/train_vit --data builtin --steps 2 --batch 8 --d-model 16 --heads 2 --experts 4 --d-ff 16 --log-every 1 \
	    --save $(B)/resume-vit.safetensors > /dev/null
	./$(B)/train_vit --data builtin --resume $(B)/resume-vit.safetensors > $(B)/resume-vit.log
	grep -q "already at step 2" $(B)/resume-vit.log
	./$(B)/train_vit --data builtin --resume $(B)/resume-vit.safetensors --patch 4 2>/dev/null; test $$? -eq 2

# The short examples that document the API (a tiny language model trained, saved, loaded
# and sampled; two MoE layers and the AC router on raw arrays): exit status and a line each;
# generate continuing a prompt from tiny_lm's checkpoint and refusing a USMoE model; --log
# of both training programs drawn by plot_log into SVGs (build/*-log.svg).
test-small-examples: $(B)/tiny_lm $(B)/moe_layer $(B)/generate $(B)/train_lm $(B)/train_vit $(B)/plot_log
	./$(B)/tiny_lm $(B)/tiny_lm.safetensors > $(B)/tiny_lm.log && cat $(B)/tiny_lm.log
	grep -q "^held-out batch: loss .* after loading" $(B)/tiny_lm.log
	grep -q "^generated: the cat " $(B)/tiny_lm.log
	./$(B)/generate $(B)/tiny_lm.safetensors --prompt "the cat " --length 40 --temperature 0 > $(B)/generate.log
	cat $(B)/generate.log; grep -q "^the cat .\{40\}" $(B)/generate.log
	./$(B)/train_lm --data builtin --steps 1 --batch 2 --seq 16 --d-model 16 --heads 2 --experts 4 --d-ff 16 \
	    --eval-every 1 --eval-batches 1 --sample 0 --pattern gu --save $(B)/usmoe.safetensors > /dev/null
	./$(B)/generate $(B)/usmoe.safetensors 2> $(B)/generate-error.log; test $$? -eq 2
	grep -q "cannot decode a token at a time: layer 2 (USMoE)" $(B)/generate-error.log
	./$(B)/moe_layer > $(B)/moe_layer.log && cat $(B)/moe_layer.log
	grep -q "^AC layer: 4 clusters from the SMoE layer's labels" $(B)/moe_layer.log
	@echo "--log writes JSON lines that plot_log draws as an SVG"
	./$(B)/train_lm --data builtin --steps 4 --batch 2 --seq 32 --d-model 16 --heads 2 --experts 4 --d-ff 16 \
	    --eval-every 2 --eval-batches 1 --log-every 2 --sample 0 --compare ggc,ggg --seeds 2 --log $(B)/lm-log.jsonl > /dev/null
	grep -q '^{"event":"layer","pattern":"ggc","routers":"SMoE, SMoE, AC","seed":2,"step":4,"layer":3,.*"ac_w_mean"' \
	    $(B)/lm-log.jsonl
	./$(B)/train_vit --data builtin --steps 4 --batch 8 --d-model 16 --heads 2 --experts 4 --d-ff 16 --log-every 2 \
	    --log $(B)/vit-log.jsonl > /dev/null
	for run in lm vit; do ./$(B)/plot_log $(B)/$$run-log.jsonl > $(B)/$$run-log.svg || exit 1; \
	    test "$$(head -c 4 $(B)/$$run-log.svg)" = "<svg" && test "$$(tail -n 1 $(B)/$$run-log.svg)" = "</svg>" || exit 1; \
	    grep -q "<path" $(B)/$$run-log.svg && grep -q "<polyline" $(B)/$$run-log.svg || exit 1; \
	    grep -q "ggc (SMoE, SMoE, AC)" $(B)/$$run-log.svg || exit 1; done
	./$(B)/plot_log $(B)/moe_layer.log 2>/dev/null; test $$? -eq 2

# make install into a scratch DESTDIR, a program built there with what pkg-config gives for
# acmoe (PKG_CONFIG_SYSROOT_DIR maps the installed paths into DESTDIR) and run, then make
# uninstall, which must leave neither file. Without pkg-config it says so and checks the files.
INSTALL_TEST := $(CURDIR)/$(B)/install-test
test-install: | $(B)
	rm -rf $(INSTALL_TEST)
	$(MAKE) --no-print-directory install DESTDIR=$(INSTALL_TEST)
	cmp acmoe.h $(INSTALL_TEST)$(PREFIX)/include/acmoe.h
	grep -qx "Version: $(VERSION)" $(INSTALL_TEST)$(PREFIX)/lib/pkgconfig/acmoe.pc
	@if ! command -v pkg-config >/dev/null 2>&1; then \
	    echo "test-install: pkg-config not installed, the build against the installed header skipped"; else \
	    set -e; export PKG_CONFIG_PATH=$(INSTALL_TEST)$(PREFIX)/lib/pkgconfig PKG_CONFIG_SYSROOT_DIR=$(INSTALL_TEST); \
	    printf '%s\n' '#define ACMOE_IMPLEMENTATION' '#include <acmoe.h>' '#include <stdio.h>' \
	        'int main(void) {' '    acmoe_ctx *ctx;' '    acmoe_status s = acmoe_ctx_create(&ctx, NULL);' \
	        '    printf("installed acmoe %d.%d.%d: %s\n", ACMOE_VERSION_MAJOR, ACMOE_VERSION_MINOR,' \
	        '           ACMOE_VERSION_PATCH, acmoe_status_string(s));' \
	        '    if (s != ACMOE_OK) return 1;' '    acmoe_ctx_destroy(ctx);' '    return 0;' '}' \
	        > $(B)/install_example.c; \
	    echo "flags: $$(pkg-config --cflags --libs acmoe)"; \
	    $(CC) $(CSTD) $(CFLAGS) $(WARN) $(B)/install_example.c -o $(B)/install_example $$(pkg-config --cflags --libs acmoe); \
	    ./$(B)/install_example > $(B)/install_example.log; cat $(B)/install_example.log; \
	    grep -qx "installed acmoe $(VERSION): ok" $(B)/install_example.log; fi
	$(MAKE) --no-print-directory uninstall DESTDIR=$(INSTALL_TEST)
	test ! -e $(INSTALL_TEST)$(PREFIX)/include/acmoe.h && test ! -e $(INSTALL_TEST)$(PREFIX)/lib/pkgconfig/acmoe.pc

test-unit: $(B)/tests
	./$(B)/tests

# Every ```c block of README.md, each into build/readme/NN.c (a #line names its README line):
# a whole program (one with `int main(`, the usage example) is built and run; any other block
# is compiled alone (-c) after an #include of acmoe.h's declarations, which keeps it fast.
test-readme: | $(B)
	rm -rf $(B)/readme && mkdir -p $(B)/readme
	awk -v dir=$(B)/readme '/^```c[ \t]*$$/ {f = sprintf("%s/%02d.c", dir, ++n); printf "#line %d \"README.md\"\n", NR + 1 > f; next} \
	    /^```/ {if (f) close(f); f = ""; next} f {print > f}' README.md
	@set -e; n=0; for f in $(B)/readme/*.c; do n=$$((n + 1)); \
	    if grep -q '^int main(' $$f; then \
	        echo "README.md program $$f"; $(CC) $(CSTD) $(CFLAGS) $(WARN) -I. $$f -o $${f%.c} $(LDLIBS); ./$${f%.c}; \
	    else echo "README.md snippet $$f"; printf '#include "acmoe.h"\n' | cat - $$f > $${f%.c}-unit.c; \
	        $(CC) $(CSTD) $(CFLAGS) $(WARN) -I. -c $${f%.c}-unit.c -o $${f%.c}.o; fi; done; \
	    test $$n -ge 2 || { echo "test-readme: fewer than two C blocks in README.md"; exit 1; }

# One C++ translation unit holds the implementation, another only includes the header.
# `make test` skips it, saying so, where no C++ compiler is installed; CI always runs it.
test-cpp: | $(B)
	@if ! command -v $(CXX) >/dev/null 2>&1; then echo "C++ build test skipped: no $(CXX) installed"; else \
	    set -e; \
	    $(CXX) -std=c++11 $(CFLAGS) $(WARN) -x c++ -c tests/cpp_impl.c -o $(B)/cpp_impl.o; \
	    $(CXX) -std=c++11 $(CFLAGS) $(WARN) -x c++ -c tests/cpp_use.c -o $(B)/cpp_use.o; \
	    $(CXX) $(B)/cpp_impl.o $(B)/cpp_use.o -o $(B)/cpp_test $(LDLIBS); \
	    ./$(B)/cpp_test; fi

test-sanitize: | $(B)
	$(CC) $(CSTD) -O1 -g -fsanitize=address,undefined -fno-sanitize-recover=all -fno-omit-frame-pointer \
	    $(WARN) $(TEST_SRC) -o $(B)/tests-sanitize $(LDLIBS)
	ACMOE_TEST_QUICK=1 ./$(B)/tests-sanitize

# Every allocation of each allocating entry point failing in turn (the alloc_fail cases)
# under AddressSanitizer with LeakSanitizer: ACMOE_ERR_NOMEM, and nothing left behind.
test-leaks: | $(B)
	$(CC) $(CSTD) -O1 -g -fsanitize=address -fno-omit-frame-pointer $(WARN) $(TEST_SRC) -o $(B)/tests-leaks $(LDLIBS)
	ASAN_OPTIONS=detect_leaks=1 ./$(B)/tests-leaks alloc_fail

# The suite under ThreadSanitizer (quick mode): the thread pool, the shared work queues of
# attention and the experts, and everything that runs on them.
test-tsan: | $(B)
	clang $(CSTD) -O1 -g -fsanitize=thread $(WARN) $(TEST_SRC) -o $(B)/tests-tsan $(LDLIBS)
	ACMOE_TEST_QUICK=1 TSAN_OPTIONS=halt_on_error=1 ./$(B)/tests-tsan

# The suite under Valgrind's memcheck (quick mode), less the matmul cases that check large
# products against a double-precision reference (a quarter of an hour under Valgrind; the
# sanitizers run them). Valgrind has no AVX-512, so the build leaves it out. Blocks that a
# forked test child inherits are only "possibly lost" (aligned blocks are held by interior
# pointers), so the errors are definite leaks.
VALGRIND_SKIP := -matmul_model_shapes -matmul_random_shapes -matmul_thread_determinism
test-valgrind: | $(B)
	$(CC) $(CSTD) -O1 -g -DACMOE_NO_AVX512 $(WARN) $(TEST_SRC) -o $(B)/tests-valgrind $(LDLIBS)
	ACMOE_TEST_QUICK=1 valgrind -q --error-exitcode=1 --leak-check=full --errors-for-leak-kinds=definite \
	    --show-leak-kinds=definite ./$(B)/tests-valgrind $(VALGRIND_SKIP)

# The library's readers under libFuzzer for FUZZ_SECONDS each: checkpoints (from valid ones
# of a model of every router letter and a vision encoder; the target writes the right
# checksum into each input, so mutations reach the header checks and the model, which must
# then take a training pass) and corpora. Needs clang (Debian's clang package has libFuzzer);
# inputs that crash are left in build/ as crash-* files.
FUZZ_SECONDS ?= 60
fuzz: | $(B)
	$(call fuzz_reader,checkpoint,32768,-DFUZZ_PATCH_CRC)
	$(call fuzz_reader,corpus,4096,)

# tests/fuzz_$(1).c under libFuzzer, inputs up to $(2) bytes, built with $(3), from the seeds
# its FUZZ_SEEDS build writes.
define fuzz_reader
	clang $(CSTD) -O1 -g -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=all $(WARN) $(3) \
	    tests/fuzz_$(1).c -o $(B)/fuzz_$(1) $(LDLIBS)
	$(CC) $(CSTD) -O1 $(WARN) -DFUZZ_SEEDS tests/fuzz_$(1).c -o $(B)/fuzz_$(1)-seeds $(LDLIBS)
	rm -rf $(B)/fuzz-$(1)-corpus && mkdir -p $(B)/fuzz-$(1)-corpus && ./$(B)/fuzz_$(1)-seeds $(B)/fuzz-$(1)-corpus
	./$(B)/fuzz_$(1) $(B)/fuzz-$(1)-corpus -max_total_time=$(FUZZ_SECONDS) -max_len=$(2) -timeout=10 \
	    -artifact_prefix=$(B)/ -print_final_stats=1
endef

# The examples' flag parser (argv from NUL-separated bytes, both programs' flag tables) and
# the digits CSV reader under libFuzzer, FUZZ_SECONDS each, from valid command lines (every
# router letter in --pattern and --compare) and CSVs. Needs clang; crash-* files in build/.
fuzz-cli: | $(B)
	for t in cli csv; do \
	    clang $(CSTD) -O1 -g -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=all $(WARN) \
	        tests/fuzz_$$t.c -o $(B)/fuzz_$$t $(LDLIBS) || exit 1; \
	    $(CC) $(CSTD) -O1 $(WARN) -DFUZZ_SEEDS tests/fuzz_$$t.c -o $(B)/fuzz_$$t-seeds $(LDLIBS) || exit 1; \
	    rm -rf $(B)/fuzz-$$t-corpus && mkdir -p $(B)/fuzz-$$t-corpus && ./$(B)/fuzz_$$t-seeds $(B)/fuzz-$$t-corpus || exit 1; \
	    ./$(B)/fuzz_$$t $(B)/fuzz-$$t-corpus -max_total_time=$(FUZZ_SECONDS) -max_len=4096 -timeout=10 \
	        -artifact_prefix=$(B)/ -print_final_stats=1 || exit 1; done

# Run-time dispatch on emulated x86-64 CPUs without AVX-512 (Haswell) and without AVX
# (qemu64): the same binary must pick the right path and never fault. Needs qemu-user.
QEMU_X86 ?= qemu-x86_64
HASWELL := Haswell,-hle,-rtm,-invpcid,-pcid,-x2apic,-tsc-deadline # minus what qemu cannot emulate
DISPATCH_CASES := cpu_isa matmul_tiny_exact matmul_small_blocks matmul_bad_input
test-dispatch: $(B)/tests
	ACMOE_EXPECT_ISA=avx2 $(QEMU_X86) -cpu $(HASWELL) ./$(B)/tests $(DISPATCH_CASES)
	ACMOE_EXPECT_ISA=scalar $(QEMU_X86) -cpu qemu64 ./$(B)/tests $(DISPATCH_CASES)

test-arm: | $(B)
	$(ARM_CC) $(CSTD) -O2 $(WARN) -static $(TEST_SRC) -o $(B)/tests-arm $(LDLIBS)
	ACMOE_TEST_QUICK=1 $(QEMU_ARM) ./$(B)/tests-arm

$(B)/bench: bench/bench.c bench/matmul_shapes.h acmoe.h | $(B)
	$(CC) $(CSTD) $(CFLAGS) $(WARN) bench/bench.c -o $@ $(LDLIBS)

# The benchmarks (bench/bench.c); BENCH_FLAGS passes options, e.g. "--section 1 --isa avx2" for
# the matrix products on the AVX2 path of an AVX-512 CPU, against that path's own peak.
BENCH_FLAGS ?=
bench: $(B)/bench
	./$(B)/bench $(BENCH_FLAGS)

# The PyTorch peer of bench sections 2 to 4 on this machine (Debian: python3-torch, libopenblas0-pthread).
PYTHON ?= /usr/bin/python3
PYTORCH_FLAGS ?=
bench-pytorch:
	@$(PYTHON) -c "import torch" 2>/dev/null || { echo "bench-pytorch needs PyTorch: apt-get install python3-torch libopenblas0-pthread"; exit 1; }
	$(PYTHON) bench/pytorch_peer.py --threads 1 $(PYTORCH_FLAGS)
	$(PYTHON) bench/pytorch_peer.py --threads 2 $(PYTORCH_FLAGS)

# The OpenBLAS peer of bench section 1: cblas_sgemm on the same products (bench/matmul_shapes.h)
# at 1 and 2 threads, taking turns with acmoe_matmul. OpenBLAS is loaded at run time, so no
# OpenBLAS is linked; where it is not installed (apt-get install libopenblas0-pthread) the peer
# says so and exits 0.
$(B)/openblas_peer: bench/openblas_peer.c bench/matmul_shapes.h acmoe.h | $(B)
	$(CC) $(CSTD) $(CFLAGS) $(WARN) bench/openblas_peer.c -o $@ -ldl $(LDLIBS)

bench-openblas: $(B)/openblas_peer
	./$(B)/openblas_peer

# acmoe's bench beside its peers in one go: build/bench, the OpenBLAS peer and, where $(PYTHON)
# has PyTorch, the PyTorch peer (saying so otherwise), RUNS times taking turns (default 1);
# docs/performance.md rewritten from the per-row medians (tools/perf_doc.sh) and its tables
# printed. QUICK=1 runs the short timings of --quick (a smoke test, not figures to keep).
RUNS ?= 1
bench-compare:
	CC="$(CC)" CFLAGS="$(CFLAGS)" PYTHON="$(PYTHON)" MAKE="$(MAKE)" RUNS="$(RUNS)" QUICK="$(QUICK)" sh tools/perf_doc.sh
	@out=$${PERF_DOC_OUT:-docs/performance.md}; echo; echo "== $$out, from its run details on:"; echo; \
	    sed -n '/^## Run/,$$p' $$out

# docs/performance.md from one run of the bench, of the OpenBLAS peer and, where $(PYTHON) has
# PyTorch, of the PyTorch peer (raw outputs in build/perf/; tools/perf_doc.sh LOG... rewrites
# it from saved ones, the medians of several). make bench-compare does the same and prints it.
.PHONY: docs
docs:
	CC="$(CC)" CFLAGS="$(CFLAGS)" PYTHON="$(PYTHON)" MAKE="$(MAKE)" RUNS="$(RUNS)" QUICK="$(QUICK)" sh tools/perf_doc.sh

# The whole model against PyTorch: tools/reference_dump.c saves small models of each router
# pattern with a batch, its logits, loss and gradients; tools/reference_check.py rebuilds them
# in float64 with the routers of the authors' code and wants every tensor within 1e-4
# (relative). The check is skipped, saying so, where PyTorch is not installed.
test-reference: | $(B)
	$(CC) $(CSTD) -O2 $(WARN) -I. tools/reference_dump.c -o $(B)/reference_dump $(LDLIBS)
	rm -rf $(B)/reference && mkdir -p $(B)/reference && ./$(B)/reference_dump $(B)/reference
	@if $(PYTHON) -c "import torch" 2>/dev/null; then $(PYTHON) tools/reference_check.py $(B)/reference; \
	else echo "test-reference skipped: PyTorch not installed (apt-get install python3-torch)"; fi

EXAMPLES := $(patsubst examples/%.c,$(B)/%,$(wildcard examples/*.c))

examples: $(EXAMPLES)

$(B)/%: examples/%.c $(wildcard examples/*.h) acmoe.h | $(B)
	$(CC) $(CSTD) $(CFLAGS) $(WARN) $< -o $@ $(LDLIBS)

# The fortunes corpus from Debian's package, unpacked without root. Where the package cannot
# be had, no file is made and the demo trains on its embedded text, saying so.
data/fortunes.txt:
	@mkdir -p data/deb
	@cd data/deb && (ls fortunes_*.deb >/dev/null 2>&1 || apt-get download fortunes >/dev/null 2>&1 || true)
	@if ls data/deb/fortunes_*.deb >/dev/null 2>&1; then \
	    dpkg -x data/deb/fortunes_*.deb data/pkgroot && \
	    find data/pkgroot/usr/share/games/fortunes -type f ! -name '*.dat' | LC_ALL=C sort | xargs cat > $@.tmp && \
	    mv $@.tmp $@ && echo "fortunes corpus: $$(wc -c < $@) bytes"; \
	else echo "fortunes package unavailable (apt-get download fortunes failed)"; fi

# The UCI handwritten digits (8 x 8, 1797 images) from Debian's scikit-learn package, unpacked
# without root. Where the package cannot be had, no file is made and the vision demo draws its
# own digits, saying so.
data/digits.csv:
	@mkdir -p data/deb
	@cd data/deb && (ls python3-sklearn_*.deb >/dev/null 2>&1 || apt-get download python3-sklearn >/dev/null 2>&1 || true)
	@if ls data/deb/python3-sklearn_*.deb >/dev/null 2>&1; then \
	    dpkg -x data/deb/python3-sklearn_*.deb data/pkgroot && \
	    gzip -dc data/pkgroot/usr/lib/python3/dist-packages/sklearn/datasets/data/digits.csv.gz > $@.tmp && \
	    mv $@.tmp $@ && echo "digits: $$(wc -l < $@) images"; \
	else echo "scikit-learn package unavailable (apt-get download python3-sklearn failed)"; fi

# Fashion-MNIST (28 x 28 images of clothes in 10 classes: 60,000 for training, 10,000 for
# testing) from Debian's package, its four IDX files unpacked without root into the folder
# that `train_vit --data data/fashion-mnist` reads. Where the package cannot be had, no
# folder is made, saying so.
FASHION_MNIST := train-images-idx3-ubyte train-labels-idx1-ubyte t10k-images-idx3-ubyte t10k-labels-idx1-ubyte
# The largest English text a Debian package gives without root: the Linux kernel's
# documentation (linux-doc, reStructuredText and plain text), translations, device-tree
# bindings and ABI listings left out, files in path order. The study trains on it.
data/linux-doc.txt:
	@mkdir -p data/deb
	@package=$$(apt-cache depends linux-doc 2>/dev/null | awk '/Depends: linux-doc-/ {print $$2; exit}'); \
	    cd data/deb && (ls linux-doc-*.deb >/dev/null 2>&1 || { [ -n "$$package" ] && apt-get download $$package >/dev/null 2>&1; } || true)
	@if ls data/deb/linux-doc-*.deb >/dev/null 2>&1; then \
	    rm -rf data/pkgroot/usr/share/doc/linux-doc-* && dpkg -x data/deb/linux-doc-*.deb data/pkgroot && \
	    (cd data/pkgroot/usr/share/doc/linux-doc-*/Documentation && \
	        find . -type f \( -name '*.rst.gz' -o -name '*.txt.gz' \) ! -path './translations/*' ! -path './devicetree/*' \
	            ! -path './ABI/*' | LC_ALL=C sort | xargs gzip -dc) > $@.tmp && \
	    mv $@.tmp $@ && echo "linux-doc corpus: $$(wc -c < $@) bytes"; \
	else rm -f $@.tmp; echo "linux-doc package unavailable (apt-get download linux-doc-* failed)"; fi

data/fashion-mnist:
	@mkdir -p data/deb
	@cd data/deb && (ls dataset-fashion-mnist_*.deb >/dev/null 2>&1 || apt-get download dataset-fashion-mnist >/dev/null 2>&1 || true)
	@if ls data/deb/dataset-fashion-mnist_*.deb >/dev/null 2>&1; then \
	    rm -rf $@.tmp && mkdir -p $@.tmp && dpkg -x data/deb/dataset-fashion-mnist_*.deb data/pkgroot && \
	    for f in $(FASHION_MNIST); do \
	        gzip -dc data/pkgroot/usr/share/datasets/fashion-mnist/$$f.gz > $@.tmp/$$f || { rm -rf $@.tmp; exit 1; }; done && \
	    mv $@.tmp $@ && echo "fashion-mnist: $$(du -sk $@ | cut -f1) kB of IDX files in $@"; \
	else echo "fashion-mnist package unavailable (apt-get download dataset-fashion-mnist failed)"; fi

DEMO_FLAGS ?=

# Trains the paper's 3-layer AC model ("ggc") and the same model with SMoE routers only
# ("ggg") for the same steps and seed, and compares them. Without data/fortunes.txt (the
# package could not be had) it says so and trains on the embedded text, by name.
demo: $(B)/train_lm data/fortunes.txt
	@data=data/fortunes.txt; if [ ! -f $$data ]; then \
	    echo "demo: no $$data; training on the builtin text instead (--data builtin)"; data=builtin; fi; \
	    set -x; ./$(B)/train_lm --data $$data --compare ggc,ggg --seeds 3 $(DEMO_FLAGS)

# Vision encoders on the digits: SMoE and AC after it, Soft MoE and the AC variant of it,
# tested clean and on corrupted images. Without data/digits.csv (the package could not be
# had) it says so and trains on drawn seven-segment digits, by name.
demo-vision: $(B)/train_vit data/digits.csv
	@data=data/digits.csv; if [ ! -f $$data ]; then \
	    echo "demo-vision: no $$data; training on drawn digits instead (--data builtin)"; data=builtin; fi; \
	    set -x; ./$(B)/train_vit --data $$data --compare ggg,ggc,gnn,gna --seeds 3 $(DEMO_FLAGS)

# The study behind docs/results.md (tools/study.sh): language models of the paper's two
# layouts with seven routers, and vision encoders, measured with the authors' protocols; the
# report drawn from the runs into docs/results.md and docs/study/. make study runs the quick
# mode (one seed, short runs); make study FULL=1 the full one (3 seeds, hours: stop it at any
# time and run it again to resume). test-study runs the pipeline on tiny models.
STUDY_MODE := $(if $(FULL),full,quick)
STUDY_DIR  ?= $(if $(FULL),docs/study/runs,$(B)/study-quick)
study: $(B)/train_lm $(B)/train_vit $(B)/study_report data/fortunes.txt data/linux-doc.txt data/fashion-mnist
	B=$(B) bash tools/study.sh $(STUDY_MODE) $(STUDY_DIR) docs

test-study: $(B)/train_lm $(B)/train_vit $(B)/study_report
	rm -rf $(B)/study-tiny
	B=$(B) bash tools/study.sh tiny $(B)/study-tiny $(B)/study-tiny > $(B)/study-tiny.log
	B=$(B) bash tools/study.sh tiny $(B)/study-tiny $(B)/study-tiny > $(B)/study-tiny-again.log
	! grep -q "== study tiny: run" $(B)/study-tiny-again.log  # finished runs are never repeated
	@echo "a run stopped after its first evaluation resumes from its checkpoint to the same bits"
	run=$(B)/study-tiny/lm-switch-ac-s1; mv $$run.jsonl $$run.first && rm $$run.done && \
	    command=$$(awk -F'\t' '$$1 == "lm-switch-ac-s1" {print $$6}' $(B)/study-tiny/study.tsv) && \
	    eval "$$command --steps 3 --save $(B)/study-tiny/ckpt/lm-switch-ac-s1.safetensors --log $$run.jsonl" > /dev/null && \
	    B=$(B) bash tools/study.sh tiny $(B)/study-tiny $(B)/study-tiny > $(B)/study-tiny-resume.log && \
	    grep -q "resuming from" $(B)/study-tiny-resume.log && \
	    test "$$(grep '"eval"' $$run.jsonl | tail -n 1)" = "$$(grep '"eval"' $$run.first | tail -n 1)"
	grep -q "^| " $(B)/study-tiny/results.md
	for svg in $(B)/study-tiny/study/*.svg; do test "$$(head -c 4 $$svg)" = "<svg" || exit 1; done

# The MPI communicator (ACMOE_MPI) under mpirun with 1, 2 and 4 ranks (oversubscribed on a
# smaller machine; as root, Open MPI needs its allow-run-as-root setting), and data-parallel
# training against one process on the same global batch. Without Open MPI (apt-get install
# openmpi-bin libopenmpi-dev) it says so.
MPICC  ?= mpicc
MPIRUN ?= mpirun
MPIRUN_FLAGS ?= --oversubscribe
test-mpi: | $(B)
	@if ! command -v $(MPICC) >/dev/null 2>&1 || ! command -v $(MPIRUN) >/dev/null 2>&1; then \
	    echo "test-mpi skipped: no $(MPICC) or $(MPIRUN) (apt-get install openmpi-bin libopenmpi-dev)"; exit 0; fi; \
	set -e; $(MPICC) $(CSTD) $(CFLAGS) $(WARN) tests/test_mpi.c -o $(B)/test_mpi $(LDLIBS); \
	for ranks in 1 2 4; do \
	    OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 $(MPIRUN) $(MPIRUN_FLAGS) -np $$ranks ./$(B)/test_mpi \
	        > $(B)/test_mpi.log; \
	    test "$$(grep -c 'sum, exchange, broadcast and barrier ok' $(B)/test_mpi.log)" -eq $$ranks; \
	    test "$$(grep -c 'data-parallel training matches one process' $(B)/test_mpi.log)" -eq $$ranks; \
	    test "$$(grep -c 'expert-parallel layer the same bits as one process' $(B)/test_mpi.log)" -eq $$ranks; \
	    echo "test-mpi: $$ranks rank(s) ok"; done
	@$(MAKE) --no-print-directory test-mpi-train

# train_lm with --data-parallel under mpirun against one process on the same batch; a run
# saved on 2 ranks resumed by one process and by 4 ranks.
MPI_ENV := OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
MPI_LM  := --data builtin --steps 6 --batch 4 --seq 32 --d-model 16 --heads 2 --experts 4 --d-ff 16 --pattern gfg \
           --eval-every 3 --eval-batches 2 --log-every 3 --sample 0 --threads 1
test-mpi-train: $(B)/train_lm $(B)/train_lm_mpi
	./$(B)/train_lm $(MPI_LM) | grep "eval step" > $(B)/mpi-one.log
	$(MPI_ENV) $(MPIRUN) $(MPIRUN_FLAGS) -np 2 ./$(B)/train_lm_mpi $(MPI_LM) --data-parallel 1 | grep "eval step" > $(B)/mpi-two.log
	$(MPI_ENV) $(MPIRUN) $(MPIRUN_FLAGS) -np 4 ./$(B)/train_lm_mpi $(MPI_LM) --data-parallel 1 | grep "eval step" > $(B)/mpi-four.log
	cmp $(B)/mpi-one.log $(B)/mpi-two.log && cmp $(B)/mpi-one.log $(B)/mpi-four.log
	$(MPI_ENV) $(MPIRUN) $(MPIRUN_FLAGS) -np 2 ./$(B)/train_lm_mpi $(MPI_LM) --data-parallel 1 --steps 3 \
	    --save $(B)/mpi.safetensors > /dev/null
	./$(B)/train_lm $(MPI_LM) --resume $(B)/mpi.safetensors | grep "eval step 6" > $(B)/mpi-resumed-one.log
	$(MPI_ENV) $(MPIRUN) $(MPIRUN_FLAGS) -np 4 ./$(B)/train_lm_mpi $(MPI_LM) --data-parallel 1 \
	    --resume $(B)/mpi.safetensors | grep "eval step 6" > $(B)/mpi-resumed-four.log
	grep "eval step 6" $(B)/mpi-one.log | cmp - $(B)/mpi-resumed-one.log
	cmp $(B)/mpi-resumed-one.log $(B)/mpi-resumed-four.log
	$(MPI_ENV) $(MPIRUN) $(MPIRUN_FLAGS) -np 2 ./$(B)/train_lm_mpi $(MPI_LM) --expert-parallel 1 | grep "eval step" > $(B)/mpi-ep-two.log
	$(MPI_ENV) $(MPIRUN) $(MPIRUN_FLAGS) -np 4 ./$(B)/train_lm_mpi $(MPI_LM) --expert-parallel 1 | grep "eval step" > $(B)/mpi-ep-four.log
	cmp $(B)/mpi-one.log $(B)/mpi-ep-two.log && cmp $(B)/mpi-one.log $(B)/mpi-ep-four.log
	$(MPI_ENV) $(MPIRUN) $(MPIRUN_FLAGS) -np 2 ./$(B)/train_lm_mpi $(MPI_LM) --expert-parallel 1 --steps 3 \
	    --save $(B)/mpi-ep.safetensors > /dev/null
	./$(B)/train_lm $(MPI_LM) --resume $(B)/mpi-ep.safetensors | grep "eval step 6" | cmp - $(B)/mpi-resumed-one.log
	$(MPI_ENV) $(MPIRUN) $(MPIRUN_FLAGS) -np 4 ./$(B)/train_lm_mpi $(MPI_LM) --expert-parallel 1 \
	    --resume $(B)/mpi-ep.safetensors | grep "eval step 6" | cmp - $(B)/mpi-resumed-one.log
	! $(MPI_ENV) $(MPIRUN) $(MPIRUN_FLAGS) -np 4 ./$(B)/train_lm_mpi $(MPI_LM) --expert-parallel 1 --experts 6 \
	    > /dev/null 2>&1
	./$(B)/train_lm $(MPI_LM) --data-parallel 1 2>/dev/null; test $$? -eq 2
	@echo "a rank that dies ends the run with an error, not a hang (124 would be the timeout's status)"
	($(MPI_ENV) timeout 60 $(MPIRUN) $(MPIRUN_FLAGS) -np 2 ./$(B)/train_lm_mpi $(MPI_LM) --steps 1000000 --data-parallel 1 \
	    > $(B)/mpi-dead.log 2>&1; echo $$? > $(B)/mpi-dead.status) & \
	    for try in $$(seq 120); do sleep 0.5; pkill -9 -n -f '^./$(B)/train_lm_mpi .*--steps 1000000' && break; done; wait; \
	    status=$$(cat $(B)/mpi-dead.status); test $$status -ne 0 && test $$status -ne 124
	grep -q "exited on signal 9" $(B)/mpi-dead.log
	@echo "test-mpi-train: data- and expert-parallel train_lm match one process on 2 and 4 ranks; saved on 2, resumed on 1 and 4"

# Training across processes on this machine: steps alone (1 rank, every core), then data- and
# expert-parallel on 2 ranks (a core each), with the bytes and collectives of each step.
# make docs-parallel writes the same run into docs/parallel.md with the cost model's check
# and predictions.
bench-mpi: $(B)/bench_mpi
	$(MPI_ENV) $(MPIRUN) $(MPIRUN_FLAGS) --bind-to none -np 1 ./$(B)/bench_mpi | tee $(B)/bench-mpi-1.log
	$(MPI_ENV) $(MPIRUN) $(MPIRUN_FLAGS) -np 2 ./$(B)/bench_mpi

docs-parallel: $(B)/bench_mpi
	$(MPI_ENV) $(MPIRUN) $(MPIRUN_FLAGS) --bind-to none -np 1 ./$(B)/bench_mpi > $(B)/bench-mpi-1.log
	alone=$$(sed -n 's/.*alone *step *\([0-9.]*\) ms.*/\1/p' $(B)/bench-mpi-1.log); \
	    $(MPI_ENV) $(MPIRUN) $(MPIRUN_FLAGS) -np 2 ./$(B)/bench_mpi --markdown --alone-ms $$alone > $(B)/bench-mpi.md
	{ echo "Host: $$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'), $$(nproc) cores;" \
	    "commit $$(git rev-parse --short HEAD 2>/dev/null || echo unknown), $$(date -u +%Y-%m-%d)."; echo; \
	    echo "One rank with every core: $$(sed -n 's/^ *alone *//p' $(B)/bench-mpi-1.log)."; echo; \
	    cat $(B)/bench-mpi.md; } > $(B)/bench-mpi-body.md
	awk 'FNR == NR { body = body $$0 "\n"; next } /<!-- bench-mpi:end -->/ { printf "%s", body; skip = 0 } !skip { print } \
	    /<!-- bench-mpi:begin -->/ { skip = 1 }' $(B)/bench-mpi-body.md docs/parallel.md > $(B)/parallel.md
	mv $(B)/parallel.md docs/parallel.md

$(B)/bench_mpi: bench/bench_mpi.c acmoe.h | $(B)
	$(MPICC) $(CSTD) $(CFLAGS) $(WARN) $< -o $@ $(LDLIBS)

$(B)/train_lm_mpi: examples/train_lm.c $(wildcard examples/*.h) acmoe.h | $(B)
	$(MPICC) $(CSTD) $(CFLAGS) $(WARN) -DACMOE_MPI $< -o $@ $(LDLIBS)

$(B)/study_report: tools/study_report.c examples/svg.h | $(B)
	$(CC) $(CSTD) $(CFLAGS) $(WARN) $< -o $@ -lm

# make install [PREFIX=/usr/local] [DESTDIR=]: the header into $(PREFIX)/include and a
# pkg-config file, acmoe.pc, into $(PREFIX)/lib/pkgconfig; make uninstall removes both.
install:
	install -d $(DESTDIR)$(PREFIX)/include $(DESTDIR)$(PREFIX)/lib/pkgconfig
	install -m 644 acmoe.h $(DESTDIR)$(PREFIX)/include/acmoe.h
	printf '%s\n' 'prefix=$(PREFIX)' 'includedir=$${prefix}/include' '' 'Name: acmoe' \
	    'Description: Mixture-of-Experts on the CPU with the Adaptive Clustering router (single header)' \
	    'Version: $(VERSION)' 'Libs: -lm -lpthread' 'Cflags: -I$${includedir}' \
	    > $(DESTDIR)$(PREFIX)/lib/pkgconfig/acmoe.pc

uninstall:
	rm -f $(DESTDIR)$(PREFIX)/include/acmoe.h $(DESTDIR)$(PREFIX)/lib/pkgconfig/acmoe.pc

clean:
	rm -rf $(B)
