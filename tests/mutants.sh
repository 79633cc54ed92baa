#!/usr/bin/env bash
# Mutation testing of the engine (crates/kcopyd-core/src/: job.rs and run.rs, the job code;
# throttle.rs, sparse.rs, io.rs, client.rs and actors.rs, what it runs on): cargo-mutants
# plants one bug at a time and runs the swarm test and the property tests against it; every
# mutant they miss is a gap in the oracle or the generator, or an equivalent mutant to explain
# in .cargo/mutants.toml. On demand, not in CI: it rebuilds the engine once per mutant.
#
#   tests/mutants.sh                         # every mutant of the seven files (hours)
#   tests/mutants.sh --only sparse.rs        # one file of crates/kcopyd-core/src (first argument);
#                                            # any cargo-mutants option goes on after it
#   tests/mutants.sh --re 'JobRun::narrow'   # one function
#   KCOPYD_SWARM_SEEDS=100 tests/mutants.sh  # more seeds per mutant (default 30)
#   MUTANT_TIMEOUT_S=120 tests/mutants.sh    # a mutant's tests are stopped after this (default 300)
#   MUTANTS_PROFILE=test tests/mutants.sh    # the cargo profile (default mutants: no debug info);
#                                            # `test` reuses a warm debug build's dependencies
#
# With --oracle (first argument), the oracle's own helpers instead (tests/src/oracle.rs,
# sectors.rs, validation.rs; settings in .cargo/mutants-oracle.toml): a mutant that weakens a
# rule must be caught by the oracle's self-tests (tests/tests/oracle_selftest.rs, the library's
# unit tests), one that makes it refuse correct runs by the swarm and the property tests.
#
#   tests/mutants.sh --oracle --in-place                        # every mutant of the oracle
#   tests/mutants.sh --oracle --in-place --file tests/src/sectors.rs
#
# Results land in mutants.out/ (caught.txt, missed.txt, timeout.txt, unviable.txt).
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v cargo-mutants >/dev/null; then
    echo "mutants.sh: cargo-mutants is not installed (cargo install cargo-mutants)" >&2
    exit 2
fi
export KCOPYD_SWARM_SEEDS="${KCOPYD_SWARM_SEEDS:-30}"
export PROPTEST_CASES="${PROPTEST_CASES:-16}"
if [[ "${1:-}" == "--oracle" ]]; then
    shift
    # The mutated package is the one with the tests, so cargo-mutants' own baseline is right.
    exec cargo mutants --config .cargo/mutants-oracle.toml --timeout "${MUTANT_TIMEOUT_S:-60}" "$@"
fi
# The baseline, run here: cargo-mutants would run its baseline on the mutated package
# (kcopyd-core), which has no swarm test. This also warms the build the mutants reuse.
echo "mutants.sh: baseline: the swarm test ($KCOPYD_SWARM_SEEDS seeds) and the property tests ($PROPTEST_CASES cases)"
config=()
if [[ "${1:-}" == "--only" ]]; then
    # The settings with examine_globs naming that file alone: `--re` would let the field
    # deletions of every other file through (cargo-mutants filters them by no regex).
    only="crates/kcopyd-core/src/${2:?--only needs a file name, e.g. sparse.rs}"
    [[ -f "$only" ]] || { echo "mutants.sh: no such file: $only" >&2; exit 2; }
    shift 2
    settings="$(mktemp --suffix=.toml)"
    trap 'rm -f "$settings"' EXIT
    sed -e '/^examine_globs = \[/,/^\]/c\examine_globs = ["'"$only"'"]' .cargo/mutants.toml >"$settings"
    config=(--config "$settings")
fi
profile="${MUTANTS_PROFILE:-mutants}"
cargo test --profile "$profile" -p kcopyd-tests --test swarm --test properties
cargo mutants "${config[@]}" --profile "$profile" --baseline=skip --timeout "${MUTANT_TIMEOUT_S:-300}" "$@"
