#!/usr/bin/env bash
# A ClusterRunner build with nothing but curl: sign the request with the cluster secret, submit it
# to an Ish CD gateway (or a ClusterRunner master), wait for the build, download artifacts.zip.
#
# Usage:  GATEWAY=http://127.0.0.1:43000 SECRET=<secret> clusterrunner-curl.sh BODY [OUT.zip]
#   BODY     a file holding the build request JSON, or the JSON text itself, e.g.
#            '{"type": "git", "url": "https://github.com/you/project.git", "job_name": "Tests"}'
#   OUT.zip  where to save the artifacts (default: artifacts.zip)
# Environment:
#   GATEWAY        base URL of the gateway (default http://127.0.0.1:43000)
#   SECRET         the key of the message digest: the gateway's rest_secret, by default the
#                  cluster secret (required)
#   POLL_INTERVAL  seconds between polls (default 2)
#   TIMEOUT        seconds to wait for the build and for its archive (default 3600)
# Exit status: 0 the build finished with NO_FAILURES; 1 it finished with FAILURE; 2 it ended in
# ERROR or CANCELED, was refused, timed out, or anything else went wrong.
#
# The digest is the hex HMAC-SHA512 of the exact body bytes sent (header
# Clusterrunner-Message-Authentication-Digest), computed with python3's hmac module, or with
# `openssl dgst -sha512 -hmac` when python3 is missing (openssl puts the secret on its command
# line, where other local users can see it in `ps`).
set -euo pipefail

die() {
    echo "clusterrunner-curl: $*" >&2
    exit 2
}

[ $# -ge 1 ] || die "usage: GATEWAY=<url> SECRET=<secret> $0 BODY.json|'<json>' [OUT.zip]"
GATEWAY=${GATEWAY:-http://127.0.0.1:43000}
GATEWAY=${GATEWAY%/}
[ -n "${SECRET:-}" ] || die "set SECRET to the cluster secret"
OUT=${2:-artifacts.zip}
POLL_INTERVAL=${POLL_INTERVAL:-2}
TIMEOUT=${TIMEOUT:-3600}
command -v curl >/dev/null || die "curl is required"

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
body="$tmp/body.json"
if [ -f "$1" ]; then
    cp -- "$1" "$body"
else
    printf '%s' "$1" >"$body"
fi

# digest FILE: hex HMAC-SHA512 of FILE's bytes keyed by $SECRET.
digest() {
    if command -v python3 >/dev/null; then
        SECRET="$SECRET" python3 -c 'import hashlib, hmac, os, sys
print(hmac.new(os.environ["SECRET"].encode(), sys.stdin.buffer.read(), hashlib.sha512).hexdigest())' <"$1"
    elif command -v openssl >/dev/null; then
        openssl dgst -sha512 -hmac "$SECRET" -r <"$1" | cut -d' ' -f1
    else
        die "python3 or openssl is needed to compute the digest"
    fi
}

# field FILE PATH: a string or number field of a JSON file, PATH dotted (build.status). Without
# python3, the first occurrence of the last key (the gateway writes a build's `status` before
# anything else that could hold that key).
field() {
    if command -v python3 >/dev/null; then
        python3 -c 'import json, sys
v = json.load(open(sys.argv[1]))
for k in sys.argv[2].split("."):
    v = v.get(k) if isinstance(v, dict) else None
print("" if v is None else v)' "$1" "$2"
    else
        local key=${2##*.}
        grep -o "\"$key\": *\(\"[^\"]*\"\|[0-9][0-9]*\)" "$1" | head -n1 |
            sed -e 's/^[^:]*: *//' -e 's/^"//' -e 's/"$//'
    fi
}

sig=$(digest "$body")
# Reads carry the digest of their empty body: ignored unless the gateway requires auth for reads.
read_sig=$(digest /dev/null)
DIGEST_HEADER=Clusterrunner-Message-Authentication-Digest

# get URL FILE: prints the HTTP status; the body goes to FILE.
get() {
    curl -sS -o "$2" -w '%{http_code}' -H "$DIGEST_HEADER: $read_sig" "$1" ||
        die "cannot reach $GATEWAY"
}

code=$(curl -sS -o "$tmp/submit.json" -w '%{http_code}' -X POST \
    -H "$DIGEST_HEADER: $sig" -H 'Content-Type: application/json' \
    --data-binary @"$body" "$GATEWAY/v1/build") || die "cannot reach $GATEWAY"
[ "$code" = 202 ] || die "the build was refused (HTTP $code): $(cat "$tmp/submit.json")"
id=$(field "$tmp/submit.json" build_id)
[ -n "$id" ] || die "no build_id in the answer: $(cat "$tmp/submit.json")"
echo "Submitted build $id to $GATEWAY" >&2

deadline=$(($(date +%s) + TIMEOUT))
last=""
while :; do
    code=$(get "$GATEWAY/v1/build/$id" "$tmp/build.json")
    [ "$code" = 200 ] || die "polling build $id failed (HTTP $code): $(cat "$tmp/build.json")"
    status=$(field "$tmp/build.json" build.status)
    if [ "$status" != "$last" ]; then
        echo "Build $id: $status" >&2
        last=$status
    fi
    case $status in FINISHED | ERROR | CANCELED) break ;; esac
    [ "$(date +%s)" -lt "$deadline" ] || die "build $id did not finish within ${TIMEOUT}s"
    sleep "$POLL_INTERVAL"
done
case $status in
ERROR) die "build $id ended in ERROR: $(field "$tmp/build.json" build.error_message)" ;;
CANCELED) die "build $id was canceled" ;;
esac
result=$(field "$tmp/build.json" build.result)

# 202 until the archive is written.
while :; do
    code=$(get "$GATEWAY/v1/build/$id/artifacts.zip" "$tmp/artifacts.zip")
    case $code in
    200) break ;;
    202) [ "$(date +%s)" -lt "$deadline" ] || die "artifacts of build $id not ready in time" ;;
    *) die "downloading artifacts.zip of build $id failed (HTTP $code)" ;;
    esac
    sleep "$POLL_INTERVAL"
done
mv -- "$tmp/artifacts.zip" "$OUT"
echo "Build $id finished: $result; artifacts in $OUT" >&2
echo "$OUT"
[ "$result" = NO_FAILURES ]
