# head_address NODE: an IPv4 address of NODE that the other nodes of the job reach, for torchrun's rendezvous.
# Sourced by slurm/launch.sh and by NeMo-Run jobs (examples/nemo_run/launch_dapo.py).
# The GLOO_SOCKET_IFNAME interface's address when that is set; else the name's (getent), unless that is a loopback
# address on a multi-node job (Debian maps the host name to 127.0.1.1), then the first non-loopback address the
# node reports. `hostname --ip-address` alone, as many launch scripts use, fails on both kinds of hosts.
head_address() {
  local node="$1" address=""
  if [[ -n "${GLOO_SOCKET_IFNAME:-}" ]]; then
    address=$(srun --nodes=1 --ntasks=1 --overlap -w "$node" ip -4 -o addr show dev "${GLOO_SOCKET_IFNAME%%,*}" \
      | awk '{split($4, a, "/"); print a[1]; exit}')
  fi
  [[ -n "$address" ]] || address=$(getent ahostsv4 "$node" | awk '{print $1; exit}')
  if [[ -z "$address" || ( "$address" == 127.* && "${SLURM_JOB_NUM_NODES:-1}" -gt 1 ) ]]; then
    address=$(srun --nodes=1 --ntasks=1 --overlap -w "$node" hostname -I | tr ' ' '\n' | grep -v '^127\.' | head -n1)
  fi
  [[ -n "$address" ]] || { echo "head_address: no address for $node; set HEAD_ADDR" >&2; return 2; }
  echo "$address"
}
