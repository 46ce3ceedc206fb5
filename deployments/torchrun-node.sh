#!/bin/sh
# One node of an arch's multi-node training (issue #29): wait for the job file that the
# train-arch flow writes (runs/<id>/full/<arch_id>/job.pkl, on storage every node mounts),
# then join the group under torchrun's c10d rendezvous. Started on every node by
# deployments/slurm/train-arch.sbatch (srun), and on pods 1..N-1 of the Kubernetes Indexed
# Job of deployments/k8s/ (pod 0 runs the flow, which starts its own node).
#   NASFCOS_NODES          nodes in the group
#   NASFCOS_NPROC          ranks (GPUs) per node
#   NASFCOS_RDZV_ENDPOINT  host:port where the group meets (the first node)
#   NASFCOS_RDZV_ID        the group's name (the arch id); NASFCOS_MAX_RESTARTS (default 1)
set -eu
job=${1:-${NASFCOS_JOB_FILE:?give the job file (argument or NASFCOS_JOB_FILE)}}
waited=0
while [ ! -f "$job" ]; do
  [ "$waited" -ge "${NASFCOS_JOB_WAIT_S:-3600}" ] && { echo "torchrun-node: no job file $job after ${waited} s" >&2; exit 2; }
  sleep 2; waited=$((waited + 2))
done
exec "${PYTHON:-python3}" -m torch.distributed.run --nnodes "$NASFCOS_NODES" --nproc-per-node "$NASFCOS_NPROC" \
  --rdzv-backend c10d --rdzv-endpoint "$NASFCOS_RDZV_ENDPOINT" --rdzv-id "${NASFCOS_RDZV_ID:-nasfcos}" \
  --max-restarts "${NASFCOS_MAX_RESTARTS:-1}" --monitor-interval 0.5 -m nasfcos.engine.distributed "$job"
