#!/usr/bin/env bash
# Validate the Kubernetes manifests (deploy/k8s) and the Dockerfile offline,
# with no API server: for each overlay, render it with kustomize, check every
# object against the Kubernetes API schemas, run checkov's policies and our
# own assertions; lint deploy/Dockerfile with checkov and hadolint; check
# that the PrometheusRule is the alert rules of deploy/prometheus/alerts.yml,
# and that every alert names a runbook (deploy/runbooks) that exists.
#
#   scripts/validate-k8s.sh    (make k8s-validate; scripts/install-k8s-tools.sh first)
#
# Findings allowed to pass are listed, with reasons, in
# deploy/k8s/validation-skips.yaml. Exits non-zero if any check failed.
set -euo pipefail

# Kubernetes versions the manifests must be valid for: the oldest we support
# (1.28: persistentVolumeClaimRetentionPolicy and nodeTaintsPolicy are on by
# default there) and the newest that the pinned kubernetes-validate ships.
# Move the second with the pin in scripts/install-k8s-tools.sh.
K8S_VERSIONS=(1.28 1.37)

root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
tools="${BITCLONE_K8S_TOOLS:-${HOME}/.cache/bitclone/k8s-tools}"
bin="$tools/venv/bin"
skips="deploy/k8s/validation-skips.yaml"
checks="scripts/validate-k8s.py"

for t in kubectl kubernetes-validate checkov hadolint python; do
    if [[ ! -x "$bin/$t" ]]; then
        echo "validate-k8s: $bin/$t not found; run scripts/install-k8s-tools.sh (make k8s-validate does)" >&2
        exit 1
    fi
done

# No network at run time. checkov phones home unless told not to:
# --skip-download (no policies or mappings from the platform), the update
# check against PyPI (CKV_SKIP_PACKAGE_UPDATE_CHECK), the guideline mapping
# (BC_SKIP_MAPPING), and no platform key. Where we may, run every tool in a
# network namespace of its own, which has no network at all, to prove it.
export CKV_SKIP_PACKAGE_UPDATE_CHECK=true BC_SKIP_MAPPING=TRUE LOG_LEVEL=WARNING
unset BC_API_KEY PRISMA_API_URL
if unshare -n true 2>/dev/null; then
    offline=(unshare -n)
    netnote="tools run in an empty network namespace (unshare -n): no network"
else
    offline=()
    netnote="unshare -n not permitted here: tools run with the host network, told not to use it"
fi

tmp="$(mktemp -d)"
trap 'rm -rf -- "$tmp"' EXIT
failures=0
section() { printf '\n== %s\n' "$*"; }
run_check() {
    # Run a check, keep going on failure, count it.
    if ! "$@"; then
        failures=$((failures + 1))
    fi
}

echo "validate-k8s: $netnote"
echo "validate-k8s: kubectl $("$bin/kubectl" version --client | sed -n 's/Client Version: //p')" \
    "(kustomize $("$bin/kubectl" version --client | sed -n 's/Kustomize Version: //p'))," \
    "kubernetes-validate $("$bin/kubernetes-validate" --version)," \
    "checkov $("${offline[@]}" "$bin/checkov" --version)," \
    "$("$bin/hadolint" --version)"

section "PrometheusRule generated from deploy/prometheus/alerts.yml"
if bash scripts/k8s-rules.sh --check >"$tmp/rules.out" 2>&1; then
    sed 's/^/  ok    /' "$tmp/rules.out"
else
    sed 's/^/        /' "$tmp/rules.out"
    echo "  FAIL  deploy/k8s/base/prometheusrule.yaml is stale: run scripts/k8s-rules.sh"
    failures=$((failures + 1))
fi

section "runbooks: every alert names one that exists, every one is in deploy/runbooks/README.md"
run_check "$bin/python" "$checks" runbooks "$root"

section "schema versions (kubernetes-validate)"
run_check "$bin/python" "$checks" versions "${K8S_VERSIONS[@]}"

overlays=()
for d in deploy/k8s/overlays/*/; do
    overlays+=("$(basename "$d")")
done
if ((${#overlays[@]} == 0)); then
    echo "validate-k8s: no overlays under deploy/k8s/overlays" >&2
    exit 1
fi

rendered=()
for o in "${overlays[@]}"; do
    section "overlay $o: render (kubectl kustomize deploy/k8s/overlays/$o)"
    if "${offline[@]}" "$bin/kubectl" kustomize "deploy/k8s/overlays/$o" >"$tmp/$o.yaml" 2>"$tmp/$o.err"; then
        n=$(grep -c '^kind:' "$tmp/$o.yaml" || true)
        echo "  ok    $o: rendered $n objects"
        rendered+=("$o")
    else
        sed 's/^/        /' "$tmp/$o.err"
        echo "  FAIL  $o: kustomize failed"
        failures=$((failures + 1))
        continue
    fi

    section "overlay $o: schemas (kubernetes-validate --strict)"
    for v in "${K8S_VERSIONS[@]}"; do
        # It exits 0 on kinds it has no schema for (a warning): the python
        # side makes those an error unless listed in no_schema.
        status=0
        "${offline[@]}" "$bin/kubernetes-validate" --strict --quiet -k "$v" "$tmp/$o.yaml" >"$tmp/$o-$v.kv" 2>&1 || status=$?
        run_check "$bin/python" "$checks" schema "$skips" "$o" "$v" "$tmp/$o-$v.kv"
        if ((status != 0)) && ! grep -q '^ERROR\|^FATAL' "$tmp/$o-$v.kv"; then
            echo "  FAIL  $o: kubernetes-validate exited $status"
            sed 's/^/        /' "$tmp/$o-$v.kv"
            failures=$((failures + 1))
        fi
    done

    section "overlay $o: our own assertions"
    run_check "$bin/python" "$checks" assert "$root" "$o" "$tmp/$o.yaml"
done

section "checkov (kubernetes on each rendering, dockerfile on deploy/Dockerfile)"
targets=(-f deploy/Dockerfile)
names=(Dockerfile=deploy/Dockerfile)
for o in "${rendered[@]}"; do
    targets+=(-f "$tmp/$o.yaml")
    names+=("$o=$tmp/$o.yaml")
done
# No --skip-check: the skips are applied to the report below, so a skip
# that no longer matches anything is found too. Exit 1 means findings.
status=0
"${offline[@]}" "$bin/checkov" --skip-download \
    --framework kubernetes dockerfile "${targets[@]}" -o json >"$tmp/checkov.json" 2>"$tmp/checkov.err" || status=$?
if ((status > 1)) || [[ ! -s "$tmp/checkov.json" ]]; then
    sed 's/^/        /' "$tmp/checkov.err"
    echo "  FAIL  checkov did not run (exit $status)"
    failures=$((failures + 1))
else
    run_check "$bin/python" "$checks" checkov "$skips" "$tmp/checkov.json" "$tmp/used-checkov" "${names[@]}"
    run_check "$bin/python" "$checks" stale "$skips" checkov "$tmp/used-checkov"
fi

section "hadolint deploy/Dockerfile"
status=0
"${offline[@]}" "$bin/hadolint" --no-color -f json deploy/Dockerfile >"$tmp/hadolint.json" 2>"$tmp/hadolint.err" || status=$?
if ((status > 1)); then
    sed 's/^/        /' "$tmp/hadolint.err"
    echo "  FAIL  hadolint did not run (exit $status)"
    failures=$((failures + 1))
else
    run_check "$bin/python" "$checks" hadolint "$skips" "$tmp/hadolint.json" "$tmp/used-hadolint"
    run_check "$bin/python" "$checks" stale "$skips" hadolint "$tmp/used-hadolint"
fi

echo
echo "validate-k8s: not checked here (no API server): admission (PodSecurity, webhooks), CRDs'"
echo "  schemas (ServiceMonitor, PrometheusRule), that the Secrets and storage class exist,"
echo "  scheduling, and the node actually forming a cluster from these manifests."
if ((failures)); then
    echo "validate-k8s: $failures check group(s) FAILED (overlays: ${overlays[*]})" >&2
    exit 1
fi
echo "validate-k8s: all checks passed for overlays ${overlays[*]} (Kubernetes ${K8S_VERSIONS[*]})"
