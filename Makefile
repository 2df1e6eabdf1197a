# volmirror — the two commands a newcomer needs:
#   make run    local broker + source agent on ./demo/source + mirror agent on ./demo/mirror + live status
#   make test   unit + integration tests against a real local Kafka broker (started once per run)
#   (make test-faults: the long fault-injection suite, tests/faults)
# Each target installs what it needs (Debian packages, Python venv and deps, Kafka jars from Maven).

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.stamp-deps

.PHONY: run test test-faults test-unit deps venv kafka-fetch kafka-start kafka-stop bench bench-quick bench-kafka clean

deps:
	@bash deploy/setup/debian-deps.sh test

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -m pip install -q --upgrade pip >/dev/null
	@$(PY) -m pip install -q -e '.[test]'
	@$(PY) -c "import aiokafka.util as u, sys; sys.exit('aiokafka C extensions missing' if u.NO_EXTENSIONS else 0)"
	@touch $(STAMP)

venv: $(STAMP)

kafka-fetch:
	@bash deploy/kafka/kafka.sh fetch

# make run DEMO_SECONDS=N: headless check for CI (sync, live edit, PASS/FAIL, stop) within N s.
# Debian packages first: kafka-fetch needs Maven.
run: venv
	@bash deploy/setup/debian-deps.sh run
	@$(MAKE) --no-print-directory kafka-fetch
	@DEMO_SECONDS='$(DEMO_SECONDS)' bash deploy/demo/run.sh

test: deps venv kafka-fetch
	@$(PY) -m pytest -q -ra --durations=10 tests/unit tests/integration

# Fault-injection suite (issue 7 item 9): ~15-20 min, root (tmpfs, chattr); report in build/fault-report.json.
test-faults: deps venv kafka-fetch
	@$(PY) -m pytest -q -ra --durations=0 tests/faults

test-unit: venv
	@$(PY) -m pytest -q tests/unit

# Benchmarks (issue 8): volmirror vs rsync / cat / lsyncd in one run, own Kafka broker; about an hour at
# full scale (writes docs/benchmarks.md and build/bench.json; exit 1 if a floor fails). bench-quick: sizes
# divided (files /10, bytes /8), a few minutes, report in build/benchmarks-quick.md.
# Extra arguments: make bench BENCH_ARGS="--only delta,latency --rounds 5"
bench: deps venv kafka-fetch
	@bash deploy/setup/debian-deps.sh bench
	@$(PY) tests/bench/run.py $(BENCH_ARGS)

bench-quick: deps venv kafka-fetch
	@bash deploy/setup/debian-deps.sh bench
	@$(PY) tests/bench/run.py --scale quick $(BENCH_ARGS)

# aiokafka vs confluent-kafka (librdkafka, own venv in build/) publishing 1 MiB records to one partition.
bench-kafka: deps venv kafka-fetch
	@$(PY) tests/bench/kafka_clients.py 512 1024
	@$(PY) tests/bench/kafka_clients.py 512 128

kafka-start: kafka-fetch
	@bash deploy/kafka/kafka.sh start

kafka-stop:
	@bash deploy/kafka/kafka.sh stop

clean:
	rm -rf demo $(VENV) build *.egg-info
