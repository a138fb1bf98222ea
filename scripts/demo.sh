#!/usr/bin/env bash
# The demo: installs what ferry needs, builds it, starts `ferry serve` on 127.0.0.1:8470
# (state in /var/tmp/ferry-demo), defines the test VM `demo1` (1 vCPU, 256 MiB, a 1 GiB
# virtio disk, an empty CD-ROM, a NIC on the isolated bridge ferrydemo0), boots it, and
# shows `ferry vm list` and its console. Then a 3-host lab cluster (`ferry lab up --name
# demo`: namespaces, one daemon and etcd member per host, a shared pool) with the HA VM
# `web` on the shared pool, moved live to another host while the client pings it; then
# the host it runs on is killed and HA restarts web on another one, and the host comes
# back. Then the web UI: the demo daemon's at https://127.0.0.1:8470/ and the lab
# cluster's (h1's, relayed by `ferry lab expose`) at https://127.0.0.1:8471/: log in as
# root with the password the demo set (printed at the end; each host's certificate is
# signed by its cluster's own CA: the browser asks once). The lab also gets a user
# `operator` (Operator on /) with the same password. Everything keeps running (the CLI reaches the demo daemon over its
# local socket, FERRY_SOCKET=/var/tmp/ferry-demo/run/api.sock):
#   FERRY_SOCKET=... target/release/ferry vm console demo1     (type commands; Ctrl-] detaches)
#   FERRY_SOCKET=... target/release/ferry vm stop demo1        (ACPI shutdown)
# Run it again at any time; it reuses what is there.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
cargo build --release -p ferry
ferry=$PWD/target/release/ferry
guest=${FERRY_GUEST_DIR:-/var/cache/ferry/guest}
demo=/var/tmp/ferry-demo
mkdir -p "$demo"
# The CLI talks to the demo daemon over its local socket (root only).
export FERRY_SOCKET=$demo/run/api.sock

if ! "$ferry" host >/dev/null 2>&1; then
  echo "== starting ferry serve (log: $demo/daemon.log)"
  setsid "$ferry" serve --state-dir "$demo/state" --run-dir "$demo/run" >>"$demo/daemon.log" 2>&1 < /dev/null &
  echo $! > "$demo/daemon.pid"
  for _ in $(seq 100); do "$ferry" host >/dev/null 2>&1 && break; sleep 0.1; done
fi
"$ferry" host

"$ferry" net bridge create ferrydemo0 >/dev/null
if ! "$ferry" vm show demo1 >/dev/null 2>&1; then
  echo "== defining demo1"
  "$ferry" vm create demo1 --cpus 1 --memory 256M \
    --disk bus=virtio,size=1G --cdrom empty --nic bridge=ferrydemo0 \
    --kernel "$guest/vmlinux" --initrd "$guest/initrd.img" \
    --append "console=ttyS0 quiet ip=10.99.0.10/24 ferry.hostname=demo1"
fi
state=$("$ferry" --json vm show demo1 | python3 -c 'import json,sys; print(json.load(sys.stdin)["state"])')
if [ "$state" != running ]; then
  echo "== starting demo1"
  "$ferry" vm start demo1
fi
echo "== waiting for the guest's ready marker"
for _ in $(seq 240); do
  "$ferry" vm console demo1 --history 2>/dev/null | grep -q FERRY-READY && break
  sleep 0.25
done
echo "== ferry vm list"
"$ferry" vm list
echo "== the guest answers on its serial console"
printf 'echo "hello from $(hostname): up $(cut -d" " -f1 /proc/uptime)s, disks: $(ls /sys/block | tr "\\n" " ")"\n' \
  | "$ferry" vm console demo1 | tail -n 3
echo
echo "== a 3-host lab cluster: ferry lab up --hosts 3 --name demo"
on() { local h=$1; shift; "$ferry" lab exec --name demo "$h" -- "$ferry" "$@"; }
# (Re)made unless a demo lab with an etcd cluster runs already.
if ! "$ferry" lab status --name demo >/dev/null 2>&1 \
   || ! on h1 --json cluster status 2>/dev/null | grep -q '"clustered": *true'; then
  "$ferry" lab down --name demo >/dev/null
  "$ferry" lab up --hosts 3 --name demo
fi
where=""
for h in h1 h2 h3; do
  if on "$h" vm show web >/dev/null 2>&1; then where=$h; fi
done
if [ -z "$where" ]; then
  echo "== defining web on h1 (disk on the shared pool, NIC on the host bridge)"
  on h1 vm create web --cpus 1 --memory 256M --disk pool=shared,size=1G --nic bridge=br0 --ha restart \
    --kernel "$guest/vmlinux" --initrd "$guest/initrd.img" \
    --append "console=ttyS0 quiet ip=10.78.0.100/24 ferry.hostname=web"
  where=h1
fi
state=$(on "$where" --json vm show web | python3 -c 'import json,sys; print(json.load(sys.stdin)["state"])')
[ "$state" = running ] || on "$where" vm start web
for _ in $(seq 240); do
  on "$where" vm console web --history 2>/dev/null | grep -q FERRY-READY && break
  sleep 0.25
done
to=h2; [ "$where" = h2 ] && to=h3
echo "== live migration of web: $where -> $to, while the client pings it every 10 ms"
"$ferry" lab exec --name demo client -- ping -q -i 0.01 -w 4 10.78.0.100 > "$demo/ping.txt" 2>&1 &
pinger=$!
sleep 1
on "$where" vm migrate web --to "$to"
wait "$pinger" || true
tail -n 2 "$demo/ping.txt"

echo "== HA: host $to dies (every process: daemon, etcd member, QEMU); web restarts on another host"
on "$to" vm ha web --ha restart >/dev/null
"$ferry" lab kill "$to" --name demo
t0=$(date +%s.%N)
new=""
for _ in $(seq 240); do
  for h in h1 h2 h3; do
    [ "$h" = "$to" ] && continue
    s=$(on "$h" --json vm show web 2>/dev/null | python3 -c 'import json,sys; print(json.load(sys.stdin)["state"])' 2>/dev/null || true)
    if [ "$s" = running ]; then new=$h; break 2; fi
  done
  sleep 0.25
done
[ -n "$new" ] || { echo "web was not restarted" >&2; exit 1; }
until "$ferry" lab exec --name demo client -- ping -c 1 -W 1 10.78.0.100 >/dev/null 2>&1; do sleep 0.2; done
echo "web runs on $new and answers pings $(python3 -c "print(round($(date +%s.%N) - $t0, 1))") s after the host died"
on "$new" cluster status
echo "== host $to comes back (its daemon restarts its etcd member and rejoins)"
"$ferry" lab start "$to" --name demo >/dev/null
for _ in $(seq 120); do
  on "$new" --json cluster status 2>/dev/null | python3 -c 'import json,sys; s=json.load(sys.stdin); sys.exit(0 if all(m["state"]=="online" for m in s["members"]) else 1)' && break
  sleep 0.5
done
on "$new" cluster status
echo "== DRS: where web would run best (each host's filters and score), and a balancing plan"
on "$new" vm place web --explain
on "$new" drs plan
echo "== replicated storage: pool r1 keeps a copy of each volume on h1 and h2, written to both synchronously"
on h1 pool show r1 >/dev/null 2>&1 \
  || on h1 pool create r1 --type replicated --hosts h1,h2 --path "/var/tmp/ferry-lab/demo/repl-{host}"
on h1 volume show r1 data >/dev/null 2>&1 || on h1 volume create r1 data --size 64M
on h1 volume promote r1 data
sock=$(on h1 --json volume replication r1 data | python3 -c 'import json,sys; s=json.load(sys.stdin); print([r["replica"]["nbd_socket"] for r in s["replicas"] if r["host"]=="h1"][0])')
echo "qemu-io writes 16 MiB through h1's NBD export of r1/data:"
qemu-io --image-opts "driver=raw,file.driver=nbd,file.server.type=unix,file.server.path=$sock,file.export=r1/data" \
  -c "write -P 0xab 0 16M" -c flush | grep -v '^$'
on h1 volume replication r1 data
on h1 volume verify r1 data
on h1 volume demote r1 data
"$ferry" lab status --name demo

echo "== the web UI: served by every daemon; the lab's h1 made reachable on 127.0.0.1:8471"
# The lab's h1 is reached as "h1" (its certificate's name) at the relay's address.
lab_ca=/var/tmp/ferry-lab/demo/h1/state/pki/ca.crt
lab_curl() { curl --cacert "$lab_ca" --connect-to h1:8471:127.0.0.1:8471 "$@"; }
if ! lab_curl -sf -o /dev/null https://h1:8471/; then
  setsid "$ferry" lab expose h1 --name demo --listen 127.0.0.1:8471 >>"$demo/expose.log" 2>&1 < /dev/null &
  echo $! > "$demo/expose.pid"
  for _ in $(seq 50); do lab_curl -sf -o /dev/null https://h1:8471/ && break; sleep 0.1; done
fi
# root's password (made once, kept 0600 beside each daemon's state) for the web UI.
secret() { [ -s "$1" ] || (umask 077; head -c 12 /dev/urandom | base64 | tr -d '/+=' > "$1"); cat "$1"; }
pw=$(secret "$demo/root-password")
"$ferry" user passwd root --password-file "$demo/root-password" >/dev/null
lab_pw_file=/var/tmp/ferry-lab/demo/root-password
lab_pw=$(secret "$lab_pw_file")
on h1 user passwd root --password-file "$lab_pw_file" >/dev/null
has() { python3 -c "import json,sys; sys.exit(0 if any(x.get('$1')=='$2' for x in json.load(sys.stdin)) else 1)"; }
on h1 --json user list | has name operator || on h1 user add operator --password-file "$lab_pw_file" >/dev/null
on h1 --json acl list | has user operator || on h1 acl grant Operator / operator >/dev/null
demo_curl() { curl --cacert "$demo/state/pki/ca.crt" "$@"; }
for u in https://127.0.0.1:8470 https://h1:8471; do
  p=$pw; c=demo_curl
  [ "$u" = https://h1:8471 ] && { p=$lab_pw; c=lab_curl; }
  ticket=$($c -s -H 'content-type: application/json' -d "{\"user\":\"root\",\"password\":\"$p\"}" "$u/api/v1/login" \
    | python3 -c 'import json,sys; print(json.load(sys.stdin).get("ticket") or "")')
  printf '%s/  page: %s  login as root: %s  hosts: %s\n' "$u" \
    "$($c -s "$u/" | grep -o '<title>[^<]*</title>')" \
    "$([ -n "$ticket" ] && echo ok || echo FAILED)" \
    "$($c -s -H "authorization: Bearer $ticket" "$u/api/v1/cluster/hosts" | python3 -c 'import json,sys; print(", ".join(h["name"] for h in json.load(sys.stdin)) or "this one")')"
done
demo_fp=$("$ferry" --json cluster certs status | python3 -c 'import json,sys; print(json.load(sys.stdin)["ca"]["fingerprint"])')
to=$new
back=h1; [ "$to" = h1 ] && back=h2

cat <<MSG

ferry is running: web UI https://127.0.0.1:8470/ (user root, password $pw)
  its CA: $demo/state/pki/ca.crt, fingerprint $demo_fp
  API https://127.0.0.1:8470/api/v1 (Swagger UI: https://127.0.0.1:8470/api/docs)
The lab cluster's web UI (through h1): https://127.0.0.1:8471/ (user root or operator, password $lab_pw)
  its CA: $lab_ca
  kill \$(cat $demo/expose.pid)   # stops relaying it
  export FERRY_SOCKET=$FERRY_SOCKET   # the CLI talks to the demo daemon over its local socket
  $ferry vm console demo1     # interactive serial console, Ctrl-] detaches
  $ferry vm list | host | events | task list
  $ferry vm stop demo1        # ACPI shutdown
  $ferry host stop-all        # every VM down as its startup policy says (what the host's shutdown runs)
  kill \$(cat $demo/daemon.pid)   # stops the daemon; VMs keep running and are re-adopted at the next start
The lab cluster (hosts h1-h3 at 10.78.0.11-13, web at 10.78.0.100, client 10.78.0.2):
  $ferry lab status --name demo
  $ferry lab exec --name demo $to -- $ferry vm migrate web --to $back
  $ferry lab exec --name demo h1 -- $ferry host list
  $ferry lab exec --name demo h1 -- $ferry cluster status
  $ferry lab exec --name demo h1 -- $ferry drs status      # drs config --mode automatic: balancing by live migration
  $ferry lab exec --name demo h1 -- $ferry volume replication r1 data   # a replicated volume (copies on h1, h2)
  $ferry lab cut h2 --name demo ; $ferry lab heal h2 --name demo ; $ferry lab kill h2 --name demo ; $ferry lab start h2 --name demo
  $ferry lab down --name demo
MSG
