#!/bin/bash
# benches/proxy-cpu.sh ROUNDS CRIER_BIN[#server-key=value]...: where the CPU per proxied request
# goes (issue 19). A `#key=value` suffix adds that line to crier's [server] section for that entry,
# so layouts compare in one run: `target/release/crier target/release/crier#event_loops=2`.
# nginx as the app (peers/nginx-app.conf, 1 worker) on 18090; alternating rounds of wrk -t1 -c64
# (DUR s, default 8) through nginx as a proxy (peers/nginx-proxy.conf, 2 workers, 18380) and
# through each crier binary (peers/crier.toml, 18080). Per round: requests/s, p99, user/sys
# µs per request of the proxy, the app and wrk (from /proc ticks and time(1)), context
# switches per request (voluntary+involuntary) and TCP segments per request (nstat).
# Run it under the bench lock on a shared machine; it uses the ports of benches/run.sh.
set -u
R=$1; shift; BINS=("$@")
P=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/peers
D=$(mktemp -d /tmp/pxc.XXXX); mkdir -p $D/app $D/ngx
sed -e "s|@RUN@|$D/app|g" $P/nginx-app.conf > $D/app/nginx.conf
nginx -p $D/app/ -c $D/app/nginx.conf 9>&-
sed -e "s|@RUN@|$D/ngx|g" -e "s|@WORKERS@|2|g" $P/nginx-proxy.conf > $D/ngx/nginx.conf
sed -e "s#@RUN@#$D#g" -e "s#@BUFFER@#100#g" $P/crier.toml > $D/c.toml
APP=$(pgrep -P $(cat $D/app/nginx.pid))
ut() { local u=0 s=0; for p in "$@"; do read a b < <(awk '{print $14, $15}' /proc/$p/stat); u=$((u+a)); s=$((s+b)); done; echo "$u $s"; }
cs() { local v=0 n=0; for p in "$@"; do for t in /proc/$p/task/*; do read a b < <(awk '/^voluntary_ctxt/{v=$2} /^nonvoluntary_ctxt/{n=$2} END{print v, n}' $t/status); v=$((v+a)); n=$((n+b)); done; done; echo "$v $n"; }
meas() { # name port pids...
  local name=$1 port=$2; shift 2
  wrk -t1 -c64 -d1s http://127.0.0.1:$port/ >/dev/null 2>&1
  read av an < <(cs $APP); read pv pn < <(cs "$@"); nstat -n
  read au as < <(ut $APP); read pu ps < <(ut "$@")
  /usr/bin/time -f "%U %S" -o $D/wt wrk -t1 -c64 -d${DUR:-8}s --latency http://127.0.0.1:$port/ > $D/w 2>&1
  read au2 as2 < <(ut $APP); read pu2 ps2 < <(ut "$@")
  read wu ws < $D/wt; nstat > $D/ns
  read av2 an2 < <(cs $APP); read pv2 pn2 < <(cs "$@")
  local n=$(awk '/requests in/{print $1}' $D/w) rps=$(awk '/Requests\/sec/{print $2}' $D/w) p99=$(awk '/ 99%/{print $2}' $D/w)
  awk -v n=$n -v "name=$name" -v rps=$rps -v p99=$p99 -v wu=$wu -v ws=$ws -v au=$((au2-au)) -v as=$((as2-as)) -v pu=$((pu2-pu)) -v ps=$((ps2-ps)) -v av=$av -v av2=$av2 -v an=$an -v an2=$an2 -v pv=$pv -v pv2=$pv2 -v pn=$pn -v pn2=$pn2 'BEGIN{
    printf "%-14s %8.0f r/s p99 %-7s | us/req user/sys: proxy %.2f/%.2f app %.2f/%.2f wrk %.2f/%.2f total %.2f | cs/req app %.2f+%.2f proxy %.2f+%.2f\n", name, rps, p99, pu*1e4/n, ps*1e4/n, au*1e4/n, as*1e4/n, wu*1e6/n, ws*1e6/n, (pu+ps+au+as)*1e4/n+(wu+ws)*1e6/n, (av2-av)/n, (an2-an)/n, (pv2-pv)/n, (pn2-pn)/n }'
  awk -v n=$n '/TcpOutSegs|TcpExtDelayedACKs|TcpExtTCPPureAcks|TcpExtTCPHPAcks|TcpExtTCPHPHits|TcpExtTCPAutoCorking|TcpExtTCPBacklog|TcpExtTCPOrigDataSent/{printf "  %s %.3f", $1, $2/n} END{print ""}' $D/ns
}
for r in $(seq $R); do
  nginx -p $D/ngx/ -c $D/ngx/nginx.conf 9>&-; sleep 0.3
  meas "r$r nginx" 18380 $(pgrep -P $(cat $D/ngx/nginx.pid))
  kill $(cat $D/ngx/nginx.pid); sleep 0.5
  for e in "${BINS[@]}"; do
    b=${e%%#*}; cfg=$D/c.toml
    if [[ $e == *#* ]]; then
      cfg=$D/c-$(echo "${e#*#}" | tr -c 'a-z0-9\n' _).toml
      awk -v line="${e#*#}" '{print} /^\[server\]/{print line}' $D/c.toml > $cfg
    fi
    $b --config $cfg >$D/log 2>&1 9>&- & PID=$!; sleep 0.5
    meas "r$r $(basename "$e")" 18080 $PID
    kill $PID; wait $PID 2>/dev/null
  done
done
kill $(cat $D/app/nginx.pid)
