#!/usr/bin/env bash
# A new operator's first session, captured as docs/operator-session.md:
#   bash docs/operator-session.sh > docs/operator-session.md
# A fresh data dir, `tuneshield serve` on the embedded default (vLLM on SmolLM2-135M), chats
# with curl, a learning round followed to its end, two rollbacks, and Ctrl-C. Everything
# each command prints is kept, the server's own output included. ~10 min on 2 cores.
set -uo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/.venv/bin:$PATH"
work=$(mktemp -d)
export TUNESHIELD_DATA_DIR="$work/data"
# Wide enough that no table or message wraps, as in most terminals.
export COLUMNS=120
export TUNESHIELD_ADMIN_KEY="ts-admin-$(head -c 12 /dev/urandom | od -An -tx1 | tr -d ' \n')"
port=8080

show() {  # print a command as typed, then what it printed
  printf '$ %s\n' "$*"
  "$@" 2>&1
  echo
}

chat() {  # one turn of conversation $1: its messages so far are $2 (a JSON list)
  curl -s "localhost:$port/v1/chat/completions" -H "Authorization: Bearer $TUNESHIELD_ADMIN_KEY" \
    -H 'Content-Type: application/json' -H "X-Conversation-Id: $1" \
    -d "{\"model\":\"chat\",\"max_tokens\":24,\"messages\":$2}"
}

echo '# A new operator'"'"'s session'
echo
echo 'Reproduce: `bash docs/operator-session.sh > docs/operator-session.md` (a fresh data dir,'
echo 'the embedded default, ~10 min on 2 cores). The admin key comes from'
echo '`TUNESHIELD_ADMIN_KEY`; the server runs in the background and its whole output is at the end.'
echo
echo '```'
serve_log="$work/serve.log"
setsid tuneshield serve --port "$port" >"$serve_log" 2>&1 &
serve_pid=$!
printf '$ tuneshield serve --port %s &\n' "$port"
for _ in $(seq 600); do
  curl -sf "localhost:$port/healthz" >/dev/null && break
  sleep 1
done
echo
first='[{"role":"user","content":"hi, can you help me plan a picnic?"}]'
printf '$ curl -s localhost:%s/v1/chat/completions -H "Authorization: Bearer $KEY" \\\n' "$port"
printf "    -H 'Content-Type: application/json' -H 'X-Conversation-Id: support-1' \\\\\n"
printf "    -d '{\"model\":\"chat\",\"max_tokens\":24,\"messages\":%s}'\n" "$first"
chat support-1 "$first" | python3 -m json.tool
echo
# What a round learns from: a reply with the conversation before it as context.
for index in 1 2 3 4 5 6; do
  chat "support-$index" "[{\"role\":\"user\",\"content\":\"do you like to cook?\"},
    {\"role\":\"assistant\",\"content\":\"I do! What do you like to make?\"},
    {\"role\":\"user\",\"content\":\"soup, mostly. give me idea number $index\"}]" >/dev/null
done
echo '(six conversations of three turns each, support-1 to support-6, the same way)'
echo
show tuneshield learner status
# Turns younger than settle_s (policies/learner.yaml) are left for the next round.
show sleep 5
show tuneshield learner run --wait
show tuneshield adapters history
show tuneshield adapters rollback
show tuneshield adapters rollback
show tuneshield adapters list
printf '$ kill -INT %%1   # Ctrl-C\n'
kill -INT -- -"$serve_pid"  # the whole process group, as a terminal's Ctrl-C
wait "$serve_pid"
echo "(serve exited with status $?)"
echo '```'
echo
echo '`tuneshield serve`'"'"'s output, from start to stop:'
echo
echo '```'
cat "$serve_log"
echo '```'
rm -rf "$work"
