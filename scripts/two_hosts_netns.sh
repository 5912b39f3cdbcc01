#!/usr/bin/env bash
# Two "hosts" on one machine: network namespaces joined by a veth pair, each with its own address, so a
# 2-node job runs over a real network link (nothing shared but the filesystem). Run as root; everything
# it creates is removed on exit. It only ever talks to the two addresses it creates.
#
#   scripts/two_hosts_netns.sh --allreduce                 gloo all_reduce across the two namespaces
#   scripts/two_hosts_netns.sh RECIPE [key=value ...]      train RECIPE with node 0 and node 1 in the namespaces
#
#   scripts/two_hosts_netns.sh recipes/tiny_zero2.yaml     ZeRO-2 on a tiny model (build it first: see the recipe)
#
# Environment: LAUNCHER (accelerate | torchrun | deepspeed; default accelerate), NPROC (processes per
# node; default 1), PORT (default 29500), JOIN_TIMEOUT (seconds; default 120), PYTHON (default .venv/bin/python),
# THREADS (OMP threads per process; default this machine's cores / all processes of both "hosts", since
# they share the cores; each real host would use its own cores / its own processes).
set -euo pipefail
cd "$(dirname "$0")/.."

NS=(ft-node0 ft-node1)
ADDR=(10.77.0.1 10.77.0.2)
IFACE=ftnet0 # the same interface name on both "hosts", as on a real cluster
PYTHON=${PYTHON:-.venv/bin/python}
LAUNCHER=${LAUNCHER:-accelerate}
NPROC=${NPROC:-1}
PORT=${PORT:-29500}
JOIN_TIMEOUT=${JOIN_TIMEOUT:-120}
THREADS=${THREADS:-$(( $(nproc) / (2 * NPROC) > 0 ? $(nproc) / (2 * NPROC) : 1 ))}

if [ $# -lt 1 ]; then
    sed -n '2,15p' "$0"
    exit 2
fi
if [ "$(id -u)" != 0 ]; then
    echo "run as root: creating network namespaces needs CAP_NET_ADMIN" >&2
    exit 1
fi

PIDS=()
cleanup() {
    for pid in "${PIDS[@]}"; do kill -- "-$pid" 2>/dev/null || true; done
    for ns in "${NS[@]}"; do ip netns del "$ns" 2>/dev/null || true; done
}
trap cleanup EXIT INT TERM

for ns in "${NS[@]}"; do
    if ip netns list | grep -qw "$ns"; then ip netns del "$ns"; fi
    ip netns add "$ns"
    ip -n "$ns" link set lo up
done
ip link add ft-veth0 type veth peer name ft-veth1
for k in 0 1; do
    ip link set "ft-veth$k" netns "${NS[$k]}"
    ip -n "${NS[$k]}" link set "ft-veth$k" name "$IFACE"
    ip -n "${NS[$k]}" addr add "${ADDR[$k]}/24" dev "$IFACE"
    ip -n "${NS[$k]}" link set "$IFACE" up
done
echo "namespaces: ${NS[0]} ${ADDR[0]} <-> ${NS[1]} ${ADDR[1]} over $IFACE"
for k in 0 1; do ip -n "${NS[$k]}" -brief addr show "$IFACE"; done

# Start a command in each namespace (own process group, so cleanup can stop it); fail if either fails.
run_both() {
    local k
    PIDS=()
    for k in 0 1; do
        setsid ip netns exec "${NS[$k]}" env NODE_RANK="$k" "$@" > >(sed -u "s/^/[node $k] /") 2>&1 &
        PIDS+=($!)
    done
    local status=0
    for pid in "${PIDS[@]}"; do wait "$pid" || status=$?; done
    PIDS=()
    return $status
}

if [ "$1" = "--allreduce" ]; then
    # A bare torch.distributed job: rank k in namespace k, gloo bound to $IFACE, rendezvous on node 0.
    run_both env OMP_NUM_THREADS=1 GLOO_SOCKET_IFNAME="$IFACE" MASTER_ADDR="${ADDR[0]}" MASTER_PORT="$PORT" \
        WORLD_SIZE=2 "$PYTHON" -c '
import os, socket, torch, torch.distributed as dist
from datetime import timedelta
rank = int(os.environ["NODE_RANK"])
dist.init_process_group("gloo", rank=rank, world_size=2, timeout=timedelta(seconds=60))
x = torch.tensor([10.0 ** rank, float(rank)])
dist.all_reduce(x)
peer = [torch.zeros(1), torch.zeros(1)]
dist.all_gather(peer, torch.tensor([float(rank) + 0.5]))
iface = os.environ["GLOO_SOCKET_IFNAME"]
print(f"rank {rank}/{dist.get_world_size()} via {iface}: all_reduce -> {x.tolist()}, all_gather -> {[p.item() for p in peer]}", flush=True)
assert x.tolist() == [11.0, 1.0], x
dist.destroy_process_group()
'
    echo "all_reduce across namespaces: ok"
    exit 0
fi

RECIPE=$1
shift
# Each node runs `finetune launch` for its own rank: the nodes meet on node 0's address first, then the
# generated launcher command trains with gloo bound to $IFACE. The thread count also goes in as
# train.num_threads (your own overrides come after it and win): under accelerate the trainer reads
# OMP_NUM_THREADS=1 as accelerate's default and would use every core, and the two "hosts" share them.
run_both sh -c '"$0" -m finetune.cli launch "$@" --node-rank "$NODE_RANK"' "$PYTHON" "$RECIPE" train.num_threads="$THREADS" "$@" \
    --launcher "$LAUNCHER" --nnodes 2 --nproc-per-node "$NPROC" --main-address "${ADDR[0]}" --main-port "$PORT" \
    --iface "$IFACE" --join-timeout "$JOIN_TIMEOUT" --threads "$THREADS"
echo "2-node training across namespaces: ok"
