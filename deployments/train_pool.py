"""A Kubernetes work pool for ``train-arch`` jobs (issue #29): each arch's full training
is one Indexed Job of ``nodes`` pods with ``gpus_per_node`` GPUs each, meeting at pod 0
through a headless Service.

Pod 0 runs the Prefect flow run (``flows/train_arch.py``): it writes the job file
(``runs/<id>/full/<arch_id>/job.pkl``) and starts its own torchrun node; pods 1..N-1
run ``deployments/torchrun-node.sh``, which waits for that file and joins. Every pod
mounts the runs volume at the path the stage's config names (``runs_dir``), so the
file, the checkpoint and the ranks' error records are shared.

    python deployments/train_pool.py template > deployments/k8s/train-arch-pool.json
    python deployments/train_pool.py service  > deployments/k8s/train-arch-service.yaml
    kubectl apply -f deployments/k8s/train-arch-service.yaml
    prefect work-pool create nasfcos-k8s --type kubernetes --base-job-template deployments/k8s/train-arch-pool.json
    prefect worker start --pool nasfcos-k8s          # in the cluster, with prefect-kubernetes

The committed files are these renderings with the defaults (a test keeps them equal);
per deployment, ``job_variables`` (``image``, ``nodes``, ``gpus_per_node``, ``pvc``, ...)
fill them. See docs/operations.md, "Full training on a cluster".
"""

from __future__ import annotations

import argparse
import json
import sys

import yaml

SERVICE = "nasfcos-train"  # the headless Service: pod <job>-<index>.<SERVICE> resolves
POD_LABEL = {"nasfcos.io/train-arch": "true"}
RDZV_PORT = 29400

# pod 0: the flow run (Prefect's command, "$@"); the others: a torchrun node. The numbers are
# written into the script (string templating), not env values (an integer there is invalid).
POD_SCRIPT = (
    'export NASFCOS_NODES={{ nodes }} NASFCOS_NPROC={{ gpus_per_node }} NASFCOS_RDZV_ENDPOINT="$JOB_NAME-0.{{ service }}:{{ rdzv_port }}" '
    'NASFCOS_RDZV_ID="$JOB_NAME"; '
    'if [ "$JOB_COMPLETION_INDEX" = 0 ]; then exec "$@"; else exec deployments/torchrun-node.sh; fi'
)


def variables() -> dict:
    """The pool's job variables (JSON schema): what a deployment or a job may set."""
    props = {
        "image": {"type": "string", "description": "the nasfcos image (repository at its working directory)"},
        "namespace": {"type": "string", "default": "default"},
        "name": {"type": "string", "default": "nasfcos-train-arch"},
        "labels": {"type": "object", "default": {}},
        "env": {"type": "object", "default": {}, "description": "environment of every pod (the stage adds NASFCOS_JOB_FILE per job)"},
        "service_account_name": {"type": "string", "default": "default"},
        "image_pull_policy": {"type": "string", "default": "IfNotPresent", "enum": ["IfNotPresent", "Always", "Never"]},
        "nodes": {"type": "integer", "default": 1, "minimum": 1, "description": "machines per arch (pods of the Indexed Job)"},
        "gpus_per_node": {"type": "integer", "default": 8, "minimum": 1, "description": "nvidia.com/gpu per pod (torchrun ranks per node)"},
        "cpu_request": {"type": "string", "default": "32"},
        "memory_request": {"type": "string", "default": "200Gi"},
        "pvc": {"type": "string", "default": "nasfcos-runs", "description": "the shared runs volume (ReadWriteMany)"},
        "runs_mount": {"type": "string", "default": "/runs", "description": "where pods mount it: the stage's runs_dir"},
        "service": {"type": "string", "default": SERVICE},
        "rdzv_port": {"type": "integer", "default": RDZV_PORT},
        "finished_job_ttl": {"type": "integer", "default": 86400},
    }
    return {"type": "object", "properties": props, "required": ["image"]}


def job_manifest() -> dict:
    container = {
        "name": "prefect-job",
        "image": "{{ image }}",
        "imagePullPolicy": "{{ image_pull_policy }}",
        "command": ["/bin/sh", "-c", POD_SCRIPT, "sh"],
        "args": "{{ command }}",
        # before the env the stage and Prefect add: JOB_NAME names pod 0's DNS record
        "env": [{"name": "JOB_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.labels['batch.kubernetes.io/job-name']"}}}],
        "ports": [{"containerPort": "{{ rdzv_port }}", "name": "rendezvous"}],
        "resources": {
            "requests": {"cpu": "{{ cpu_request }}", "memory": "{{ memory_request }}", "nvidia.com/gpu": "{{ gpus_per_node }}"},
            "limits": {"nvidia.com/gpu": "{{ gpus_per_node }}"},
        },
        "volumeMounts": [{"name": "runs", "mountPath": "{{ runs_mount }}"}, {"name": "shm", "mountPath": "/dev/shm"}],
    }
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"generateName": "{{ name }}-", "namespace": "{{ namespace }}", "labels": "{{ labels }}"},
        "spec": {
            "completionMode": "Indexed",
            "completions": "{{ nodes }}",
            "parallelism": "{{ nodes }}",
            "backoffLimit": 0,  # a lost pod fails the job; the stage submits it again (it resumes)
            "ttlSecondsAfterFinished": "{{ finished_job_ttl }}",
            "template": {
                "metadata": {"labels": dict(POD_LABEL)},
                "spec": {
                    # prefect-kubernetes refuses a template without these two here (its own default has
                    # them; Kubernetes ignores them in a pod spec): the Job's are in its spec above
                    "parallelism": 1,
                    "completions": 1,
                    "subdomain": "{{ service }}",
                    "restartPolicy": "Never",
                    "serviceAccountName": "{{ service_account_name }}",
                    "containers": [container],
                    "volumes": [
                        {"name": "runs", "persistentVolumeClaim": {"claimName": "{{ pvc }}"}},
                        {"name": "shm", "emptyDir": {"medium": "Memory"}},  # NCCL and DataLoader workers
                    ],
                },
            },
        },
    }


def base_job_template() -> dict:
    """``prefect work-pool create --type kubernetes --base-job-template`` of the pool."""
    return {"job_configuration": {"command": "{{ command }}", "env": "{{ env }}", "labels": "{{ labels }}", "name": "{{ name }}", "namespace": "{{ namespace }}",
                                  "job_manifest": job_manifest(), "cluster_config": None, "job_watch_timeout_seconds": None, "pod_watch_timeout_seconds": 600,
                                  "stream_output": True},
            "variables": variables()}  # fmt: skip


def service(namespace: str = "default") -> dict:
    """The headless Service every train-arch pod belongs to (``subdomain``): pod 0 of a job
    resolves as ``<job>-0.nasfcos-train``, where torchrun's c10d rendezvous listens."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": SERVICE, "namespace": namespace},
        "spec": {"clusterIP": "None", "selector": dict(POD_LABEL), "ports": [{"name": "rendezvous", "port": RDZV_PORT}], "publishNotReadyAddresses": True},
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=("template", "service"))
    ap.add_argument("--namespace", default="default")
    a = ap.parse_args(argv)
    if a.what == "template":
        sys.stdout.write(json.dumps(base_job_template(), indent=2) + "\n")
    else:
        sys.stdout.write(yaml.safe_dump(service(a.namespace), sort_keys=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
