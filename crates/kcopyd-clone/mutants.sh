#!/usr/bin/env bash
# Mutation testing of the clone (crates/kcopyd-clone/src, settings in mutants.toml next to this
# file): cargo-mutants plants one bug at a time and runs the clone's oracle and API tests against
# it; every mutant they miss is a gap in the oracle or an equivalent mutant to explain in
# mutants.toml or docs/CLONE.md ("Mutation testing"). On demand, not in CI.
#
#   crates/kcopyd-clone/mutants.sh --in-place                       # every mutant (one at a time)
#   crates/kcopyd-clone/mutants.sh --in-place --re 'hydration\.rs'   # one file
#   KCOPYD_CLONE_SEEDS=50 crates/kcopyd-clone/mutants.sh …          # seeds per mutant (default 30; 10 used for docs/CLONE.md)
#   MUTANT_TIMEOUT_S=120 crates/kcopyd-clone/mutants.sh …           # per mutant's tests (default 90)
#
# Results land in mutants.out/ (caught.txt, missed.txt, timeout.txt, unviable.txt).
set -euo pipefail
cd "$(dirname "$0")/../.."
if ! command -v cargo-mutants >/dev/null; then
    echo "mutants.sh: cargo-mutants is not installed (cargo install cargo-mutants)" >&2
    exit 2
fi
export KCOPYD_CLONE_SEEDS="${KCOPYD_CLONE_SEEDS:-30}"
export KCOPYD_CLONE_FAIL_FAST=1
# A test hung by a mutant fails after 60 s (.config/nextest.toml's `mutants` profile).
export NEXTEST_PROFILE=mutants
echo "mutants.sh: baseline: the clone's oracle ($KCOPYD_CLONE_SEEDS seeds) and API tests"
cargo nextest run --cargo-profile mutants -p kcopyd-clone --lib --test oracle --test api
exec cargo mutants --config crates/kcopyd-clone/mutants.toml --profile mutants --baseline=skip \
    --timeout "${MUTANT_TIMEOUT_S:-90}" "$@"
