"""Checks for scripts/validate-k8s.sh, run with the k8s-tools venv's python
(PyYAML comes with kubernetes-validate and checkov).

  validate-k8s.py versions WANTED...             schema versions the wheel ships
  validate-k8s.py schema SKIPS OVERLAY VER OUT   kubernetes-validate's output
  validate-k8s.py checkov SKIPS JSON USED NAME=PATH...  checkov's JSON report
  validate-k8s.py hadolint SKIPS JSON USED       hadolint's JSON report
  validate-k8s.py stale SKIPS TOOL USED          skip entries nothing matched
(USED: a file collecting the skip ids that matched a finding.)
  validate-k8s.py assert ROOT OVERLAY RENDERED   our own assertions
  validate-k8s.py runbooks ROOT                  alerts -> runbooks -> index

Each prints one line per finding and exits 1 if any check failed.
"""

import json
import re
import sys
import tomllib
from pathlib import Path

import yaml

failed = False


def ok(msg):
    print(f"  ok    {msg}")


def fail(msg):
    global failed
    failed = True
    print(f"  FAIL  {msg}")


def note(msg):
    print(f"  note  {msg}")


def load_skips(path):
    with open(path) as f:
        skips = yaml.safe_load(f)
    for section in ("checkov", "hadolint", "no_schema"):
        for entry in skips.get(section) or []:
            if not str(entry.get("reason", "")).strip():
                fail(f"{path}: {section} entry {entry} has no reason")
    return skips


# --- kubernetes-validate ----------------------------------------------------


def cmd_versions(wanted):
    from kubernetes_validate import utils

    shipped = utils.all_versions()
    majors = sorted({utils.major_minor(v) for v in shipped}, key=lambda v: tuple(map(int, v.split("."))))
    print(f"  kubernetes-validate ships schemas for {majors[0]} .. {majors[-1]}: {' '.join(majors)}")
    for v in wanted:
        if v in majors:
            ok(f"schemas for Kubernetes {v} present")
        else:
            fail(f"no schemas for Kubernetes {v} in this kubernetes-validate")


def cmd_schema(skips_path, overlay, version, out_path):
    skips = load_skips(skips_path)
    no_schema = {(e["apiVersion"], e["kind"]) for e in skips.get("no_schema") or []}
    unchecked = set()
    errors = 0
    for line in Path(out_path).read_text().splitlines():
        m = re.search(r"Couldn't find schema for kind (\S+) with api version (\S+)", line)
        if line.startswith("WARN") and m:
            kind, api = m.group(1), m.group(2)
            if (api, kind) in no_schema:
                unchecked.add(f"{kind} ({api})")
            else:
                # An unknown apiVersion or kind (a typo) is only a warning
                # to kubernetes-validate: an error here.
                fail(f"{overlay}: no schema for {kind} {api} in Kubernetes {version} (typo, or a CRD to list in no_schema?)")
                errors += 1
        elif line.startswith(("ERROR", "FATAL")):
            fail(f"{overlay}: {line}")
            errors += 1
        elif line.strip():
            note(f"{overlay}: {line}")
    if errors == 0:
        ok(f"{overlay}: every object valid against Kubernetes {version} (--strict)")
    if unchecked:
        note(f"{overlay}: NOT schema-checked (no schema in kubernetes-validate; listed in no_schema): {', '.join(sorted(unchecked))}")


# --- checkov and hadolint -----------------------------------------------------


def cmd_checkov(skips_path, report, used_file, targets):
    skips = {e["id"]: e for e in load_skips(skips_path).get("checkov") or []}
    names = dict(t.split("=", 1) for t in targets)
    data = json.loads(Path(report).read_text() or "[]")
    if isinstance(data, dict):
        data = [data]
    per = {name: {"passed": 0, "failed": [], "skipped": []} for name in names}
    errors = []
    for rep in data:
        if "results" not in rep:
            continue
        errors += rep.get("results", {}).get("parsing_errors", [])
        for kind in ("passed_checks", "failed_checks"):
            for c in rep["results"].get(kind, []):
                name = next((n for n, p in names.items() if c["file_path"].endswith(Path(p).name)), None)
                if name is None:
                    fail(f"checkov reported on an unexpected file {c['file_path']}")
                    continue
                if kind == "passed_checks":
                    per[name]["passed"] += 1
                elif c["check_id"] in skips:
                    per[name]["skipped"].append(c["check_id"])
                else:
                    per[name]["failed"].append(c)
    for e in errors:
        fail(f"checkov could not parse {e}")
    used = set()
    for name, r in per.items():
        if r["passed"] == 0 and not r["failed"] and not r["skipped"]:
            fail(f"checkov {name}: no checks ran (nothing parsed?)")
            continue
        used.update(r["skipped"])
        skipped = ", ".join(sorted(set(r["skipped"]))) or "none"
        if r["failed"]:
            for c in r["failed"]:
                res = c.get("resource", "")
                fail(f"checkov {name}: {c['check_id']} {c['check_name']} ({res}, lines {c.get('file_line_range')})")
        else:
            ok(f"checkov {name}: {r['passed']} passed, 0 failed, skipped (validation-skips.yaml): {skipped}")
    with open(used_file, "a") as f:
        f.writelines(f"{u}\n" for u in sorted(used))


def cmd_hadolint(skips_path, report, used_file):
    skips = {e["id"]: e for e in load_skips(skips_path).get("hadolint") or []}
    findings = json.loads(Path(report).read_text() or "[]")
    used = set()
    bad = 0
    for f in findings:
        if f["code"] in skips:
            used.add(f["code"])
        else:
            bad += 1
            fail(f"hadolint {f['file']}:{f['line']} {f['code']} {f['level']}: {f['message']}")
    if bad == 0:
        ok(f"hadolint deploy/Dockerfile: no findings but the skipped ({', '.join(sorted(used)) or 'none'})")
    with open(used_file, "a") as f:
        f.writelines(f"{u}\n" for u in sorted(used))


def cmd_stale(skips_path, tool, used_file):
    used = set(Path(used_file).read_text().split()) if Path(used_file).exists() else set()
    entries = load_skips(skips_path).get(tool) or []
    for e in entries:
        if e["id"] in used:
            note(f"{tool} skip {e['id']} ({e.get('title', '')}): {' '.join(e['reason'].split())}")
        else:
            fail(f"{tool} skip {e['id']} matched no finding: remove it from validation-skips.yaml")


# --- our own assertions -------------------------------------------------------

# Semantic version, an optional pre-release, then -g and the commit:
# 0.1.0-g1234567, 1.2.0-rc.1-gabcdef0; optionally @sha256:<digest>.
TAG_RE = re.compile(r"^\d+\.\d+\.\d+(-[0-9A-Za-z.]+)?-g[0-9a-f]{7,40}(@sha256:[0-9a-f]{64})?$")
REQUIRED_SECRETS = {"bitclone-node-certs", "bitclone-token-keys", "bitclone-admin-token"}


def allowed_config_keys(example):
    """Keys of deploy/bitclone.example.toml, set or commented out, as dotted
    paths; tables under [sinks.NAME] become sinks.*."""
    keys = set()
    section = ""
    for raw in Path(example).read_text().splitlines():
        line = raw.strip()
        m = re.match(r"^\[([a-z0-9_.-]+)\]$", line)
        if m:
            section = m.group(1)
            continue
        m = re.match(r"^#?\s*([a-z0-9_]+)\s*=", line)
        if m:
            keys.add(norm(f"{section}.{m.group(1)}" if section else m.group(1)))
    return keys


def norm(path):
    parts = path.split(".")
    if parts[0] == "sinks" and len(parts) > 1:
        parts[1] = "*"
    return ".".join(parts)


def flatten(table, prefix=""):
    for k, v in table.items():
        p = f"{prefix}{k}"
        if isinstance(v, dict):
            yield from flatten(v, p + ".")
        else:
            yield p


def duration_s(text):
    m = re.fullmatch(r"(\d+)(ms|s|m)", text)
    if not m:
        return None
    n, unit = int(m.group(1)), m.group(2)
    return {"ms": n / 1000, "s": n, "m": n * 60}[unit]


def matches(selector, labels):
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def cmd_assert(root, overlay, rendered):
    root = Path(root)
    docs = [d for d in yaml.safe_load_all(Path(rendered).read_text()) if d]
    by_kind = {}
    for d in docs:
        by_kind.setdefault(d["kind"], []).append(d)

    def one(kind, name=None):
        objs = [o for o in by_kind.get(kind, []) if name is None or o["metadata"]["name"] == name]
        if len(objs) != 1:
            fail(f"{overlay}: expected one {kind} {name or ''}, found {len(objs)}")
            return None
        return objs[0]

    # No Secrets: they are made by the operator, never by the manifests.
    if by_kind.get("Secret"):
        fail(f"{overlay}: the rendering contains Secret objects: {[s['metadata']['name'] for s in by_kind['Secret']]}")
    else:
        ok(f"{overlay}: no Secret objects (secrets are referenced, never generated)")

    namespaces = {d["metadata"].get("namespace") for d in docs}
    if None in namespaces or "default" in namespaces or len(namespaces) != 1:
        fail(f"{overlay}: every object needs the overlay's namespace, found {namespaces}")
    else:
        ok(f"{overlay}: all {len(docs)} objects in namespace {namespaces.pop()}")

    sts = one("StatefulSet", "bitclone")
    if sts is None:
        return
    spec = sts["spec"]
    pod = spec["template"]["spec"]
    pod_labels = spec["template"]["metadata"]["labels"]
    replicas = spec.get("replicas", 1)

    # Raft: an odd number of voters, at least 3.
    if replicas >= 3 and replicas % 2 == 1:
        ok(f"{overlay}: {replicas} replicas (odd, at least 3)")
    else:
        fail(f"{overlay}: replicas {replicas}: want an odd number >= 3 for a Raft majority")

    if matches(spec["selector"]["matchLabels"], pod_labels):
        ok(f"{overlay}: StatefulSet selector matches its pod labels")
    else:
        fail(f"{overlay}: StatefulSet selector {spec['selector']} does not match pod labels {pod_labels}")

    # Version labels stay out of selectors and volumeClaimTemplates (both
    # immutable: a changing label there breaks every upgrade).
    for vct in spec.get("volumeClaimTemplates", []):
        if "app.kubernetes.io/version" in (vct["metadata"].get("labels") or {}):
            fail(f"{overlay}: volumeClaimTemplate {vct['metadata']['name']} carries a version label (immutable field)")
    for d in docs:
        sel = (d.get("spec") or {}).get("selector") or {}
        sel = sel.get("matchLabels", sel) if isinstance(sel, dict) else {}
        if "app.kubernetes.io/version" in sel:
            fail(f"{overlay}: {d['kind']}/{d['metadata']['name']} selects on the version label")

    # Images: tagged, never latest; the version label names the same tag.
    containers = pod.get("containers", []) + pod.get("initContainers", [])
    version = sts["metadata"].get("labels", {}).get("app.kubernetes.io/version")
    for c in containers:
        image = c.get("image", "")
        name_tag = image.split("@")[0]
        tag = name_tag.rsplit(":", 1)[1] if ":" in name_tag.rsplit("/", 1)[-1] else ""
        digest = "@" + image.split("@", 1)[1] if "@" in image else ""
        if not tag or tag == "latest" or not TAG_RE.match(tag + digest):
            fail(f"{overlay}: container {c['name']} image {image!r}: want REPO:X.Y.Z-g<commit>, never latest or untagged")
        else:
            ok(f"{overlay}: container {c['name']} image {image}")
        if version != tag:
            fail(f"{overlay}: app.kubernetes.io/version {version!r} differs from the image tag {tag!r}")

    # Resources, probes, security context.
    for c in containers:
        res = c.get("resources", {})
        missing = [f"{kind}.{r}" for kind in ("requests", "limits") for r in ("cpu", "memory", "ephemeral-storage")
                   if r not in (res.get(kind) or {})]
        if missing:
            fail(f"{overlay}: container {c['name']} lacks resources {missing}")
        else:
            ok(f"{overlay}: container {c['name']} requests {res['requests']} limits {res['limits']}")
        if c in pod.get("containers", []):
            probes = [p for p in ("startupProbe", "readinessProbe", "livenessProbe") if p not in c]
            if probes:
                fail(f"{overlay}: container {c['name']} lacks {probes}")
            else:
                paths = {p: c[p].get("httpGet", {}).get("path") for p in ("startupProbe", "readinessProbe", "livenessProbe")}
                want = {"startupProbe": "/healthz", "readinessProbe": "/readyz", "livenessProbe": "/healthz"}
                if paths != want:
                    fail(f"{overlay}: container {c['name']} probe paths {paths}, want {want}")
                else:
                    ok(f"{overlay}: container {c['name']} has startup, readiness (/readyz) and liveness (/healthz) probes")
        sc = c.get("securityContext") or {}
        checks = {
            "readOnlyRootFilesystem": sc.get("readOnlyRootFilesystem") is True,
            "allowPrivilegeEscalation false": sc.get("allowPrivilegeEscalation") is False,
            "capabilities drop ALL": "ALL" in ((sc.get("capabilities") or {}).get("drop") or []),
            "runAsNonRoot": (sc.get("runAsNonRoot") or (pod.get("securityContext") or {}).get("runAsNonRoot")) is True,
        }
        bad = [k for k, v in checks.items() if not v]
        if bad:
            fail(f"{overlay}: container {c['name']} securityContext lacks {bad}")
        else:
            ok(f"{overlay}: container {c['name']} {', '.join(checks)}")

    psc = pod.get("securityContext") or {}
    if (psc.get("seccompProfile") or {}).get("type") == "RuntimeDefault" and psc.get("fsGroup") == 10001:
        ok(f"{overlay}: pod seccompProfile RuntimeDefault, fsGroup 10001")
    else:
        fail(f"{overlay}: pod securityContext needs seccompProfile RuntimeDefault and fsGroup 10001: {psc}")

    sa = one("ServiceAccount", pod.get("serviceAccountName"))
    if pod.get("automountServiceAccountToken") is False and sa and sa.get("automountServiceAccountToken") is False:
        ok(f"{overlay}: no service account token mounted (pod and ServiceAccount)")
    else:
        fail(f"{overlay}: automountServiceAccountToken must be false on the pod and its ServiceAccount")

    # Volumes: every mount has a volume; Secrets are the documented ones.
    vols = {v["name"]: v for v in pod.get("volumes", [])}
    vcts = {v["metadata"]["name"] for v in spec.get("volumeClaimTemplates", [])}
    for c in containers:
        for m in c.get("volumeMounts", []):
            if m["name"] not in vols and m["name"] not in vcts:
                fail(f"{overlay}: container {c['name']} mounts {m['name']}, which is no volume")
    secrets = {v["secret"]["secretName"] for v in vols.values() if "secret" in v}
    if REQUIRED_SECRETS - secrets:
        fail(f"{overlay}: Secrets not mounted: {sorted(REQUIRED_SECRETS - secrets)}")
    else:
        ok(f"{overlay}: Secrets the operator creates first: {', '.join(sorted(secrets))}")
    configmaps = {v["configMap"]["name"] for v in vols.values() if "configMap" in v}
    rendered_cms = {c["metadata"]["name"]: c for c in by_kind.get("ConfigMap", [])}
    for cm in configmaps:
        if cm not in rendered_cms:
            fail(f"{overlay}: ConfigMap {cm} is mounted but not in the rendering")

    # The node's config: known keys only (the node refuses unknown ones).
    env = {e["name"]: e.get("value") for e in pod["containers"][0].get("env", [])}
    cfg_path = env.get("BITCLONE_CONFIG", "")
    cfg_mount = next((m for m in pod["containers"][0].get("volumeMounts", []) if cfg_path.startswith(m["mountPath"] + "/")), None)
    config = None
    if cfg_mount is None or "configMap" not in vols.get(cfg_mount["name"], {}):
        fail(f"{overlay}: BITCLONE_CONFIG {cfg_path!r} is not in a mounted ConfigMap")
    else:
        cm = rendered_cms.get(vols[cfg_mount["name"]]["configMap"]["name"])
        key = cfg_path[len(cfg_mount["mountPath"]) + 1:]
        try:
            config = tomllib.loads(cm["data"][key])
        except (KeyError, TypeError, tomllib.TOMLDecodeError) as e:
            fail(f"{overlay}: {cfg_path} is not valid TOML in the ConfigMap: {e}")
    if config is not None:
        allowed = allowed_config_keys(root / "deploy/bitclone.example.toml")
        unknown = sorted(k for k in flatten(config) if norm(k) not in allowed)
        if unknown:
            fail(f"{overlay}: config keys not in deploy/bitclone.example.toml (the node refuses them): {unknown}")
        else:
            ok(f"{overlay}: {cfg_path}: {len(list(flatten(config)))} keys, all known to deploy/bitclone.example.toml")
        want = {"listen": "0.0.0.0:7443", "cluster.peer_listen": "0.0.0.0:7444", "http.listen": "0.0.0.0:9464"}
        got = {k: config.get(k) if "." not in k else config.get(k.split(".")[0], {}).get(k.split(".")[1]) for k in want}
        if got != want:
            fail(f"{overlay}: listen addresses {got}, want {want} (the ports the Services and probes use)")
        if config.get("api", {}).get("plaintext"):
            fail(f"{overlay}: api.plaintext is set: the node refuses it off loopback")
        grace = duration_s(str(config.get("shutdown_grace", "30s")))
        tgps = pod.get("terminationGracePeriodSeconds", 30)
        if grace is None or grace >= tgps:
            fail(f"{overlay}: shutdown_grace {config.get('shutdown_grace')} must be below terminationGracePeriodSeconds {tgps}")
        else:
            ok(f"{overlay}: shutdown_grace {grace:g}s < terminationGracePeriodSeconds {tgps}s; preStop: {pod['containers'][0].get('lifecycle', {}).get('preStop', {}).get('exec', {}).get('command')}")

    # Cluster formation: names through the headless Service, seeds in range.
    svc_name = spec["serviceName"]
    peers = one("Service", svc_name)
    for var in ("BITCLONE_PEER_ADVERTISE", "BITCLONE_API_ADVERTISE"):
        if f".{svc_name}.$(POD_NAMESPACE)." not in (env.get(var) or ""):
            fail(f"{overlay}: {var} {env.get(var)!r} does not go through the headless Service {svc_name}")
    seeds = (env.get("BITCLONE_JOIN") or "").split(",")
    ords = [int(m.group(1)) for s in seeds if (m := re.match(rf"^bitclone-(\d+)\.{svc_name}\.\$\(POD_NAMESPACE\)\.", s))]
    if len(ords) != len(seeds) or not ords or max(ords) >= replicas or 0 not in ords:
        fail(f"{overlay}: BITCLONE_JOIN {seeds} must name pods bitclone-0..{replicas - 1} through {svc_name}")
    else:
        ok(f"{overlay}: seeds bitclone-{{{','.join(map(str, ords))}}} via {svc_name}, within {replicas} replicas")

    # Services: selectors match the pods; ports as the node listens.
    for svc in by_kind.get("Service", []):
        if not matches(svc["spec"].get("selector"), pod_labels):
            fail(f"{overlay}: Service {svc['metadata']['name']} selector does not match the pods")
    if peers:
        ports = {(p["port"], p.get("protocol", "TCP")) for p in peers["spec"]["ports"]}
        want_ports = {(7443, "TCP"), (7444, "TCP"), (7444, "UDP")}
        if peers["spec"].get("clusterIP") == "None" and peers["spec"].get("publishNotReadyAddresses") is True and ports == want_ports:
            ok(f"{overlay}: {svc_name} headless, publishes unready pods, ports 7443/TCP 7444/TCP 7444/UDP")
        else:
            fail(f"{overlay}: {svc_name} must be headless with publishNotReadyAddresses and ports {sorted(want_ports)}")

    pdb = one("PodDisruptionBudget")
    if pdb and pdb["spec"].get("maxUnavailable") == 1 and matches(pdb["spec"]["selector"]["matchLabels"], pod_labels):
        ok(f"{overlay}: PodDisruptionBudget maxUnavailable 1 over the pods")
    else:
        fail(f"{overlay}: PodDisruptionBudget must have maxUnavailable 1 and select the pods")

    for np in by_kind.get("NetworkPolicy", []):
        if not matches(np["spec"]["podSelector"].get("matchLabels"), pod_labels):
            fail(f"{overlay}: NetworkPolicy {np['metadata']['name']} does not select the pods")

    # ServiceMonitor -> metrics Service -> port http.
    sm = one("ServiceMonitor")
    if sm:
        targets = [s for s in by_kind.get("Service", []) if matches(sm["spec"]["selector"].get("matchLabels"), s["metadata"].get("labels", {}))]
        port_names = {p.get("name") for s in targets for p in s["spec"]["ports"]}
        sm_ports = {e.get("port") for e in sm["spec"]["endpoints"]}
        if len(targets) == 1 and sm_ports <= port_names:
            t = targets[0]
            job = t["metadata"]["labels"].get(sm["spec"].get("jobLabel", ""), t["metadata"]["name"])
            if job != "bitclone":
                fail(f"{overlay}: ServiceMonitor gives job={job!r}; the alert rules expect job=\"bitclone\"")
            else:
                ok(f"{overlay}: ServiceMonitor scrapes Service {t['metadata']['name']} port {', '.join(sorted(sm_ports))} as job=\"bitclone\"")
        else:
            fail(f"{overlay}: ServiceMonitor selects {[s['metadata']['name'] for s in targets]}, ports {sm_ports} vs {port_names}")

    # PrometheusRule: the same groups as deploy/prometheus/alerts.yml.
    pr = one("PrometheusRule")
    if pr:
        source = yaml.safe_load((root / "deploy/prometheus/alerts.yml").read_text())
        if pr["spec"] == source:
            n = sum(len(g["rules"]) for g in source["groups"])
            ok(f"{overlay}: PrometheusRule carries the {n} rules of deploy/prometheus/alerts.yml unchanged")
        else:
            fail(f"{overlay}: PrometheusRule spec differs from deploy/prometheus/alerts.yml (run scripts/k8s-rules.sh)")


# --- runbooks ----------------------------------------------------------------


RUNBOOKS = "deploy/runbooks"


def cmd_runbooks(root):
    """Every alert of deploy/prometheus/alerts.yml names one runbook file
    that exists (annotation runbook_url, a path relative to the repository
    root); every runbook is listed in deploy/runbooks/README.md, whose
    table names for each runbook exactly the alerts that point to it."""
    root = Path(root)
    rules = yaml.safe_load((root / "deploy/prometheus/alerts.yml").read_text())
    book_dir = root / RUNBOOKS
    index_path = book_dir / "README.md"
    if not index_path.is_file():
        fail(f"{RUNBOOKS}/README.md (the index) is missing")
        return
    pointing = {}  # runbook file name -> alerts pointing to it
    alerts = 0
    for group in rules["groups"]:
        for rule in group["rules"]:
            if "alert" not in rule:
                continue
            alerts += 1
            name = rule["alert"]
            url = (rule.get("annotations") or {}).get("runbook_url")
            if not isinstance(url, str) or not url.strip():
                fail(f"alert {name}: no runbook_url annotation")
                continue
            path = url.split("#", 1)[0]
            if not re.fullmatch(rf"{RUNBOOKS}/[a-z0-9-]+\.md", path) or path == f"{RUNBOOKS}/README.md":
                fail(f"alert {name}: runbook_url {url!r} is not one file {RUNBOOKS}/NAME.md")
                continue
            if not (root / path).is_file():
                fail(f"alert {name}: runbook_url {url!r}: no such file")
                continue
            pointing.setdefault(Path(path).name, set()).add(name)
    # The index: table rows "| [x.md](x.md) | Alert, Alert | summary |".
    listed = {}
    for line in index_path.read_text().splitlines():
        m = re.match(r"\|\s*\[([^\]]+\.md)\]\(([^)]+)\)\s*\|([^|]*)\|", line)
        if not m:
            continue
        label, target, cell = m.groups()
        if label != target:
            fail(f"{RUNBOOKS}/README.md: row links [{label}] to ({target})")
        if not (book_dir / target).is_file():
            fail(f"{RUNBOOKS}/README.md lists {target}, which does not exist")
        listed[target] = set(re.findall(r"\bBitClone\w+", cell))
    for f in sorted(book_dir.glob("*.md")):
        if f.name == "README.md":
            continue
        if f.name not in listed:
            fail(f"{RUNBOOKS}/{f.name} is not listed in {RUNBOOKS}/README.md")
    for book in sorted(set(listed) | set(pointing)):
        want, have = pointing.get(book, set()), listed.get(book, set())
        if book in listed and want != have:
            fail(f"{RUNBOOKS}/README.md row {book}: lists alerts {sorted(have)}, but {sorted(want)} point to it")
    if not failed:
        ok(f"{alerts} alerts each name a runbook that exists; {len(listed)} runbooks, all in {RUNBOOKS}/README.md with the alerts that point to them")


def main():
    cmd, args = sys.argv[1], sys.argv[2:]
    if cmd == "versions":
        cmd_versions(args)
    elif cmd == "schema":
        cmd_schema(*args)
    elif cmd == "checkov":
        cmd_checkov(args[0], args[1], args[2], args[3:])
    elif cmd == "hadolint":
        cmd_hadolint(*args)
    elif cmd == "stale":
        cmd_stale(*args)
    elif cmd == "assert":
        cmd_assert(*args)
    elif cmd == "runbooks":
        cmd_runbooks(*args)
    else:
        sys.exit(f"unknown command {cmd}")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
