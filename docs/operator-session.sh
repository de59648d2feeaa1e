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
export TUNESHIELD_ADMIN_KEY="ts-admin-$(head -c 12 /dev/urandom | od -An -tx1 | tr -d ' \n')"
port=8080

show() {  # print a command as typed, then what it printed
  printf '$ %s\n' "$*"
  "$@" 2>&1
  echo
}

chat() {  # one turn of conversation $1
  curl -s "localhost:$port/v1/chat/completions" -H "Authorization: Bearer $TUNESHIELD_ADMIN_KEY" \
    -H 'Content-Type: application/json' -H "X-Conversation-Id: $1" \
    -d "{\"model\":\"chat\",\"max_tokens\":24,\"messages\":[{\"role\":\"user\",\"content\":\"$2\"}]}"
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
printf '$ curl -s localhost:%s/v1/chat/completions ... -H "X-Conversation-Id: support-1" -d {"model": "chat", ...}\n' "$port"
chat support-1 "hi, can you help me plan a picnic?" | python3 -m json.tool
echo
for index in 2 3 4 5; do
  chat "support-$index" "what should I cook for dinner tonight, idea $index?" >/dev/null
done
echo '(four more conversations, support-2 to support-5)'
echo
show tuneshield learner status
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
