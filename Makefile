# The two commands of the README: `make run` and `make test`. Both install what is missing.
SHELL := /bin/bash
export PATH := $(HOME)/.cargo/bin:$(PATH)

.PHONY: run test deps build release lint bench-load schema

deps:
	@./scripts/ensure-deps.sh

## Run the proxy on its embedded default config (127.0.0.1:8080 → built-in demo backend).
run: deps
	cargo run --release --bin palisade -- run

## Run the whole test suite: unit, end-to-end (real binary, real backends), and lints.
test: deps lint
	cargo build --workspace --all-targets
	cargo test --workspace -- --test-threads=4
	./target/debug/palisade check
	./target/debug/palisade check --config examples/rules-demo.yaml
	./target/debug/palisade check --config examples/managed.yaml
	./target/debug/palisade check --config examples/validation.yaml
	./target/debug/palisade check --config examples/openapi.yaml
	./target/debug/palisade check --config examples/validation-bench.yaml
	./target/debug/palisade test --config examples/rules-demo.yaml rulesets/examples
	./target/debug/palisade test rulesets

build: deps
	cargo build --release --bin palisade

lint:
	cargo fmt --all -- --check
	cargo clippy --all-targets -- -D warnings

## Regenerate the JSON Schemas after changing the config or rule-set structs.
schema:
	cargo run -q --bin palisade -- schema > schemas/palisade-config.schema.json
	cargo run -q --bin palisade -- schema --ruleset > schemas/palisade-ruleset.schema.json

## End-to-end load comparison with nginx on loopback (see benches/load.sh).
bench-load: build
	./benches/load.sh
