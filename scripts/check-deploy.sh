#!/usr/bin/env bash
# Validates the deployment files without a Docker engine (`make deploy-check`, CI):
#   - Prometheus: configuration, alert rules, and the rules' unit tests (promtool);
#   - compose.yaml, with the placeholder secrets of .env.example (docker-compose config);
#   - every Grafana dashboard is valid JSON, and every PromQL query of its panels parses (promtool);
#   - requirements.lock pins every runtime dependency of pyproject.toml, with hashes (check-lock.py).
# Installs promtool (Debian's `prometheus` package) and docker-compose when they are missing; exits
# non-zero on the first failure. Safe to run any number of times.
set -euo pipefail

cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"

missing=()
command -v promtool >/dev/null 2>&1 || missing+=(prometheus)
command -v docker-compose >/dev/null 2>&1 || missing+=(docker-compose)
if ((${#missing[@]})); then
    sudo=()
    if [[ $(id -u) -ne 0 ]]; then
        sudo=(sudo)
    fi
    echo "check-deploy: installing ${missing[*]} (apt)"
    # Quiet when it works, the whole apt output when it does not.
    if ! log=$("${sudo[@]}" apt-get update -qq 2>&1 &&
        DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq "${missing[@]}" 2>&1); then
        echo "$log" >&2
        exit 1
    fi
fi

echo "== promtool check config"
promtool check config deploy/prometheus/prometheus.yml

echo "== promtool check rules"
promtool check rules deploy/prometheus/rules/*.yml

echo "== promtool test rules"
promtool test rules deploy/prometheus/tests/*.yml

echo "== docker-compose config"
env_file=$(mktemp)
trap 'rm -f "$env_file"' EXIT
cp .env.example "$env_file"
# A clean environment, so that neither a developer's .env nor exported variables decide the result.
env -i PATH="$PATH" HOME="${HOME:-/tmp}" \
    docker-compose --env-file "$env_file" -f compose.yaml config -q
echo "compose.yaml: valid"

echo "== Grafana dashboards"
shopt -s nullglob
dashboards=(deploy/grafana/dashboards/*.json)
if ((${#dashboards[@]} == 0)); then
    echo "no dashboard in deploy/grafana/dashboards" >&2
    exit 1
fi
for dashboard in "${dashboards[@]}"; do
    "$PYTHON" -m json.tool "$dashboard" >/dev/null
    echo "$dashboard: valid JSON"
done

echo "== Grafana dashboards: every PromQL query parses"
# promtool parses the queries as recording rules, with Grafana's range macros replaced by a duration.
queries=$(mktemp --suffix=.yml)
trap 'rm -f "$env_file" "$queries"' EXIT
"$PYTHON" - "${dashboards[@]}" >"$queries" <<'PY'
import json
import sys

print("groups:\n  - name: dashboard-queries\n    rules:")
for path in sys.argv[1:]:
    dashboard = json.load(open(path))
    uid = dashboard["uid"].replace("-", "_")
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            if target.get("datasource", {}).get("type") != "prometheus":
                continue
            expr = target["expr"].replace("$__rate_interval", "1m").replace("$__range", "1h")
            print(f"      - record: {uid}:panel{panel['id']}:{target['refId']}")
            print(f"        expr: {json.dumps(expr)}")
PY
promtool check rules --lint-fatal "$queries" >/dev/null
echo "$(grep -c 'record:' "$queries") PromQL queries: valid"

echo "== requirements.lock matches pyproject.toml"
# Offline: every runtime dependency pinned within its specifier, every entry hashed (no index is asked).
"$PYTHON" scripts/check-lock.py

echo "check-deploy: all checks passed"
