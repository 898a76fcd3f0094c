#!/bin/sh
# ztai vm-test: runs in the guest as busybox init's sysinit job (so init
# reaps orphans). Mounts what the tests need, checks that the agent starts
# (or records its refusal), runs every test binary, prints one
# ZTAI-VM-RESULT line and powers off. Settings come from /ztai/config.
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export HOME=/root TMPDIR=/tmp LANG=C.UTF-8
. /ztai/config

uptime_s() { cut -d' ' -f1 /proc/uptime; }
say() { echo "ZTAI-VM: $*"; }
finish() {
    echo "ZTAI-VM-DONE uptime=$(uptime_s)"
    sync
    poweroff -f
    sleep 5
    echo o >/proc/sysrq-trigger
}

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs -o mode=1777 tmpfs /dev/shm
mount -t tmpfs -o mode=1777 tmpfs /tmp
mount -t tmpfs -o mode=755 tmpfs /run
mkdir -p /sys/fs/cgroup /sys/fs/bpf
mount -t cgroup2 -o nsdelegate cgroup2 /sys/fs/cgroup || say "cannot mount cgroup2 on /sys/fs/cgroup"
mount -t bpf -o mode=700 bpf /sys/fs/bpf || say "cannot mount bpffs on /sys/fs/bpf"
mount -t debugfs debugfs /sys/kernel/debug 2>/dev/null
mount -t tracefs tracefs /sys/kernel/tracing 2>/dev/null
hostname ztai-vm
ip link set lo up || say "cannot bring lo up"
ulimit -l unlimited 2>/dev/null
ulimit -n 65536 2>/dev/null

for m in $(cat /ztai/modules/order 2>/dev/null); do
    insmod "/ztai/modules/$m.ko" || say "insmod $m failed"
done

echo "ZTAI-VM-INIT kernel=$KERNEL release=$(uname -r) cpus=$(nproc) uptime=$(uptime_s)"
[ -e /sys/kernel/btf/vmlinux ] || say "this kernel has no /sys/kernel/btf/vmlinux (BTF)"

# Does the agent start at all? A kernel it does not support gets a refusal
# naming the missing feature: record it, then run the suite anyway, where
# every test that needs the agent skips with that same reason (the tests ask
# the agent's own kernel check) and the rest still run.
mkdir -p /sys/fs/cgroup/ztai-vm-preflight
t0=$(uptime_s)
/ztai/bin/ztai-agent run --policy /ztai/preflight.yaml --cgroup-root /sys/fs/cgroup/ztai-vm-preflight \
    --metrics-addr off --control-socket off --pin-dir off --detach-on-exit \
    >/tmp/preflight.out 2>/tmp/preflight.err &
pid=$!
state=timeout
i=0
while [ "$i" -lt $((PREFLIGHT_TIMEOUT * 5)) ]; do
    if grep -q '"msg":"ready"' /tmp/preflight.err; then state=ready; break; fi
    st=$(cut -d' ' -f3 "/proc/$pid/stat" 2>/dev/null)
    if [ -z "$st" ] || [ "$st" = Z ]; then state=exited; break; fi
    sleep 0.2
    i=$((i + 1))
done
agent=ok
refused=
case $state in
ready)
    echo "ZTAI-VM-PREFLIGHT ready seconds=$(awk "BEGIN{print $(uptime_s)-$t0}")"
    kill -TERM "$pid"
    wait "$pid"
    ;;
*)
    if [ "$state" = timeout ]; then kill -KILL "$pid"; fi
    wait "$pid"
    rc=$?
    sed 's/^/ZTAI-VM-AGENT-LOG /' /tmp/preflight.err /tmp/preflight.out
    reason=$(sed -n 's/.*"error":"\([^"]*\)".*/\1/p' /tmp/preflight.err | tail -n 1)
    [ -n "$reason" ] || reason=$(tail -n 1 /tmp/preflight.err)
    echo "ZTAI-VM-PREFLIGHT $state rc=$rc error=$reason"
    case $reason in
    *"arrived in Linux"* | *"which ztai needs"*)
        echo "ZTAI-VM-REFUSED $reason"
        refused=$reason
        agent=refused
        ;;
    *) agent=failed ;;
    esac
    ;;
esac
rmdir /sys/fs/cgroup/ztai-vm-preflight 2>/dev/null

export ZTAI_AGENT_BIN=/ztai/bin/ztai-agent ZTAI_PROBE_BIN=/ztai/bin/ztai-probe PYTHONPATH=/ztai/python
while IFS= read -r line; do
    [ -n "$line" ] && echo "ZTAI-VM-EXCLUDED $line"
done </ztai/excluded
excluded=$(grep -c . /ztai/excluded)

P=0 F=0 I=0 S=0 B=0
suite0=$(uptime_s)
cd /tmp
for t in $TESTS; do
    echo "ZTAI-VM-BEGIN $t uptime=$(uptime_s)"
    s=$(uptime_s)
    { timeout "$BIN_TIMEOUT" "/ztai/bin/deps/$t" --test-threads="$THREADS" 2>&1; echo $? >/tmp/rc; } | tee "/tmp/log.$t"
    rc=$(cat /tmp/rc)
    # libtest's own totals: with one test thread it prints "test x ... " before
    # running x, so a skip notice (stderr) lands inside that line.
    totals=$(sed -n 's/.*test result: [A-Za-z]*\. \([0-9]*\) passed; \([0-9]*\) failed; \([0-9]*\) ignored.*/\1 \2 \3/p' "/tmp/log.$t" | tail -n 1)
    if [ -n "$totals" ]; then
        set -- $totals
        p=$1 f=$2 n=$3
    else
        p=$(grep -c ' \.\.\. ok$' "/tmp/log.$t")
        f=$(grep -c ' \.\.\. FAILED$' "/tmp/log.$t")
        n=$(grep -c ' \.\.\. ignored' "/tmp/log.$t")
    fi
    k=$(grep -o 'SKIPPED: ' "/tmp/log.$t" | wc -l)
    note=
    if [ "$rc" != 0 ] && [ "$f" = 0 ]; then
        f=1
        note=" note=exited-without-a-failed-test"
        case $rc in 124 | 143) note=" note=timed-out-after-${BIN_TIMEOUT}s" ;; esac
    fi
    echo "ZTAI-VM-END $t rc=$rc passed=$p failed=$f ignored=$n skipped=$k seconds=$(awk "BEGIN{print $(uptime_s)-$s}")$note"
    P=$((P + p)) F=$((F + f)) I=$((I + n)) S=$((S + k)) B=$((B + 1))
done
secs=$(awk "BEGIN{print $(uptime_s)-$suite0}")
if [ "$F" != 0 ]; then
    echo "ZTAI-VM-DMESG-BEGIN"
    dmesg | tail -n 60
    echo "ZTAI-VM-DMESG-END"
fi
# "refused: <reason>" stays last: the reason has spaces.
echo "ZTAI-VM-RESULT kernel=$KERNEL passed=$P failed=$F ignored=$I skipped=$S excluded=$excluded binaries=$B agent=$agent seconds=$secs${refused:+ refused: $refused}"
finish
