#!/usr/bin/env bash
# The demo: installs what ferry needs, builds it, starts `ferry serve` on 127.0.0.1:8470
# (state in /var/tmp/ferry-demo), defines the test VM `demo1` (1 vCPU, 256 MiB, a 1 GiB
# virtio disk, an empty CD-ROM, a NIC on the isolated bridge ferrydemo0), boots it, and
# shows `ferry vm list` and its console. The daemon and VM keep running afterwards:
#   target/release/ferry vm console demo1     (type commands; Ctrl-] detaches)
#   target/release/ferry vm stop demo1        (ACPI shutdown)
# Run it again at any time; it reuses what is there.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
cargo build --release -p ferry
ferry=$PWD/target/release/ferry
guest=${FERRY_GUEST_DIR:-/var/cache/ferry/guest}
demo=/var/tmp/ferry-demo
mkdir -p "$demo"

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
cat <<MSG

ferry is running: API http://127.0.0.1:8470/api/v1 (Swagger UI: http://127.0.0.1:8470/api/docs)
  $ferry vm console demo1     # interactive serial console, Ctrl-] detaches
  $ferry vm list | host | events | task list
  $ferry vm stop demo1        # ACPI shutdown
  kill \$(cat $demo/daemon.pid)   # stops the daemon; VMs keep running and are re-adopted at the next start
MSG
