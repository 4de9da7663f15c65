#!/usr/bin/env bash
# A one-node SLURM test cluster on this machine (Debian/Ubuntu, root), for the submitit launcher test and for
# trying the sbatch templates:
#
#   sudo scripts/slurm_local.sh start    # install munge + slurmctld + slurmd if missing, write slurm.conf, start, wait
#   sudo scripts/slurm_local.sh status   # daemons and `sinfo`; exit 0 only when the node accepts jobs
#   sudo scripts/slurm_local.sh stop     # stop slurmd, slurmctld and munged (only those this script started)
#
# The cluster: NodeName=$(hostname -s) at 127.0.0.1 with this machine's CPUs and memory (`slurmd -C`), one partition
# `debug` (the default), SlurmUser=root, no cgroups (proctrack/linuxproc, task/none: it runs in a container), no
# accounting database (so `sacct` does not work; submitit then reads job states from its result files). Every
# subcommand is idempotent. Only a slurm.conf carrying this script's marker line is ever rewritten or shut down; on a
# machine that already talks to a real cluster, `start` reports it and does nothing.
# Env: SLURM_LOCAL_TIMEOUT (seconds to wait for the node, default 90), SLURM_LOCAL_PARTITION (default debug).
set -euo pipefail

CONF_DIR=/etc/slurm
CONF=$CONF_DIR/slurm.conf
MARK="# written by im-repro scripts/slurm_local.sh"
PARTITION=${SLURM_LOCAL_PARTITION:-debug}
TIMEOUT=${SLURM_LOCAL_TIMEOUT:-90}
SPOOL_CTLD=/var/spool/slurmctld
SPOOL_D=/var/spool/slurmd
LOG_DIR=/var/log/slurm
RUN_DIR=/run/slurm
MUNGE_PID=/run/munge/munged.pid
PROG=$(basename "$0")

die() { echo "$PROG: error: $*" >&2; exit 1; }
info() { echo "$PROG: $*" >&2; }

ours() { [ -f "$CONF" ] && grep -qxF "$MARK" "$CONF"; }

# The pid in a pid file, if that process is alive.
alive() { local f=$1 pid; [ -s "$f" ] && pid=$(cat "$f") && [ -n "$pid" ] && [ -d "/proc/$pid" ] && echo "$pid"; }

# The node's state as sinfo reports it (idle, mixed, down*, ...), empty when no slurmctld answers.
node_state() { { timeout 10 sinfo -h -N -o '%T' 2>/dev/null || true; } | head -n1; }

need_root() {
  [ "$(id -u)" -eq 0 ] || die "must run as root (it installs Debian's slurm packages, writes $CONF and starts" \
    "munged, slurmctld and slurmd); run: sudo $0 $1"
}

install_packages() {
  local missing=() b
  for b in munged slurmctld slurmd sinfo sbatch scontrol; do
    [ -x "/usr/sbin/$b" ] || command -v "$b" >/dev/null 2>&1 || missing+=("$b")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  command -v apt-get >/dev/null 2>&1 || die "missing ${missing[*]} and no apt-get here: install SLURM (slurmctld, slurmd," \
    "client commands) and munge yourself"
  info "installing munge and SLURM (missing: ${missing[*]})"
  export DEBIAN_FRONTEND=noninteractive
  local pkgs=(munge slurmctld slurmd slurm-client)
  # Debian >= 11 / Ubuntu >= 20.04 ship the split packages; older releases only the slurm-wlm metapackage.
  apt-cache show slurmctld >/dev/null 2>&1 || { apt-get update -qq || true; }
  apt-cache show slurmctld >/dev/null 2>&1 || pkgs=(munge slurm-wlm)
  # policy-rc.d in containers stops the packages from starting their (unconfigured) services; fine either way.
  apt-get install -y -qq --no-install-recommends "${pkgs[@]}" >/dev/null \
    || { apt-get update -qq && apt-get install -y -qq --no-install-recommends "${pkgs[@]}" >/dev/null; } \
    || die "apt-get install ${pkgs[*]} failed"
}

write_conf() {
  # Returns 0 (changed) or 1 (unchanged) through CONF_CHANGED.
  local host node cpus mem defmem tmp
  host=$(hostname -s)
  # `slurmd -C` prints this machine's NodeName=... CPUs=... Boards=... RealMemory=... line.
  node=$(slurmd -C 2>/dev/null | head -n1) || true
  [[ $node == NodeName=* ]] || die "slurmd -C did not describe this node: '$node'"
  cpus=$(sed -n 's/.* CPUs=\([0-9]*\).*/\1/p' <<<"$node")
  mem=$(sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' <<<"$node")
  defmem=$((mem / cpus))
  mkdir -p "$CONF_DIR"
  tmp=$(mktemp)
  cat >"$tmp" <<EOF
$MARK
# A one-node test cluster on localhost ($host): $cpus CPUs, $mem MB. Do not use on a real cluster.
ClusterName=imrepro
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
# No cgroups: the container exposes none that SLURM may use; processes are tracked through /proc.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=$defmem
ReturnToService=2
StateSaveLocation=$SPOOL_CTLD
SlurmdSpoolDir=$SPOOL_D
SlurmctldPidFile=$RUN_DIR/slurmctld.pid
SlurmdPidFile=$RUN_DIR/slurmd.pid
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd.log
SlurmctldPort=6817
SlurmdPort=6818
MinJobAge=600
KillWait=10
InactiveLimit=0
$(sed 's/ UpTime=.*//' <<<"$node") NodeAddr=127.0.0.1 NodeHostname=$host State=UNKNOWN
PartitionName=$PARTITION Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
  if [ -f "$CONF" ] && cmp -s "$tmp" "$CONF"; then rm -f "$tmp"; CONF_CHANGED=0; return; fi
  install -m 0644 "$tmp" "$CONF"
  rm -f "$tmp"
  CONF_CHANGED=1
  info "wrote $CONF"
}

start_munge() {
  if alive "$MUNGE_PID" >/dev/null; then return; fi
  install -d -o munge -g munge -m 0755 /run/munge
  if [ ! -s /etc/munge/munge.key ]; then
    info "creating /etc/munge/munge.key"
    if command -v mungekey >/dev/null 2>&1; then mungekey --create --force; else
      dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key 2>/dev/null; fi
    chown munge:munge /etc/munge/munge.key
    chmod 0400 /etc/munge/munge.key
  fi
  info "starting munged"
  runuser -u munge -- /usr/sbin/munged --pid-file="$MUNGE_PID" || die "munged did not start (see /var/log/munge/munged.log)"
  local i
  for i in $(seq 50); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && return; sleep 0.2; done
  die "munged started but munge -n | unmunge fails (see /var/log/munge/munged.log)"
}

start_daemon() {  # name pidfile
  local name=$1 pidfile=$2
  if alive "$pidfile" >/dev/null; then return; fi
  info "starting $name"
  # Both daemonize by default and log to $LOG_DIR/$name.log.
  "/usr/sbin/$name" >>"$LOG_DIR/$name.stdout" 2>&1 \
    || die "$name failed to start: $(tail -n 5 "$LOG_DIR/$name.log" 2>/dev/null)"
}

wait_idle() {
  local deadline=$((SECONDS + TIMEOUT)) state="" host
  host=$(hostname -s)
  while [ $SECONDS -lt $deadline ]; do
    state=$(node_state)
    case "$state" in
      idle* | mixed* | allocated* | completing*) info "node $host is $state (partition $PARTITION)"; return 0 ;;
      down* | drain* | drained* | fail*)
        # A node that was down when slurmctld last saw it stays down until resumed.
        scontrol update NodeName="$host" State=RESUME >/dev/null 2>&1 || true ;;
    esac
    sleep 1
  done
  echo "--- sinfo" >&2; timeout 10 sinfo -N -l >&2 || true
  echo "--- scontrol show node" >&2; timeout 10 scontrol show node "$host" >&2 || true
  echo "--- $LOG_DIR/slurmctld.log" >&2; tail -n 15 "$LOG_DIR/slurmctld.log" >&2 || true
  echo "--- $LOG_DIR/slurmd.log" >&2; tail -n 15 "$LOG_DIR/slurmd.log" >&2 || true
  die "node $host not idle after ${TIMEOUT}s (state: '${state:-no answer from slurmctld}')"
}

cmd_start() {
  if ! ours && [ -f "$CONF" ]; then
    if [ -n "$(node_state)" ]; then info "a SLURM cluster not set up by this script is reachable; nothing to do"; sinfo >&2; exit 0; fi
    die "$CONF exists and was not written by this script; refusing to overwrite it"
  fi
  if [ "$(id -u)" -ne 0 ] && ours; then
    case "$(node_state)" in idle* | mixed* | allocated* | completing*) info "the local cluster is already up"; exit 0 ;; esac
  fi
  need_root start
  install_packages
  CONF_CHANGED=0
  write_conf
  install -d -m 0755 "$SPOOL_CTLD" "$SPOOL_D" "$LOG_DIR" "$RUN_DIR"
  if [ "$CONF_CHANGED" = 1 ] && { alive "$RUN_DIR/slurmctld.pid" >/dev/null || alive "$RUN_DIR/slurmd.pid" >/dev/null; }; then
    info "slurm.conf changed: restarting the daemons"
    cmd_stop_slurm
  fi
  start_munge
  start_daemon slurmctld "$RUN_DIR/slurmctld.pid"
  start_daemon slurmd "$RUN_DIR/slurmd.pid"
  wait_idle
}

stop_pid() {  # name pidfile
  local name=$1 pidfile=$2 pid i
  pid=$(alive "$pidfile") || { rm -f "$pidfile"; return 0; }
  info "stopping $name (pid $pid)"
  kill -TERM "$pid" 2>/dev/null || true
  for i in $(seq 100); do kill -0 "$pid" 2>/dev/null || { rm -f "$pidfile"; return 0; }; sleep 0.1; done
  info "$name (pid $pid) ignored SIGTERM for 10 s: SIGKILL"
  kill -KILL "$pid" 2>/dev/null || true
  rm -f "$pidfile"
}

cmd_stop_slurm() {
  stop_pid slurmd "$RUN_DIR/slurmd.pid"
  stop_pid slurmctld "$RUN_DIR/slurmctld.pid"
}

cmd_stop() {
  ours || { info "no slurm.conf written by this script at $CONF: nothing to stop"; return 0; }
  need_root stop
  cmd_stop_slurm
  stop_pid munged "$MUNGE_PID"
}

cmd_status() {
  local d f pid rc=0 state
  if ours; then
    for d in munged:$MUNGE_PID slurmctld:$RUN_DIR/slurmctld.pid slurmd:$RUN_DIR/slurmd.pid; do
      f=${d#*:}
      if pid=$(alive "$f"); then echo "${d%%:*}: running (pid $pid)"; else echo "${d%%:*}: stopped"; fi
    done
  else
    echo "$CONF: $([ -f "$CONF" ] && echo 'not written by this script' || echo absent)"
  fi
  state=$(node_state)
  if [ -n "$state" ]; then timeout 10 sinfo; else echo "sinfo: no answer"; fi
  case "$state" in idle* | mixed* | allocated* | completing*) ;; *) rc=1 ;; esac
  return $rc
}

case "${1:-}" in
  start) cmd_start ;;
  stop) cmd_stop ;;
  status) cmd_status ;;
  *) echo "usage: $PROG start|stop|status" >&2; exit 2 ;;
esac
