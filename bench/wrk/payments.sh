#!/usr/bin/env bash
# Orders then payments from wrk in another process, the shape a load generator gives: BUYERS
# buyers with a balance, PRODUCT_COUNT products, CONNECTIONS connections, SECONDS per phase,
# every consumer running, default limits. Phase 1 places one-line orders of one unit (random
# buyer, random product); phase 2 pays each pending order once, as its buyer. Prints per
# phase the rate (from the rows written and their own timestamps), MariaDB statements
# (`Questions`) and commits (`Com_commit`) per unit, CPU µs of the daemon and of MariaDB per
# unit, then checks the invariants: stock taken = quantities paid, no negative balance, one
# payment per paid order, the ranking = quantities paid.
#
# Usage: bench/wrk/payments.sh BINARY   (environment: BUYERS, PRODUCT_COUNT, CONNECTIONS,
# SECONDS, THREADS, PORT). Needs wrk, python3, curl, mysql, redis-cli.
set -euo pipefail
binary=$(realpath "$1")
here=$(cd "$(dirname "$0")" && pwd)
buyers=${BUYERS:-120000}
product_count=${PRODUCT_COUNT:-100}
connections=${CONNECTIONS:-512}
seconds=${SECONDS_PER_PHASE:-20}
threads=${THREADS:-2}
port=${PORT:-18080}
database=wrk_payments_$$
secret=wrk-payments-secret
work=$(mktemp -d)
mysql_q() { mysql -uroot -h127.0.0.1 -N -B "$@"; }

export APP_DATABASE__URL="mysql://root@127.0.0.1:3306/$database"
export APP_AUTH__JWT_SECRET=$secret APP_HTTP__PORT=$port APP_REDIS__KEY_PREFIX="$database:"
export APP_INSTANCE__ID=wrk APP_LOG__FILTER=warn
"$binary" migrate >/dev/null
"$binary" serve >"$work/daemon.log" 2>&1 &
daemon=$!
cleanup() {
  kill -TERM "$daemon" 2>/dev/null || true
  wait "$daemon" 2>/dev/null || true
  mysql_q -e "DROP DATABASE IF EXISTS $database" || true
  [ -n "${userstat_was:-}" ] && mysql_q -e "SET GLOBAL userstat = $userstat_was" || true
  redis-cli --scan --pattern "$database:*" | xargs -r -n 1000 redis-cli del >/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
base=http://127.0.0.1:$port
for _ in $(seq 1 120); do curl -fs "$base/readyz" >/dev/null && break; sleep 0.5; done

mysql_q "$database" -e "INSERT INTO app_user (user_id, name, balance)
  SELECT seq, CONCAT('buyer ', seq), 100000000 FROM seq_1_to_10000000
  WHERE seq BETWEEN 2 AND $((buyers + 1))"
admin=$("$binary" token --user 1 --admin --ttl 7200)
: >"$work/products"
for number in $(seq 1 "$product_count"); do
  curl -fs -X POST "$base/products" -H "Authorization: Bearer $admin" \
    -H 'Content-Type: application/json' \
    -d "{\"name\":\"Product $number\",\"price\":1000,\"stock\":10000000}" |
    python3 -c 'import json,sys; print(json.load(sys.stdin)["productId"])' >>"$work/products"
done
python3 "$here/tokens.py" "$secret" 2 $((buyers + 1)) >"$work/tokens"
export TOKENS=$work/tokens PRODUCTS=$work/products

mariadb_pid=$(pgrep -o -x mariadbd || pgrep -o -x mysqld)
ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
status_of() { mysql_q -e "SHOW GLOBAL STATUS WHERE Variable_name IN ('Questions','Com_commit','Innodb_data_fsyncs')" | awk '{printf "%s ", $2}'; }
# Row writes per table from MariaDB's user statistics (switched on for the run, as it was after).
userstat_was=$(mysql_q -e "SELECT @@GLOBAL.userstat")
mysql_q -e "SET GLOBAL userstat = 1"
row_writes() { mysql_q -e "SELECT TABLE_NAME, ROWS_CHANGED FROM information_schema.TABLE_STATISTICS WHERE TABLE_SCHEMA = '$database'" | tr '\t\n' ': '; }
hz=$(getconf CLK_TCK)

phase() { # name wrk-script env... ; then prints the counts per unit (unit rows from $count_sql)
  local name=$1 script=$2 count_sql=$3 span_sql=$4
  local before_rows before_status before_daemon before_mariadb
  before_rows=$(mysql_q "$database" -e "$count_sql")
  mysql_q -e "FLUSH TABLE_STATISTICS"
  read -r before_commit before_fsyncs before_questions <<<"$(status_of)"
  before_daemon=$(ticks "$daemon"); before_mariadb=$(ticks "$mariadb_pid")
  WRK_THREADS=$threads wrk -t"$threads" -c"$connections" -d"${seconds}s" --timeout 10s \
    -s "$here/$script" "$base" >"$work/$name.wrk"
  local rows commit fsyncs questions daemon_ticks mariadb_ticks span writes
  rows=$(( $(mysql_q "$database" -e "$count_sql") - before_rows ))
  read -r commit fsyncs questions <<<"$(status_of)"
  writes=$(row_writes)
  daemon_ticks=$(( $(ticks "$daemon") - before_daemon ))
  mariadb_ticks=$(( $(ticks "$mariadb_pid") - before_mariadb ))
  span=$(mysql_q "$database" -e "$span_sql")
  python3 - "$name" "$rows" "$span" $((questions - before_questions)) $((commit - before_commit)) \
    "$daemon_ticks" "$mariadb_ticks" "$hz" "$work/$name.wrk" $((fsyncs - before_fsyncs)) "$writes" <<'PY'
import re, sys
name, rows, span, questions, commits, daemon, mariadb, hz, wrk, fsyncs, writes = sys.argv[1:]
rows, span = int(rows), float(span or 0)
text = open(wrk).read()
latency = re.search(r"Latency\s+(\S+)\s+(\S+)\s+(\S+)", text)
errors = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
statuses = re.search(r"statuses: (.*)", text)
per = lambda value: float(value) / max(rows, 1)
print(f"{name}: {rows} rows, {rows / span if span else 0:,.0f}/s over {span:.1f} s "
      f"(first to last row); {per(questions):.2f} statements and {per(commits):.3f} commits "
      f"per {name[:-1]}; CPU per {name[:-1]}: daemon {per(int(daemon) / int(hz) * 1e6):.0f} µs, "
      f"MariaDB {per(int(mariadb) / int(hz) * 1e6):.0f} µs; wrk latency avg {latency.group(1) if latency else '?'}; "
      f"non-2xx {errors.group(1) if errors else 0}"
      + (f" ({statuses.group(1)})" if statuses else ""))
tables = [pair.split(":") for pair in writes.split() if ":" in pair]
print(f"  {per(fsyncs):.3f} InnoDB fsyncs per {name[:-1]}; row writes per {name[:-1]} (during the phase): "
      f"{per(sum(int(n) for _, n in tables)):.2f} = "
      + ", ".join(f"{table} {per(int(n)):.2f}" for table, n in sorted(tables, key=lambda t: -int(t[1]))))
PY
}

phase orders orders.lua "SELECT COUNT(*) FROM customer_order" \
  "SELECT TIMESTAMPDIFF(MICROSECOND, MIN(created_at), MAX(created_at)) / 1e6 FROM customer_order"
mysql_q "$database" -e "SELECT order_id, user_id FROM customer_order WHERE status = 'PENDING' ORDER BY order_id" |
  python3 -c '
import sys
tokens = dict(line.split() for line in open(sys.argv[1]))
for line in sys.stdin:
    order, user = line.split()
    print(order, tokens[user])' "$work/tokens" >"$work/orders"
export ORDERS=$work/orders
pay_start_daemon=$(ticks "$daemon"); pay_start_mariadb=$(ticks "$mariadb_pid")
phase payments pay.lua "SELECT COUNT(*) FROM payment" \
  "SELECT TIMESTAMPDIFF(MICROSECOND, MIN(paid_at), MAX(paid_at)) / 1e6 FROM payment"
phase_end=$(date +%s.%N)
left=$(mysql_q "$database" -e "SELECT COUNT(*) FROM customer_order WHERE status = 'PENDING'")
echo "orders left unpaid at the end of the payment phase: $left"

# Invariants, once the last payments answered after wrk stopped are in and the consumers
# have caught up (the ranking counts every paid unit).
count_payments() { mysql_q "$database" -e "SELECT COUNT(*) FROM payment"; }
settled=$(count_payments)
for _ in $(seq 1 60); do
  sleep 1
  now=$(count_payments)
  [ "$now" = "$settled" ] && break
  settled=$now
done
paid_units=$(mysql_q "$database" -e "SELECT COALESCE(SUM(i.quantity), 0) FROM order_item i JOIN customer_order o USING (order_id) WHERE o.status = 'COMPLETED'")
for _ in $(seq 1 600); do
  ranked=$(curl -fs "$base/products/ranking?limit=100" | python3 -c 'import json,sys; print(sum(i["quantity"] for i in json.load(sys.stdin)))')
  [ "$ranked" = "$paid_units" ] && break
  sleep 0.2
done
# The consumers' backlog at the end of the phase: how long after it the ranking (and the
# analytics forwarder, whose rows leave PENDING/PUBLISHED) caught up, and the CPU per payment
# from the start of the phase to then.
for _ in $(seq 1 600); do
  behind=$(mysql_q "$database" -e "SELECT COUNT(*) FROM event_log WHERE event_type = 'OrderCompleted' AND status IN ('PENDING', 'PUBLISHED', 'IN_PROGRESS')")
  [ "$behind" = 0 ] && break
  sleep 0.2
done
caught_up=$(date +%s.%N)
payments=$(count_payments)
python3 -c "
import sys
end, caught, payments, daemon, mariadb, hz = map(float, sys.argv[1:])
print(f'consumers caught up {caught - end:.1f} s after the payment phase; CPU per payment to then: '
      f'daemon {daemon / hz * 1e6 / payments:.0f} µs, MariaDB {mariadb / hz * 1e6 / payments:.0f} µs')
" "$phase_end" "$caught_up" "$payments" $(( $(ticks "$daemon") - pay_start_daemon )) \
  $(( $(ticks "$mariadb_pid") - pay_start_mariadb )) "$hz"
# Ranking lag, from each payment's commit to its units in the sorted set (the daemon's
# histogram, interpolated within its buckets).
curl -fs "$base/metrics" | python3 -c '
import re, sys
buckets = []
for line in sys.stdin:
    found = re.match(r"payment_ranking_applied_seconds_bucket\{le=\"([^\"]+)\"\} (\S+)", line)
    if found:
        buckets.append((float("inf") if found.group(1) == "+Inf" else float(found.group(1)), float(found.group(2))))
total = buckets[-1][1] if buckets else 0
def quantile(q):
    rank, lower, below = q * total, 0.0, 0.0
    for bound, count in buckets:
        if count >= rank:
            if bound == float("inf"): return lower
            return lower + (bound - lower) * (rank - below) / max(count - below, 1)
        lower, below = bound, count
    return lower
within = next((count for bound, count in buckets if bound == 0.1), 0)
print(f"ranking lag (commit → sorted set) over {total:.0f} payments: p50 {quantile(0.5) * 1e3:.0f} ms, "
      f"p99 {quantile(0.99) * 1e3:.0f} ms; within 100 ms: {100 * within / max(total, 1):.1f} %")'
mysql_q "$database" -e "
  SELECT 'stock taken = units paid',
         (SELECT 10000000 * COUNT(*) - SUM(stock) FROM product) = $paid_units;
  SELECT 'no negative balance', (SELECT COUNT(*) FROM app_user WHERE balance < 0) = 0;
  SELECT 'one payment per paid order',
         (SELECT COUNT(*) FROM payment) = (SELECT COUNT(*) FROM customer_order WHERE status = 'COMPLETED')
         AND (SELECT COUNT(DISTINCT order_id) FROM payment) = (SELECT COUNT(*) FROM payment);
  SELECT 'balances debited = payments', (SELECT SUM(100000000 - balance) FROM app_user WHERE user_id > 1) = (SELECT SUM(amount) FROM payment);" |
  sed 's/\t1$/: yes/; s/\t0$/: NO/'
echo "ranking = units paid: $([ "$ranked" = "$paid_units" ] && echo yes || echo "NO ($ranked of $paid_units)")"
