#!/usr/bin/env bash
# A real one-node Slurm cluster on this machine (root, Debian's slurm-wlm 22.05, no systemd), to try the
# slurm/*.sbatch templates without a cluster; the functional tests use it.
#
#   bash scripts/local_slurm.sh install        # apt-get the packages (once)
#   bash scripts/local_slurm.sh up [ROOT]      # start munged, slurmctld, slurmd; wait for an idle node
#   export SLURM_CONF=ROOT/etc/slurm.conf      # every client command (sbatch, squeue, ...) needs it
#   bash scripts/local_slurm.sh down [ROOT]    # cancel jobs, stop the daemons, delete ROOT
#
# Everything lives under ROOT (default /tmp/megatron-dapo-slurm): config, munge key and socket, state, logs.
# The node is "localhost" with the machine's real CPUs; jobs may requeue (JobRequeue=1), and a requeued job
# starts again about 10 s later (cred_expire=10; Slurm's default is 120 s).
set -euo pipefail
command="${1:?usage: local_slurm.sh install|up|down [ROOT]}"
ROOT="${2:-/tmp/megatron-dapo-slurm}"
die() { echo "local_slurm.sh: $*" >&2; exit 1; }
alive() { [[ -s "$1" ]] && kill -0 "$(cat "$1")" 2>/dev/null; }
stop() {  # stop <pid file>: SIGTERM, SIGKILL after 10 s
  alive "$1" || return 0
  local pid; pid="$(cat "$1")"; kill "$pid" 2>/dev/null || true
  for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.1; done
  kill -9 "$pid" 2>/dev/null || true
}
# munged wants a socket path whose every parent directory others may traverse, and short: ROOT may not be.
MUNGE_DIR="/tmp/megatron-dapo-munge-$(printf %s "$ROOT" | md5sum | cut -c1-12)"

case "$command" in
install)
  [[ $(id -u) -eq 0 ]] || die "run as root"
  apt-get update -qq && apt-get install -y -qq --no-install-recommends slurm-wlm slurmctld slurmd slurm-client munge ;;
up)
  [[ $(id -u) -eq 0 ]] || die "run as root (the daemons run as root here)"
  for binary in munged mungekey slurmctld slurmd sinfo scontrol; do
    command -v "$binary" >/dev/null || die "'$binary' not found: bash scripts/local_slurm.sh install"
  done
  mkdir -p "$ROOT"/{etc,state,spool,log,run} "$MUNGE_DIR"
  chmod 755 "$ROOT"; chmod 711 "$MUNGE_DIR"
  [[ -s "$ROOT/munge.key" ]] || mungekey --create --keyfile="$ROOT/munge.key"
  chmod 600 "$ROOT/munge.key"
  if ! alive "$ROOT/run/munged.pid"; then
    munged --socket="$MUNGE_DIR/munge.socket" --key-file="$ROOT/munge.key" --log-file="$ROOT/log/munged.log" \
      --pid-file="$ROOT/run/munged.pid" --seed-file="$ROOT/munged.seed" || die "munged failed: $ROOT/log/munged.log"
  fi
  hardware="$(slurmd -C | head -n1)"
  field() { sed -n "s/.* $1=\([0-9]*\).*/\1/p" <<<"$hardware"; }
  cat >"$ROOT/etc/slurm.conf" <<CONF
ClusterName=megatron-dapo-local
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$MUNGE_DIR/munge.socket,cred_expire=10
MpiDefault=none
MailProg=/bin/true
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SwitchType=switch/none
SchedulerParameters=bf_interval=1,sched_interval=1
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
JobRequeue=1
MinJobAge=300
StateSaveLocation=$ROOT/state
SlurmdSpoolDir=$ROOT/spool
SlurmctldPidFile=$ROOT/run/slurmctld.pid
SlurmdPidFile=$ROOT/run/slurmd.pid
SlurmctldLogFile=$ROOT/log/slurmctld.log
SlurmdLogFile=$ROOT/log/slurmd.log
NodeName=localhost NodeAddr=127.0.0.1 CPUs=$(field CPUs) Boards=1 SocketsPerBoard=$(field SocketsPerBoard) CoresPerSocket=$(field CoresPerSocket) ThreadsPerCore=$(field ThreadsPerCore) RealMemory=$(( $(field RealMemory) * 9 / 10 )) State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
CONF
  export SLURM_CONF="$ROOT/etc/slurm.conf"
  alive "$ROOT/run/slurmctld.pid" || slurmctld -f "$SLURM_CONF" || die "slurmctld failed: $ROOT/log/slurmctld.log"
  for _ in $(seq 100); do scontrol ping 2>/dev/null | grep -q 'is UP' && break; sleep 0.1; done
  alive "$ROOT/run/slurmd.pid" || slurmd -f "$SLURM_CONF" -N localhost || die "slurmd failed: $ROOT/log/slurmd.log"
  for _ in $(seq 150); do
    state="$(sinfo -h -n localhost -o '%T' 2>/dev/null | head -n1 || true)"
    [[ "$state" =~ ^(idle|mixed|allocated)$ ]] && { echo "slurm up: export SLURM_CONF=$SLURM_CONF"; exit 0; }
    sleep 0.2
  done
  die "node not idle after 30 s ($(sinfo -h -N -o '%N %T %E' 2>&1)); see $ROOT/log/slurmd.log" ;;
down)
  export SLURM_CONF="$ROOT/etc/slurm.conf"
  if alive "$ROOT/run/slurmctld.pid"; then  # stopping slurmd alone leaves running jobs behind
    jobs="$(squeue -h -o %i 2>/dev/null | tr '\n' ' ')"
    if [[ -n "${jobs// }" ]]; then
      scancel --full $jobs 2>/dev/null || true
      for i in $(seq 100); do
        [[ -z "$(squeue -h -o %i 2>/dev/null)" ]] && break
        (( i == 50 )) && scancel --signal=KILL --full $jobs 2>/dev/null
        sleep 0.2
      done
    fi
  fi
  stop "$ROOT/run/slurmd.pid"; stop "$ROOT/run/slurmctld.pid"; stop "$ROOT/run/munged.pid"
  rm -rf "$ROOT" "$MUNGE_DIR" ;;
*) die "usage: local_slurm.sh install|up|down [ROOT]" ;;
esac
