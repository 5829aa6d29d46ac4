# Two commands: `make demo` and `make test`. Each installs what is missing (apt, the project .venv, cargo builds)
# and is quick when everything is present.
SHELL := /bin/bash
.DEFAULT_GOAL := demo

VENV := $(CURDIR)/.venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.camelid-deps-stamp
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

# tch builds against and runs on the libtorch that PyPI's torch wheel ships.
export LIBTORCH_USE_PYTORCH := 1
export VIRTUAL_ENV := $(VENV)
export PATH := $(VENV)/bin:$(PATH)
export CAMELID_PYTHON := $(PY)
TORCH_LIB = $(VENV)/lib/python3$(shell python3 -c 'import sys;print(f".{sys.version_info[1]}")')/site-packages/torch/lib
export LD_LIBRARY_PATH := $(TORCH_LIB)$(if $(LD_LIBRARY_PATH),:$(LD_LIBRARY_PATH))

DEMO_QUESTION := What are three good reasons to fine-tune a small language model instead of a large one?
DEMO_FACT_QUESTION := What is the name of camelid's mascot?
DEMO_PORT := 8765

.PHONY: demo test fuzz setup system-deps python-deps k8s-bins build-release fmt bench bench-deps

demo: setup build-release
	@echo "== camelid generate (SmolLM2-135M-Instruct, greedy, repetition penalty 1.1) =="
	@echo "Q: $(DEMO_QUESTION)"
	@target/release/camelid generate --temperature 0 --repetition-penalty 1.1 --max-tokens 200 --prompt "$(DEMO_QUESTION)"
	@echo
	@echo "== fine-tune SmolLM2 on examples/data/mascot.jsonl (examples/train-demo.yaml) =="
	@echo "Q: $(DEMO_FACT_QUESTION)"
	@echo -n "before: "; target/release/camelid generate --dtype f32 --temperature 0 --max-tokens 40 --prompt "$(DEMO_FACT_QUESTION)" 2>/dev/null
	target/release/camelid-trainer train --config examples/train-demo.yaml --resume never
	@echo -n "after:  "; target/release/camelid generate --model target/demo/finetuned --temperature 0 --max-tokens 40 --prompt "$(DEMO_FACT_QUESTION)" 2>/dev/null
	@echo
	@echo
	@echo "== camelid eval: the fine-tuned model against the base, judged by the base model (a tiny judge: it shows the mechanics, not a verdict) =="
	@examples/demo-eval.sh 8766 8767
	@echo
	@echo "== camelid serve (OpenAI API) with the fine-tuned model; one question through the official openai client =="
	@CAMELID_LOG=warn target/release/camelid serve --model target/demo/finetuned --port $(DEMO_PORT) & pid=$$!; \
	echo "Q: $(DEMO_FACT_QUESTION)"; echo -n "A: "; \
	$(PY) examples/ask_openai.py --wait 60 --max-tokens 40 --base-url http://127.0.0.1:$(DEMO_PORT)/v1 "$(DEMO_FACT_QUESTION)"; \
	status=$$?; \
	kill $$pid; wait $$pid 2>/dev/null; exit $$status
	@echo
	@echo "Serve the OpenAI API: target/release/camelid serve [--model PATH] [--port 8000]"
	@echo "Chat with the model:   target/release/camelid chat [--model target/demo/finetuned]"
	@echo "Evaluate a model:      target/release/camelid eval answer|judge|report  (see eval/README.md)"
	@echo "Train on your data:    target/release/camelid-trainer train --data FILE --output DIR   (see trainer/README.md)"

test: setup k8s-bins
	cargo fmt --all --check
	cargo clippy --workspace --all-targets -- -D warnings
	cargo test --workspace --no-fail-fast
	tools/fuzz.sh $(FUZZ_TEST_SECONDS)

# Every fuzz target (fuzz/) for FUZZ_SECONDS each; `make test` runs them for FUZZ_TEST_SECONDS from the committed seeds.
FUZZ_SECONDS ?= 300
FUZZ_TEST_SECONDS ?= 8
fuzz: setup
	tools/fuzz.sh $(FUZZ_SECONDS)

setup: system-deps python-deps

# libgloo-dev: Gloo headers for libtorch's c10d process groups (the trainer's FSDP); g++ builds tch's C++ glue;
# python3-venv where the system Python lacks ensurepip; chromium and chromium-driver run the chat page's browser test.
system-deps:
	@command -v cargo >/dev/null || { echo "cargo not found: install Rust with rustup (https://rustup.rs)"; exit 1; }
	@missing=""; \
	dpkg -s libgloo-dev >/dev/null 2>&1 || missing="$$missing libgloo-dev"; \
	command -v g++ >/dev/null || missing="$$missing g++"; \
	python3 -c 'import ensurepip' 2>/dev/null || missing="$$missing python3-venv"; \
	command -v chromium >/dev/null || missing="$$missing chromium"; \
	command -v chromedriver >/dev/null || missing="$$missing chromium-driver"; \
	if [ -n "$$missing" ]; then $(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q $$missing; fi

python-deps: $(STAMP)

# The real Kubernetes control plane the cluster tests run against (kube-apiserver, controller-manager, scheduler,
# kubectl, etcd, kwok, helm), built from source modules pinned in tools/*/go.mod into a cache outside the repo;
# skipped when the cache has them (a cold build takes about 13 minutes on 2 cores).
k8s-bins:
	@command -v go >/dev/null || { echo "go not found: install Go 1.26 (https://go.dev/dl) to build the test control plane"; exit 1; }
	tools/k8s-bins.sh

$(STAMP): requirements.txt requirements-nodeps.txt
	@[ -x $(PY) ] || python3 -m venv $(VENV)
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps --ignore-requires-python -r requirements-nodeps.txt
	@touch $@

build-release:
	cargo build --release -p camelid-cli -p camelid-eval -p camelid-trainer -p camelid-worker -p camelid-gateway

fmt:
	cargo fmt --all

BENCH_STAMP := $(VENV)/.camelid-bench-stamp

# wrk drives the gateway-overhead benchmark; bench/requirements.txt is FastChat's serving stack.
bench-deps: $(BENCH_STAMP)

$(BENCH_STAMP): bench/requirements.txt $(STAMP)
	@command -v wrk >/dev/null || { $(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q wrk; }
	$(PY) -m pip install -q -r bench/requirements.txt
	# llama.cpp for bench/quant_decode.py and bench/quant_serve.py (its server extra is in bench/requirements.txt),
	# built from source for AVX2 (a native build dies with an illegal instruction on some of these machines); the
	# build takes 10 to 30 minutes on 2 cores.
	$(PY) -c "import llama_cpp" 2>/dev/null || CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON" \
		$(PY) -m pip install -q llama-cpp-python==0.3.36
	@touch $@

bench: setup bench-deps build-release
	cargo build --release -p camelid-gateway --examples
	$(PY) bench/decode_speed.py --camelid target/release/camelid
	$(PY) bench/quant_decode.py --camelid target/release/camelid
	$(PY) bench/quant_serve.py --camelid target/release/camelid
	$(PY) bench/train_speed.py --trainer target/release/camelid-trainer
	$(PY) bench/fastchat_train.py --trainer target/release/camelid-trainer
	$(PY) bench/lora_speed.py --trainer target/release/camelid-trainer
	$(PY) bench/fsdp_speed.py --trainer target/release/camelid-trainer
	$(PY) bench/serve_speed.py --camelid target/release/camelid
	$(PY) bench/serve_vllm.py --camelid target/release/camelid
	$(PY) bench/eval_answer.py --camelid target/release/camelid
	$(PY) bench/guardrails_speed.py
	cargo build --release -p camelid-operator --bins --examples
	target/release/examples/scale 1000
	target/release/examples/scale --real 1000
