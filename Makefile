# The two commands of the README. Each creates .venv when it is missing.
# On machines without CUDA, torch is pinned to the CPU build (constraints-cpu.txt); GPU machines keep theirs.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test install clean

$(STAMP): pyproject.toml constraints-cpu.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	if command -v nvidia-smi >/dev/null 2>&1; then \
		$(BIN)/python -m pip install -q -e '.[test]'; \
	else \
		$(BIN)/python -m pip install -q -c constraints-cpu.txt -e '.[test]'; \
	fi
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/paligemma-batch demo

test: $(STAMP)
	$(BIN)/python -m pytest -q -ra tests

clean:
	rm -rf $(VENV) out
