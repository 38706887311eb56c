#!/usr/bin/env bash
# Validates deploy/kubernetes (called by .ci/run; runs alone too): every manifest against
# the Kubernetes schemas (kubernetes-validate ships them, no network) and the checkov
# policy scan, which must find no failed check (each skip is explained in its manifest).
# The tools live in a venv under target/, installed once per pinned version (~70 s).
set -euo pipefail
cd "$(dirname "$0")/.."

PINS="kubernetes-validate==1.37.0 checkov==3.3.30"
# Schemas: the oldest Kubernetes still widely run and the newest the tool ships.
K8S_VERSIONS="1.30.0 1.37.0"
VENV=target/k8s-venv

started=$SECONDS
if [ "$(cat "$VENV/pins" 2>/dev/null)" != "$PINS" ]; then
  echo "--- installing $PINS into $VENV"
  rm -rf "$VENV"
  python3 -m venv "$VENV"
  # shellcheck disable=SC2086
  "$VENV/bin/pip" install --quiet --disable-pip-version-check $PINS
  echo "$PINS" >"$VENV/pins"
fi
installed=$SECONDS

# The kustomizations render to what `kubectl apply -k` sends (the ConfigMap generated from
# config.toml, the trial's patches). Without kubectl, the plain files are validated instead.
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
if command -v kubectl >/dev/null 2>&1; then
  kubectl kustomize deploy/kubernetes >"$out/production.yaml"
  kubectl kustomize deploy/kubernetes/trial >"$out/trial.yaml"
  manifests=("$out/production.yaml" "$out/trial.yaml" deploy/kubernetes/base/secret.example.yaml)
else
  echo "(no kubectl: validating the files, not the rendered kustomizations)"
  mapfile -t manifests < <(find deploy/kubernetes -name '*.yaml' ! -name kustomization.yaml | sort)
fi
for version in $K8S_VERSIONS; do
  echo "--- kubernetes-validate --strict, Kubernetes $version"
  "$VENV/bin/kubernetes-validate" --strict -k "$version" "${manifests[@]}"
done

echo "--- checkov (deploy/kubernetes)"
# --skip-download: no calls to the vendor's platform (CI has no network for it).
"$VENV/bin/checkov" -d deploy/kubernetes --framework kubernetes --compact --quiet \
  --skip-download
echo "kubernetes checks: install $((installed - started)) s, validation $((SECONDS - installed)) s"
