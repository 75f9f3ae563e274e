"""The parts of deploy/check.sh that need more than a tool's exit code: the Grafana dashboards, the
metric names the dashboards and alert rules reference, the alerts' runbook links and the
PrometheusRule generated from the alert rules. Run through deploy/check.sh (which provides PyYAML).

    check.py dashboards DIR EXPRS_OUT        structure of every DIR/*.json; their PromQL, with
                                             Grafana's variables filled in, as a rule file for
                                             `promtool check rules` (so every query must parse)
    check.py referenced DIR ALERTS LIST      LIST is exactly the metric names the dashboards and
                                             alert rules query (one per line, sorted)
    check.py runbooks ALERTS DOC             every alert has summary, description and a
                                             runbook_url naming a section of DOC
    check.py prometheusrule ALERTS FILE [--write]
                                             FILE is the PrometheusRule generated from ALERTS
"""

import json
import re
import sys
from pathlib import Path

import yaml

# Series names the services export: pairdb_* and the process collector's process_*. `up` is
# Prometheus's own (one per scrape target), so it is referenced but never exported.
METRIC = re.compile(r"\b(?:pairdb|process)_[a-z0-9_]+\b")
# Grafana's macros and this repository's dashboard variables, replaced by something PromQL parses.
GRAFANA_VARIABLES = {
    "$__rate_interval": "1m",
    "$__interval": "1m",
    "$__range": "1h",
    "${datasource}": "",
}

errors = []


def fail(message):
    errors.append(message)


def finish():
    for message in errors:
        print(f"FAIL: {message}", file=sys.stderr)
    sys.exit(1 if errors else 0)


def fill_variables(expr):
    for macro, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(macro, value)
    # Dashboard variables ($instance, $tenant, ...) only appear inside label matchers.
    return re.sub(r"\$\{?[a-zA-Z_][a-zA-Z0-9_]*\}?", ".*", expr)


def dashboard_queries(dashboard):
    """(where, PromQL) of every panel target and every query variable."""
    queries = []
    for panel in dashboard.get("panels", []):
        for inner in [panel] + panel.get("panels", []):
            for target in inner.get("targets", []):
                if "expr" in target:
                    queries.append((f"panel {inner.get('title')!r}", target["expr"]))
    for variable in dashboard.get("templating", {}).get("list", []):
        if variable.get("type") == "query":
            query = variable.get("query")
            query = query.get("query") if isinstance(query, dict) else query
            inner = re.fullmatch(r"\s*label_values\((.*),\s*[a-zA-Z_]+\)\s*", query or "")
            queries.append((f"variable {variable.get('name')!r}", inner.group(1) if inner else query))
    return queries


def load_dashboards(directory):
    dashboards = {}
    for path in sorted(Path(directory).glob("*.json")):
        try:
            dashboards[path.name] = json.loads(path.read_text())
        except json.JSONDecodeError as error:
            fail(f"{path}: not valid JSON: {error}")
    if not dashboards:
        fail(f"{directory}: no dashboards")
    return dashboards


def check_dashboards(directory, exprs_out):
    dashboards = load_dashboards(directory)
    uids = {}
    rules = []
    for name, dashboard in dashboards.items():
        uid = dashboard.get("uid")
        if not uid or not dashboard.get("title"):
            fail(f"{name}: a dashboard needs a uid and a title")
        if uid in uids:
            fail(f"{name}: uid {uid} is also {uids[uid]}'s")
        uids[uid] = name
        variables = {v.get("name"): v for v in dashboard.get("templating", {}).get("list", [])}
        source = variables.get("datasource", {})
        if source.get("type") != "datasource" or source.get("query") != "prometheus":
            fail(f"{name}: needs a `datasource` variable of Prometheus data sources")
        ids = set()
        cells = {}
        for panel in dashboard.get("panels", []):
            title = panel.get("title")
            if panel.get("id") in ids:
                fail(f"{name}: panel id {panel.get('id')} twice")
            ids.add(panel.get("id"))
            grid = panel.get("gridPos", {})
            if not all(isinstance(grid.get(k), int) for k in "xywh") or grid["x"] + grid["w"] > 24:
                fail(f"{name}: panel {title!r} has no valid gridPos: {grid}")
                continue
            for x in range(grid["x"], grid["x"] + grid["w"]):
                for y in range(grid["y"], grid["y"] + grid["h"]):
                    if (x, y) in cells:
                        fail(f"{name}: panels {cells[(x, y)]!r} and {title!r} overlap")
                        break
                    cells[(x, y)] = title
            if panel.get("type") == "row":
                continue
            if panel.get("datasource", {}).get("uid") != "${datasource}":
                fail(f"{name}: panel {title!r} does not use the $datasource variable")
            targets = panel.get("targets", [])
            if not targets or not all(t.get("expr", "").strip() for t in targets):
                fail(f"{name}: panel {title!r} has a target without a query")
        for where, query in dashboard_queries(dashboard):
            for variable in re.findall(r"\$\{?([a-zA-Z_][a-zA-Z0-9_]*)", query):
                if not variable.startswith("__") and variable not in variables:
                    fail(f"{name}: {where} uses ${variable}, which the dashboard does not define")
            record = re.sub(r"[^a-zA-Z0-9_]", "_", f"dashboard_{name}_{len(rules)}")
            rules.append({"record": record, "expr": fill_variables(query)})
    Path(exprs_out).write_text(yaml.safe_dump({"groups": [{"name": "dashboards", "rules": rules}]}))


def alert_rules(alerts):
    document = yaml.safe_load(Path(alerts).read_text())
    return [rule for group in document.get("groups", []) for rule in group.get("rules", [])]


def check_referenced(directory, alerts, listing):
    names = set()
    for dashboard in load_dashboards(directory).values():
        for _, query in dashboard_queries(dashboard):
            names.update(METRIC.findall(query))
    for rule in alert_rules(alerts):
        names.update(METRIC.findall(rule.get("expr", "")))
    listed = Path(listing).read_text().split("\n")
    listed = [line for line in listed if line]
    if listed != sorted(set(listed)):
        fail(f"{listing}: one name per line, sorted, no duplicates")
    missing = sorted(names - set(listed))
    extra = sorted(set(listed) - names)
    if missing:
        fail(f"{listing} lacks names the dashboards or alerts query: {missing}")
    if extra:
        fail(f"{listing} lists names nothing queries: {extra}")


def anchors(markdown):
    """GitHub's heading anchors: lowercase, punctuation dropped, spaces to hyphens."""
    found = set()
    for line in markdown.splitlines():
        heading = re.match(r"#{1,6}\s+(.*)", line)
        if heading:
            text = re.sub(r"[^\w\- ]", "", heading.group(1).strip().lower())
            found.add(text.replace(" ", "-"))
    return found


def check_runbooks(alerts, doc):
    targets = anchors(Path(doc).read_text())
    for rule in alert_rules(alerts):
        if "alert" not in rule:
            continue
        name = rule["alert"]
        annotations = rule.get("annotations", {})
        for key in ("summary", "description", "runbook_url"):
            if not str(annotations.get(key, "")).strip():
                fail(f"alert {name}: no {key} annotation")
        url = annotations.get("runbook_url", "")
        page, _, anchor = url.partition("#")
        # Links are relative to the repository root; DOC may be a path to a copy of it.
        if not page or not Path(doc).as_posix().endswith(page) or anchor not in targets:
            fail(f"alert {name}: runbook_url {url!r} is not a section of {doc}")
        if "severity" not in rule.get("labels", {}):
            fail(f"alert {name}: no severity label")


PROMETHEUS_RULE_HEADER = """\
# GENERATED from deploy/prometheus/alerts.yml by `deploy/check.sh --write-prometheusrule`: edit that
# file and regenerate (deploy/check.sh fails while the two differ). The alert rules for the
# Prometheus Operator; what each alert means and what to do: docs/operating.md.
apiVersion: monitoring.coreos.com/v1
kind: PrometheusRule
metadata:
  name: pairdb
spec:
"""


def prometheus_rule_text(alerts):
    lines = Path(alerts).read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("groups:"))
    body = "".join(f"  {line}\n" if line else "\n" for line in lines[start:])
    return PROMETHEUS_RULE_HEADER + body


def check_prometheus_rule(alerts, rule_file, write):
    text = prometheus_rule_text(alerts)
    if write:
        Path(rule_file).write_text(text)
        return
    current = Path(rule_file).read_text() if Path(rule_file).exists() else ""
    if current != text:
        fail(f"{rule_file} is not generated from {alerts}: run deploy/check.sh --write-prometheusrule")
    # The copy means the same rules, not just the same text.
    document = yaml.safe_load(text)
    if document["spec"]["groups"] != yaml.safe_load(Path(alerts).read_text())["groups"]:
        fail(f"{rule_file}: spec.groups differ from {alerts}")


def main(argv):
    command, args = argv[0], argv[1:]
    if command == "dashboards":
        check_dashboards(*args)
    elif command == "referenced":
        check_referenced(*args)
    elif command == "runbooks":
        check_runbooks(*args)
    elif command == "prometheusrule":
        check_prometheus_rule(args[0], args[1], args[2:] == ["--write"])
    else:
        raise SystemExit(f"unknown command {command}")
    finish()


if __name__ == "__main__":
    main(sys.argv[1:])
