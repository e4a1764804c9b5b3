# The two commands of the README. Both bootstrap .venv from pyproject.toml on a fresh machine.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: run test venv clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

venv: $(STAMP)

run: $(STAMP)
	$(BIN)/cmcs run

test: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 --dist loadfile tests

clean:
	rm -rf $(VENV) cmcs-data .pytest_cache

# The Sparkplug B payload code (committed): regenerate after editing the .proto (protoc from
# Debian's protobuf-compiler, 3.21; the runtime `protobuf` is pinned in pyproject.toml).
.PHONY: sparkplug-proto
sparkplug-proto:
	protoc --proto_path=gateway/sparkplug --python_out=gateway/sparkplug gateway/sparkplug/sparkplug_b.proto
