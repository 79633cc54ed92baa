#!/usr/bin/env bash
# TLS against plain text: kcopyd copies a file of random bytes into nbdkit's memory plugin and
# back out, through nbd:// and through nbds:// (nbdkit --tls=require, certificates made here
# with certtool), over loopback TCP. Each round runs the four copies in turn, the order
# rotated every round; medians of wall time and of kcopyd's CPU time (user + system; nbdkit's
# own encryption is not in it) are printed, and every copy back is compared with the source.
# nbdcopy copies through the same TLS server too, when it is installed.
#
# Usage: bench/nbd_tls.sh [SIZE_MIB [RUNS]]        (defaults: 1024 MiB, 5 rounds)
# Environment: KCOPYD (default target/release/kcopyd: cargo build --release -p kcopyd-cli),
#              BENCH_DIR (scratch files; default /var/tmp).
# Needs nbdkit and certtool (Debian: nbdkit, gnutls-bin).
set -euo pipefail
cd "$(dirname "$0")/.."

size_mib="${1:-1024}"
runs="${2:-5}"
kcopyd="${KCOPYD:-target/release/kcopyd}"
for program in nbdkit certtool "$kcopyd"; do
    command -v "$program" >/dev/null || { echo "SKIPPED: $program is not installed" >&2; exit 0; }
done

dir="$(mktemp -d "${BENCH_DIR:-/var/tmp}/kcopyd-bench-tls.XXXXXX")"
pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$dir"
}
trap cleanup EXIT

# A CA and a server certificate for 127.0.0.1 (as tests/src/tls_certs.rs makes them).
mkdir "$dir/server" "$dir/client"
certtool --generate-privkey --key-type=ecdsa --outfile "$dir/ca-key.pem" 2>/dev/null
printf 'cn = kcopyd bench CA\nca\ncert_signing_key\nexpiration_days = 2\n' >"$dir/ca.info"
certtool --generate-self-signed --load-privkey "$dir/ca-key.pem" --template "$dir/ca.info" \
    --outfile "$dir/server/ca-cert.pem" 2>/dev/null
cp "$dir/server/ca-cert.pem" "$dir/client/ca-cert.pem"
certtool --generate-privkey --key-type=rsa --bits=2048 --outfile "$dir/server/server-key.pem" 2>/dev/null
printf 'cn = kcopyd bench server\nip_address = 127.0.0.1\ntls_www_server\nsigning_key\nencryption_key\nexpiration_days = 2\n' \
    >"$dir/server.info"
certtool --generate-certificate --load-ca-certificate "$dir/server/ca-cert.pem" --load-ca-privkey "$dir/ca-key.pem" \
    --load-privkey "$dir/server/server-key.pem" --template "$dir/server.info" \
    --outfile "$dir/server/server-cert.pem" 2>/dev/null

free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
wait_port() {
    for _ in $(seq 200); do
        (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
        sleep 0.05
    done
    echo "nbdkit did not listen on port $1" >&2
    exit 1
}
plain_port="$(free_port)"
nbdkit -f -i 127.0.0.1 -p "$plain_port" memory "${size_mib}M" &
pids+=($!)
tls_port="$(free_port)"
nbdkit -f --tls=require --tls-certificates="$dir/server" -i 127.0.0.1 -p "$tls_port" memory "${size_mib}M" &
pids+=($!)
wait_port "$plain_port"
wait_port "$tls_port"
plain="nbd://127.0.0.1:$plain_port/"
tls="nbds://127.0.0.1:$tls_port/?tls-certificates=$dir/client"

head -c "$((size_mib << 20))" /dev/urandom >"$dir/source.img"
names=(plain-write tls-write plain-read tls-read)
declare -A commands=(
    [plain-write]="$kcopyd copy $dir/source.img $plain"
    [tls-write]="$kcopyd copy $dir/source.img $tls"
    [plain-read]="$kcopyd copy $plain $dir/back-plain.img"
    [tls-read]="$kcopyd copy $tls $dir/back-tls.img"
)
# nbdcopy (libnbd-bin) through the same TLS server, for comparison, when installed.
if command -v nbdcopy >/dev/null; then
    names+=(nbdcopy-tls-write nbdcopy-tls-read)
    commands[nbdcopy-tls-write]="nbdcopy $dir/source.img $tls"
    commands[nbdcopy-tls-read]="nbdcopy $tls $dir/back-nbdcopy.img"
fi
declare -A walls cpus
echo "== $size_mib MiB, $runs rounds: file -> nbdkit memory (write) and back (read), loopback TCP"
for ((round = 0; round < runs; round++)); do
    for ((i = 0; i < ${#names[@]}; i++)); do
        name="${names[(i + round) % ${#names[@]}]}"
        # A read needs the export written first: the writes of round 0 run before its reads.
        if [ "$round" = 0 ]; then name="${names[i]}"; fi
        rm -f "$dir/back-plain.img" "$dir/back-tls.img"
        : >"$dir/back-nbdcopy.img"
        # shellcheck disable=SC2086 # the command is split on purpose
        /usr/bin/time -f "%e %U %S" -o "$dir/time" ${commands[$name]} >/dev/null
        read -r wall user system <"$dir/time"
        walls[$name]+="$wall "
        cpus[$name]+="$(echo "$user + $system" | bc) "
        case "$name" in
            plain-read) cmp -s "$dir/source.img" "$dir/back-plain.img" || { echo "plain copy back differs" >&2; exit 1; } ;;
            tls-read) cmp -s "$dir/source.img" "$dir/back-tls.img" || { echo "TLS copy back differs" >&2; exit 1; } ;;
            nbdcopy-tls-read) cmp -s "$dir/source.img" "$dir/back-nbdcopy.img" || { echo "nbdcopy's copy back differs" >&2; exit 1; } ;;
        esac
    done
done
median() { tr ' ' '\n' | grep -v '^$' | sort -g | awk '{ v[NR] = $1 } END { print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }
printf '%-12s %10s %10s %12s   %s\n' copy "wall s" "cpu s" "MiB/s" "walls"
for name in "${names[@]}"; do
    wall="$(echo "${walls[$name]}" | median)"
    cpu="$(echo "${cpus[$name]}" | median)"
    printf '%-12s %10s %10s %12.0f   %s\n' "$name" "$wall" "$cpu" "$(echo "$size_mib / $wall" | bc -l)" "${walls[$name]}"
done
