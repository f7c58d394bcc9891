#!/usr/bin/env bash
# Validates the core Kubernetes manifests in deploy/kubernetes/ against the Kubernetes API's JSON
# schemas, offline: kubernetes-validate (PyPI) bundles the schemas of every Kubernetes release.
# Strict mode, so a misspelled field fails. The KEDA resources (scaledobject.yaml) have no
# bundled schema; the contract tests (tests/integration/contract.rs) check those.
# Installs kubernetes-validate into $AUDIO_WORKER_HOME/tools/venv-k8s on first use.
#   KUBERNETES_VERSIONS="1.30 1.37" scripts/check-manifests.sh   # the versions checked (default)
set -euo pipefail
cd "$(dirname "$0")/.."

home="${AUDIO_WORKER_HOME:-$HOME/.cache/audio-worker}"
venv="$home/tools/venv-k8s"
version=1.37.0
if [ "$("$venv/bin/kubernetes-validate" --version 2>/dev/null || true)" != "$version" ]; then
  echo "installing kubernetes-validate $version into $venv" >&2
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check "kubernetes-validate==$version"
fi

manifests=(configmap.yaml console.yaml deployment.yaml pdb.yaml secret.example.yaml)
for k8s in ${KUBERNETES_VERSIONS:-1.30 1.37}; do
  (cd deploy/kubernetes && "$venv/bin/kubernetes-validate" --strict --quiet -k "$k8s" "${manifests[@]}")
  echo "deploy/kubernetes: ${manifests[*]} valid for Kubernetes $k8s"
done
