#!/usr/bin/env bash
# routstr-node's private Tor network for tests: everything on 127.0.0.1, built from Debian's
# `tor` and `tor-gencert` (no chutney). Layout (as chutney's hs-v3-min):
#   a0..a2  directory authorities (also non-exit relays)
#   r3..r5  non-exit relays
#   c6      C tor client with a SocksPort (how the test reaches the node's onion service)
#   h7      C tor onion service -> 127.0.0.1:$HS_TARGET_PORT (an onion upstream for the node)
# No exits and no other authorities: nothing leaves loopback.
#
# Usage: tornet.sh setup|start|wait|stop|status DIR
#   setup   keys, torrcs, and DIR/arti.toml (the ARTI_CONFIG for the node); wipes DIR
#   start   start the 8 tor daemons (pid files in DIR/*/pid)
#   wait    until c6 and h7 have bootstrapped 100% (TORNET_TIMEOUT, default 180 s)
#   stop    kill the daemons by their pid files only
# Env: TORNET_BASE_PORT (15000): ORPort base+N, DirPort base+100+N, SocksPort base+206;
#      HS_TARGET_PORT (base+300); TORNET_VOTING_INTERVAL (15 s).
#
# Facts this relies on (measured; see ../shared/tor-testnet/NOTES.md of the project's workspace):
# with TestingTorNetwork C tor uses an onion-service time period of 24 voting intervals and
# ignores the consensus parameter, while arti reads `hsdir_interval` and clamps it to >= 5 min.
# So the voting interval is 15 s (a 6-minute period) and arti.toml overrides hsdir_interval = 6;
# otherwise blinded keys and HSDirs differ and onion lookups fail.
set -euo pipefail

CMD=${1:-}
NET=${2:?usage: tornet.sh setup|start|wait|stop|status DIR}
BASE=${TORNET_BASE_PORT:-15000}
HS_TARGET_PORT=${HS_TARGET_PORT:-$((BASE + 300))}
SOCKS_PORT=$((BASE + 206))
VI=${TORNET_VOTING_INTERVAL:-15}
AUTHS=(a0 a1 a2)
RELAYS=(r3 r4 r5)
ALL=(a0 a1 a2 r3 r4 r5 c6 h7)

num() { echo "${1:1}"; }
orport() { echo $((BASE + $(num "$1"))); }
dirport() { echo $((BASE + 100 + $(num "$1"))); }

common_torrc() {
  cat <<EOF
TestingTorNetwork 1
AssumeReachable 1
PathsNeededToBuildCircuits 0.25
TestingDirAuthVoteExit *
TestingDirAuthVoteGuard *
TestingDirAuthVoteHSDir *
TestingMinExitFlagThreshold 0
V3AuthNIntervalsValid 2
DataDirectory $NET/$1
Nickname $1
RunAsDaemon 1
PidFile $NET/$1/pid
Log notice file $NET/$1/notice.log
SafeLogging 0
ShutdownWaitLength 0
ConnLimit 60
Address 127.0.0.1
OutboundBindAddress 127.0.0.1
ClientUseIPv6 0
%include $NET/dirauthorities
EOF
}

relay_torrc() {
  common_torrc "$1"
  cat <<EOF
SocksPort 0
ORPort 127.0.0.1:$(orport "$1")
DirPort 127.0.0.1:$(dirport "$1")
ExitRelay 0
ExitPolicy reject *:*
TestingServerDownloadInitialDelay 0
TestingServerConsensusDownloadInitialDelay 0
EOF
}

authority_torrc() {
  relay_torrc "$1"
  cat <<EOF
AuthoritativeDirectory 1
V3AuthoritativeDirectory 1
ContactInfo $1@test.invalid
TestingV3AuthInitialVotingInterval 5
V3AuthVotingInterval $VI
TestingV3AuthInitialVoteDelay 2
V3AuthVoteDelay 2
TestingV3AuthInitialDistDelay 2
V3AuthDistDelay 2
EOF
}

setup() {
  command -v tor >/dev/null && command -v tor-gencert >/dev/null || {
    echo "tornet.sh: tor and tor-gencert are missing (apt-get install -y tor)" >&2; exit 1; }
  if [ -d "$NET" ]; then stop || true; rm -rf "$NET"; fi
  mkdir -p -m 700 "$NET"
  : > "$NET/dirauthorities"
  for n in "${ALL[@]}"; do mkdir -p -m 700 "$NET/$n"; done
  for a in "${AUTHS[@]}"; do
    mkdir -p -m 700 "$NET/$a/keys"
    echo "" | tor-gencert --create-identity-key --passphrase-fd 0 -m 12 \
      -a "127.0.0.1:$(dirport "$a")" \
      -i "$NET/$a/keys/authority_identity_key" \
      -s "$NET/$a/keys/authority_signing_key" \
      -c "$NET/$a/keys/authority_certificate" >/dev/null 2>&1 &
  done
  for n in "${AUTHS[@]}" "${RELAYS[@]}"; do
    tor --list-fingerprint --DataDirectory "$NET/$n" --ORPort "$(orport "$n")" \
        --Nickname "$n" --Address 127.0.0.1 --SocksPort 0 \
        --DirAuthority "x 127.0.0.1:1 ffffffffffffffffffffffffffffffffffffffff" \
        --quiet >/dev/null &
  done
  wait
  for a in "${AUTHS[@]}"; do
    [ -s "$NET/$a/keys/authority_certificate" ] && [ -s "$NET/$a/fingerprint" ] || {
      echo "tornet.sh: key generation failed for $a" >&2; exit 1; }
    v3=$(awk '/^fingerprint /{print $2}' "$NET/$a/keys/authority_certificate")
    fp=$(cut -d' ' -f2- "$NET/$a/fingerprint" | tr -d ' ')
    echo "DirAuthority $a orport=$(orport "$a") no-v2 v3ident=$v3 127.0.0.1:$(dirport "$a") $fp" >> "$NET/dirauthorities"
  done
  for a in "${AUTHS[@]}"; do authority_torrc "$a" > "$NET/$a/torrc"; done
  for r in "${RELAYS[@]}"; do relay_torrc "$r" > "$NET/$r/torrc"; done
  { common_torrc c6; echo "SocksPort 127.0.0.1:$SOCKS_PORT"; } > "$NET/c6/torrc"
  mkdir -p -m 700 "$NET/h7/hs"
  { common_torrc h7
    echo "SocksPort 0"
    echo "HiddenServiceDir $NET/h7/hs"
    echo "HiddenServicePort 80 127.0.0.1:$HS_TARGET_PORT"; } > "$NET/h7/torrc"
  write_arti_config
  echo "network in $NET (socks 127.0.0.1:$SOCKS_PORT)"
}

# The node's ARTI_CONFIG for this network. Storage directories are left to the node
# (TOR_STATE_DIR); only the permission check is relaxed, because test dirs live under /tmp.
write_arti_config() {
  {
    echo "# generated by tests/tor/tornet.sh for $NET (arti-client 0.47, tor-dircommon >= 0.42)"
    echo "[storage.permissions]"
    echo "dangerously_trust_everyone = true"
    echo
    echo "[path_rules]"
    echo "# every relay is on 127.0.0.1: no same-/16 family rule"
    echo "ipv4_subnet_family_prefix = 33"
    echo "ipv6_subnet_family_prefix = 129"
    echo
    echo "[address_filter]"
    echo "allow_local_addrs = true"
    echo
    echo "[vanguards]"
    echo "mode = \"disabled\""
    echo
    echo "[override_net_params]"
    echo "# C tor with TestingTorNetwork: time period = 24 voting intervals = $((2 * VI / 5)) min"
    echo "hsdir_interval = $((2 * VI / 5))"
    echo
    echo "[tor_network]"
    echo "fallback_caches = ["
    for n in "${AUTHS[@]}" "${RELAYS[@]}"; do
      rsa=$(cut -d' ' -f2- "$NET/$n/fingerprint" | tr -d ' ')
      ed=$(cut -d' ' -f2 "$NET/$n/fingerprint-ed25519")
      echo "  { rsa_identity = \"$rsa\", ed_identity = \"$ed\", orports = [\"127.0.0.1:$(orport "$n")\"] },"
    done
    echo "]"
    echo
    echo "[tor_network.authorities]"
    printf 'v3idents = ['
    for a in "${AUTHS[@]}"; do printf '"%s", ' "$(awk '/^fingerprint /{print $2}' "$NET/$a/keys/authority_certificate")"; done
    echo "]"
    for k in uploads downloads votes; do
      printf '%s = [' "$k"
      for a in "${AUTHS[@]}"; do printf '["127.0.0.1:%s"], ' "$(dirport "$a")"; done
      echo "]"
    done
  } > "$NET/arti.toml"
}

start() {
  for n in "${ALL[@]}"; do
    tor -f "$NET/$n/torrc" --quiet
  done
  for n in "${ALL[@]}"; do
    for _ in $(seq 50); do [ -s "$NET/$n/pid" ] && break; sleep 0.1; done
    [ -s "$NET/$n/pid" ] || { echo "tornet.sh: $n did not start; see $NET/$n/notice.log" >&2; exit 1; }
  done
  echo "started"
}

bootstrapped() { grep -q "Bootstrapped 100%" "$NET/$1/notice.log" 2>/dev/null; }

wait_net() {
  local deadline=$((SECONDS + ${TORNET_TIMEOUT:-180}))
  until bootstrapped c6 && bootstrapped h7; do
    if [ $SECONDS -ge $deadline ]; then
      echo "tornet.sh: timeout waiting for bootstrap" >&2
      tail -3 "$NET"/{c6,h7}/notice.log >&2
      exit 1
    fi
    sleep 1
  done
  echo "bootstrapped after ${SECONDS}s; C tor onion $(cat "$NET/h7/hs/hostname")"
}

stop() {
  for n in "${ALL[@]}"; do
    if [ -f "$NET/$n/pid" ]; then
      pid=$(cat "$NET/$n/pid")
      if kill -0 "$pid" 2>/dev/null && grep -q tor "/proc/$pid/comm"; then kill "$pid"; fi
      rm -f "$NET/$n/pid"
    fi
  done
}

status() {
  for n in "${ALL[@]}"; do
    pid=$(cat "$NET/$n/pid" 2>/dev/null || echo -)
    alive=dead; [ "$pid" != - ] && kill -0 "$pid" 2>/dev/null && alive=alive
    printf '%-3s pid=%-7s %-5s %s\n' "$n" "$pid" "$alive" "$(grep -o 'Bootstrapped [0-9]*%[^"]*' "$NET/$n/notice.log" 2>/dev/null | tail -1)"
  done
}

case "$CMD" in
  setup) setup ;;
  start) start ;;
  wait) wait_net ;;
  stop) stop ;;
  status) status ;;
  *) sed -n '2,17p' "$0"; exit 2 ;;
esac
