#!/usr/bin/env bash
# Submit a ramoe sweep to a running Ray cluster through the Ray Jobs API (`ray job submit`).
#
#   RAY_ADDRESS=http://127.0.0.1:8265 \
#   MLFLOW_TRACKING_URI=https://mlflow.example.org \
#   RAMOE_STORAGE=/mnt/shared/ramoe \
#   cluster/submit.sh [--no-wait] [--resume] [key.sub=value ...]
#
# Required environment:
#   RAY_ADDRESS          the cluster's Jobs API (the dashboard port, 8265), reached through an SSH tunnel
#                        (`ray dashboard cluster/ray-cluster.yaml`), `kubectl port-forward` or a VPN:
#                        never expose it to the internet, it runs any code it is sent
#   MLFLOW_TRACKING_URI  the MLflow tracking server every node logs to; no credentials in the URI
#   RAMOE_STORAGE        shared storage mounted at this same absolute path on every node; the job uses
#                        $RAMOE_STORAGE/tune (Ray Tune), /cache (stage artefacts) and /runs (outputs)
# Optional environment:
#   CONFIG               the sweep config, a path inside this repository (default sweeps/paper.yaml)
#   RAY_AUTH_MODE        token (default) or disabled; with token, the token comes from RAY_AUTH_TOKEN,
#                        the file RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token (`ray get-auth-token`)
#   HF_TOKEN, MLFLOW_TRACKING_TOKEN, MLFLOW_TRACKING_USERNAME, MLFLOW_TRACKING_PASSWORD
#                        passed to the job's environment (runtime_env env_vars) only when set
#   RAMOE_SUBMISSION_ID  the Ray job's submission id (default ramoe-<config name>-<UTC time>)
#   PYTHON               the Python that writes the runtime environment file (default python3)
# Arguments: --no-wait goes to `ray job submit` (return at once); everything else (--resume,
# key.sub=value overrides) goes to `ramoe sweep`, after the overrides this script sets.
set -euo pipefail

die() {
    printf 'submit.sh: error: %s\n' "$1" >&2
    exit 2
}
warn() { printf 'submit.sh: warning: %s\n' "$1" >&2; }

ray_args=()
sweep_args=()
for arg in "$@"; do
    case "$arg" in
        -h | --help)
            sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p;}' "$0"
            exit 0
            ;;
        --no-wait) ray_args+=(--no-wait) ;;
        *) sweep_args+=("$arg") ;;
    esac
done

# ---- required settings, checked before anything is sent
if [[ -z "${RAY_ADDRESS:-}" ]]; then
    die "RAY_ADDRESS is not set: the cluster's Jobs API, e.g. http://127.0.0.1:8265 through an SSH tunnel
  (ray dashboard cluster/ray-cluster.yaml) or kubectl port-forward svc/HEAD-SVC 8265:8265"
fi
case "$RAY_ADDRESS" in
    http://* | https://*) ;;
    *) die "RAY_ADDRESS=$RAY_ADDRESS: give the Jobs API address, http://HOST:8265 (not ray:// nor the GCS port 6379)" ;;
esac
ray_host=${RAY_ADDRESS#*://}
ray_host=${ray_host%%/*}
ray_host=${ray_host%:*}
case "$ray_host" in
    localhost | 127.* | "[::1]" | 10.* | 192.168.* | 172.1[6-9].* | 172.2[0-9].* | 172.3[01].*) ;;
    *) warn "RAY_ADDRESS host '$ray_host' is not a loopback or private address. The Jobs API runs any code it is
  sent: reach it through an SSH tunnel, kubectl port-forward or a VPN, never over the internet." ;;
esac

if [[ -z "${MLFLOW_TRACKING_URI:-}" ]]; then
    die "MLFLOW_TRACKING_URI is not set: the MLflow tracking server the cluster's nodes log to, e.g. https://mlflow.example.org"
fi
mlflow_authority=${MLFLOW_TRACKING_URI#*://}
mlflow_authority=${mlflow_authority%%/*}
if [[ "$MLFLOW_TRACKING_URI" == *://* && "$mlflow_authority" == *@* ]]; then
    die "MLFLOW_TRACKING_URI holds credentials (user:password@host): it would be part of the job's entrypoint, which
  anyone with dashboard access reads; set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD, or MLFLOW_TRACKING_TOKEN"
fi
case "$MLFLOW_TRACKING_URI" in
    http://* | https://* | databricks*) ;;
    *) warn "MLFLOW_TRACKING_URI=$MLFLOW_TRACKING_URI is not a tracking server (http(s)://): every node and trial must
  reach the same store, and an sqlite file on shared storage does not survive concurrent trials" ;;
esac

if [[ -z "${RAMOE_STORAGE:-}" ]]; then
    die "RAMOE_STORAGE is not set: shared storage mounted at the same absolute path on every node, e.g. /mnt/shared/ramoe"
fi
if [[ "$RAMOE_STORAGE" != /* ]]; then
    die "RAMOE_STORAGE=$RAMOE_STORAGE: an absolute path of a shared file system mounted on every node (NFS, EFS, FSx,
  a ReadWriteMany volume); object stores (s3://) do not hold the stage caches"
fi
storage=${RAMOE_STORAGE%/}

# ---- the config: a path inside the repository, which is uploaded as the job's working dir
cd "$(dirname "${BASH_SOURCE[0]}")/.."
config=${CONFIG:-sweeps/paper.yaml}
case "$config" in
    /* | ../* | */../*) die "CONFIG=$config: give a path inside the repository, relative to its root (it is uploaded)" ;;
esac
[[ -f "$config" ]] || die "CONFIG=$config: no such file in $(pwd)"

# ---- Ray token authentication (Ray >= 2.52): on unless RAY_AUTH_MODE=disabled is said explicitly
export RAY_AUTH_MODE="${RAY_AUTH_MODE:-token}"
case "$RAY_AUTH_MODE" in
    token)
        token_file=${RAY_AUTH_TOKEN_PATH:-$HOME/.ray/auth_token}
        if [[ -z "${RAY_AUTH_TOKEN:-}" && ! -s "$token_file" ]]; then
            die "RAY_AUTH_MODE=token but no token: set RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH, or put the cluster's token
  in ~/.ray/auth_token (cluster/README.md: 'Token authentication'); RAY_AUTH_MODE=disabled only for a cluster
  without authentication on a network only you reach"
        fi
        ;;
    disabled) warn "RAY_AUTH_MODE=disabled: anyone who reaches the cluster's Jobs API can run code on it" ;;
    *) die "RAY_AUTH_MODE=$RAY_AUTH_MODE: token or disabled" ;;
esac

command -v ray >/dev/null || die "the ray CLI is not on PATH: pip install 'ray[default]' at the cluster's Ray version"
python=${PYTHON:-python3}
command -v "$python" >/dev/null || die "$python not found: set PYTHON to a Python 3 interpreter"

# ---- the runtime environment: secrets go to the job's environment only, through a file readable by
# this user alone (not on the command line, where other local users see it in the process list)
runtime_env=$(mktemp "${TMPDIR:-/tmp}/ramoe-runtime-env.XXXXXX")
trap 'rm -f "$runtime_env"' EXIT
chmod 600 "$runtime_env"
# the command that continues this sweep after a stop (the sweep prints it): the same settings, --resume
resume_args=()
for arg in ${sweep_args[@]+"${sweep_args[@]}"}; do
    [[ "$arg" == --resume ]] || resume_args+=("$arg")
done
resume_command=$(printf '%q ' "RAY_ADDRESS=$RAY_ADDRESS" "MLFLOW_TRACKING_URI=$MLFLOW_TRACKING_URI" \
    "RAMOE_STORAGE=$RAMOE_STORAGE" "CONFIG=$config" cluster/submit.sh --resume ${resume_args[@]+"${resume_args[@]}"})
RAMOE_RESUME_COMMAND=${resume_command% } "$python" - "$runtime_env" <<'PY'
import json
import os
import sys

env_vars = {"MLFLOW_TRACKING_URI": os.environ["MLFLOW_TRACKING_URI"],
            "RAMOE_RESUME_COMMAND": os.environ["RAMOE_RESUME_COMMAND"]}
for name in ("HF_TOKEN", "MLFLOW_TRACKING_TOKEN", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
    if os.environ.get(name):
        env_vars[name] = os.environ[name]
excludes = [".git", ".venv", "venv", "runs", ".ramoe_cache", ".cache", "mlruns", "mlartifacts", "checkpoints",
            "**/__pycache__", "*.egg-info", ".pytest_cache", ".scratch", ".whl", ".gl", "*.db", "*.sqlite",
            "*.safetensors", "*.pt", "*.ckpt"]
with open(sys.argv[1], "w") as f:
    json.dump({"env_vars": env_vars, "excludes": excludes}, f)
PY

config_name=$(sed -n 's/^name:[[:space:]]*["'\'']\{0,1\}\([A-Za-z0-9._-]*\).*/\1/p' "$config" | head -n 1)
submission_id=${RAMOE_SUBMISSION_ID:-ramoe-${config_name:-sweep}-$(date -u +%Y%m%d-%H%M%S)}

cmd=(ray job submit --address "$RAY_ADDRESS" --submission-id "$submission_id"
    --working-dir . --runtime-env "$runtime_env" ${ray_args[@]+"${ray_args[@]}"}
    -- ramoe sweep "$config"
    "sweep.storage_path=$storage/tune" "cache_dir=$storage/cache" "output_dir=$storage/runs"
    "tracking.mlflow_uri=$MLFLOW_TRACKING_URI" ${sweep_args[@]+"${sweep_args[@]}"})

follow="ray job logs --address $RAY_ADDRESS --follow $submission_id"
stop="ray job stop --address $RAY_ADDRESS $submission_id"
echo "submit.sh: job $submission_id: ramoe sweep $config on $RAY_ADDRESS (storage $storage)"
if [[ ${#ray_args[@]} -eq 0 ]]; then
    echo "submit.sh: streaming its logs; Ctrl-C stops the streaming, not the job (stop it with: $stop)"
fi
rc=0
"${cmd[@]}" || rc=$?
echo "submit.sh: follow the logs:  $follow"
echo "submit.sh: status:           ray job status --address $RAY_ADDRESS $submission_id"
echo "submit.sh: stop the job:     $stop"
exit "$rc"
