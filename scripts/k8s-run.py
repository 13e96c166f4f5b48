#!/usr/bin/env python3
"""Executes the rendered StatefulSet of a deploy/k8s overlay as local processes.

No API server can run here, so this plays the kubelet: it renders the overlay
with kustomize, and starts each pod's container as a real `bitclone` process
with exactly the container's command, arguments and environment (fieldRef
values and $(VAR) references resolved as the kubelet does) and its volumes
mounted at the container's paths (ConfigMaps and Secrets as files, the
PersistentVolumeClaim and emptyDirs as directories), in a network namespace
of its own with a pod IP on a bridge, as the user of its securityContext.
The pods' DNS names (bitclone-N.bitclone-peers.NS.svc.cluster.local) resolve
to their IPs through a private /etc/hosts. Probes are polled as the kubelet
would; stopping a pod runs its preStop hook, then SIGTERM, then SIGKILL after
the grace period.

Scenario: the set forms a cluster; a put and a restore work through the
client Service's name; readiness reflects reality; a killed pod comes back
with its volume and rejoins as itself; the set scales 3 -> 5 -> 3 (the
documented `cluster remove` first, then each pod's preStop drain, which
must succeed, and SIGTERM); a clone job writes to the shared exports
volume (the dev overlay's file:// root); a pod running a clone job is
stopped and its preStop drain hands the job to another pod, which finishes
it with no attempt lost.

Run as root (it makes namespaces, a bridge and mounts; everything is gone
when it exits):  scripts/k8s-run.py --bitclone PATH [--overlay dev]
"""

import argparse
import json
import os
import re
import shutil
import signal
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.request

import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
INSIDE = "BITCLONE_K8S_RUN_INSIDE"
BRIDGE_IP = "10.244.0.1"
# What a container without PATH in its env gets from the image.
IMAGE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
T0 = time.monotonic()


def say(msg):
    print(f"k8s-run [{time.monotonic() - T0:7.1f}s] {msg}", flush=True)


def fail(msg):
    say(f"FAIL: {msg}")
    raise SystemExit(1)


def run(*args, check=True, **kw):
    r = subprocess.run(list(args), capture_output=True, text=True, **kw)
    if check and r.returncode != 0:
        fail(f"{' '.join(args)}: exit {r.returncode}: {r.stderr.strip()}")
    return r


def wait_for(what, seconds, cond, every=0.5):
    deadline = time.monotonic() + seconds
    while True:
        v = cond()
        if v:
            return v
        if time.monotonic() > deadline:
            fail(f"timed out after {seconds}s waiting for {what}")
        time.sleep(every)


# ---------------------------------------------------------------- rendering


def render(kubectl, overlay):
    out = run(kubectl, "kustomize", os.path.join(ROOT, "deploy/k8s/overlays", overlay)).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def expand(value, env):
    """$(VAR) references as the kubelet resolves them; $$ escapes."""
    def sub(m):
        if m.group(0) == "$$":
            return "$"
        name = m.group(1)
        return env.get(name, m.group(0))
    return re.sub(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_]*)\)", sub, value)


class PodSpec:
    """What the kubelet needs of the rendered objects."""

    def __init__(self, docs):
        self.sts = next(d for d in docs if d["kind"] == "StatefulSet")
        self.namespace = self.sts["metadata"].get("namespace", "default")
        self.name = self.sts["metadata"]["name"]
        self.service = self.sts["spec"]["serviceName"]
        self.configmaps = {d["metadata"]["name"]: d.get("data", {})
                           for d in docs if d["kind"] == "ConfigMap"}
        self.claims = {d["metadata"]["name"]: d["spec"]
                       for d in docs if d["kind"] == "PersistentVolumeClaim"}
        if any(d["kind"] == "Secret" for d in docs):
            fail("the rendering holds a Secret: Secrets are referenced, never generated")
        tpl = self.sts["spec"]["template"]
        self.pod = tpl["spec"]
        self.labels = tpl["metadata"].get("labels", {})
        (self.container,) = self.pod["containers"]
        self.grace = self.pod.get("terminationGracePeriodSeconds", 30)
        sc = {**self.pod.get("securityContext", {}), **self.container.get("securityContext", {})}
        self.uid = sc.get("runAsUser", 0)
        self.gid = sc.get("runAsGroup", self.uid)
        self.fs_group = self.pod.get("securityContext", {}).get("fsGroup")
        self.ports = {p["name"]: p["containerPort"] for p in self.container.get("ports", [])}
        for unplayed in ("envFrom", "workingDir"):
            if unplayed in self.container:
                fail(f"container field {unplayed} is not played here")
        for m in self.container.get("volumeMounts", []):
            if "subPath" in m or "subPathExpr" in m:
                fail(f"volumeMount {m['name']}: subPath is not played here")
        self.replicas = self.sts["spec"].get("replicas", 1)

    def pod_name(self, ordinal):
        return f"{self.name}-{ordinal}"

    def fqdn(self, ordinal):
        return f"{self.pod_name(ordinal)}.{self.service}.{self.namespace}.svc.cluster.local"

    def env(self, ordinal, ip):
        """The container's environment, in order, as the kubelet builds it."""
        field = {
            "metadata.name": self.pod_name(ordinal),
            "metadata.namespace": self.namespace,
            "status.podIP": ip,
            "spec.serviceAccountName": self.pod.get("serviceAccountName", "default"),
        }
        env = {"PATH": IMAGE_PATH, "HOSTNAME": self.pod_name(ordinal)}
        for e in self.container.get("env", []):
            if "value" in e:
                env[e["name"]] = expand(e["value"], env)
            elif "fieldRef" in e.get("valueFrom", {}):
                path = e["valueFrom"]["fieldRef"]["fieldPath"]
                if path not in field:
                    fail(f"env {e['name']}: fieldRef {path} is not played here")
                env[e["name"]] = field[path]
            else:
                fail(f"env {e['name']}: only value and fieldRef are played here")
        return env

    def argv(self, env):
        c = self.container
        return [expand(a, env) for a in c.get("command", []) + c.get("args", [])]


# ---------------------------------------------------------------- the pods


class Cluster:
    def __init__(self, spec, work, bitclone, secrets):
        self.spec = spec
        self.work = work
        self.bin_dir = os.path.join(work, "image-bin")
        os.makedirs(self.bin_dir)
        # The image's /usr/local/bin/bitclone.
        shutil.copy(bitclone, os.path.join(self.bin_dir, "bitclone"))
        self.secrets = secrets
        self.procs = {}
        self.vols = {}
        self.envs = {}
        self.netns_made = set()

    def ip(self, ordinal):
        return f"10.244.0.{10 + ordinal}"

    def pvc(self, ordinal):
        d = os.path.join(self.work, "pvc", f"data-{self.spec.pod_name(ordinal)}")
        if not os.path.isdir(d):
            os.makedirs(d)
            os.chown(d, self.spec.uid, self.spec.fs_group or self.spec.gid)
        return d

    def host_dir(self, mount_path):
        """The directory behind a PersistentVolumeClaim volume mounted at
        `mount_path` (what the test reads back)."""
        m = next(m for m in self.spec.container["volumeMounts"] if m["mountPath"] == mount_path)
        v = next(v for v in self.spec.pod["volumes"] if v["name"] == m["name"])
        return self.claim(v["persistentVolumeClaim"]["claimName"])

    def claim(self, name):
        """A PersistentVolumeClaim every pod mounts: one directory, kept
        across pod restarts; ReadWriteMany, since pods on any node mount it."""
        spec = self.spec.claims.get(name)
        if spec is None:
            fail(f"no PersistentVolumeClaim {name} in the rendering")
        if "ReadWriteMany" not in spec.get("accessModes", []):
            fail(f"PersistentVolumeClaim {name}: every pod mounts it, so it must be ReadWriteMany")
        d = os.path.join(self.work, "pvc", name)
        if not os.path.isdir(d):
            os.makedirs(d)
            os.chown(d, self.spec.uid, self.spec.fs_group or self.spec.gid)
        return d

    def volume_dirs(self, ordinal):
        """Each volume of the pod as a directory, by volume name."""
        out = {}
        for v in self.spec.pod.get("volumes", []):
            name = v["name"]
            if "persistentVolumeClaim" in v:
                out[name] = self.claim(v["persistentVolumeClaim"]["claimName"])
                continue
            d = os.path.join(self.work, "volumes", self.spec.pod_name(ordinal), name)
            if "configMap" in v:
                data = self.spec.configmaps.get(v["configMap"]["name"])
                if data is None:
                    fail(f"volume {name}: no ConfigMap {v['configMap']['name']} in the rendering")
                files = data
                mode = v["configMap"].get("defaultMode", 0o644)
            elif "secret" in v:
                sname = v["secret"]["secretName"]
                if sname not in self.secrets:
                    fail(f"volume {name}: Secret {sname} is not made by this harness")
                files = self.secrets[sname]
                items = v["secret"].get("items")
                if items:
                    files = {i["path"]: files[i["key"]] for i in items}
                mode = v["secret"].get("defaultMode", 0o644)
            elif "emptyDir" in v:
                files, mode = None, None
            else:
                fail(f"volume {name}: kind not played here")
            shutil.rmtree(d, ignore_errors=True)
            os.makedirs(d)
            gid = self.spec.fs_group if self.spec.fs_group is not None else 0
            if files is None:
                os.chown(d, self.spec.uid, gid)
                os.chmod(d, 0o1777 if v["name"] == "tmp" else 0o775)
            else:
                for fname, content in files.items():
                    p = os.path.join(d, fname)
                    with open(p, "wb") as f:
                        f.write(content if isinstance(content, bytes) else content.encode())
                    os.chown(p, 0, gid)
                    os.chmod(p, mode)
            out[name] = d
        for t in self.spec.sts["spec"].get("volumeClaimTemplates", []):
            out[t["metadata"]["name"]] = self.pvc(ordinal)
        return out

    def netns(self, ordinal):
        ns = f"bc-{ordinal}"
        if ns in self.netns_made:
            return ns
        veth = f"vh{ordinal}"
        run("ip", "netns", "add", ns)
        run("ip", "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns)
        run("ip", "link", "set", veth, "master", "br0", "up")
        for cmd in (["ip", "addr", "add", f"{self.ip(ordinal)}/24", "dev", "eth0"],
                    ["ip", "link", "set", "eth0", "up"],
                    ["ip", "link", "set", "lo", "up"],
                    ["ip", "route", "add", "default", "via", BRIDGE_IP]):
            run("ip", "netns", "exec", ns, *cmd)
        self.netns_made.add(ns)
        return ns

    def container_cmd(self, ordinal, argv, env):
        """argv in the pod: its network namespace, its mounts, its user."""
        mounts = []
        vols = self.volume_dirs(ordinal) if argv is None else self.vols[ordinal]
        if argv is None:
            self.vols[ordinal] = vols
            argv = self.spec.argv(env)
        for m in self.spec.container.get("volumeMounts", []):
            src = vols[m["name"]]
            ro = ",ro" if m.get("readOnly") else ""
            mounts.append(f"mount --bind {src} {m['mountPath']}"
                          + (f" && mount -o remount,bind{ro} {m['mountPath']}" if ro else ""))
        mounts.append(f"mount --bind {self.bin_dir} /usr/local/bin")
        script = " && ".join(mounts) + ' && exec "$@"'
        user = ["setpriv", f"--reuid={self.spec.uid}", f"--regid={self.spec.gid}",
                "--clear-groups" if self.spec.fs_group is None else f"--groups={self.spec.fs_group}",
                "--inh-caps=-all", "--bounding-set=-all", "--no-new-privs"]
        envv = [f"{k}={v}" for k, v in env.items()]
        return ["ip", "netns", "exec", self.netns(ordinal), "sh", "-c", script, "sh",
                *user, "env", "-i", *envv, *argv]

    def start(self, ordinal):
        ns_ip = self.ip(ordinal)
        env = self.spec.env(ordinal, ns_ip)
        cmd = self.container_cmd(ordinal, None, env)
        log = open(os.path.join(self.work, f"{self.spec.pod_name(ordinal)}.log"), "ab")
        self.procs[ordinal] = subprocess.Popen(cmd, stdout=log, stderr=log, start_new_session=True)
        self.envs[ordinal] = env
        say(f"pod {self.spec.pod_name(ordinal)} started ({ns_ip}), pid {self.procs[ordinal].pid}")

    def exec_in(self, ordinal, argv):
        """Like `kubectl exec`: argv in the running pod's container."""
        cmd = self.container_cmd(ordinal, argv, self.envs[ordinal])
        return subprocess.run(cmd, capture_output=True, text=True, timeout=self.spec.grace)

    def probe(self, ordinal, kind):
        p = self.spec.container.get(kind)
        if not p:
            return True
        g = p["httpGet"]
        port = g["port"] if isinstance(g["port"], int) else self.spec.ports[g["port"]]
        url = f"http://{self.ip(ordinal)}:{port}{g['path']}"
        try:
            with urllib.request.urlopen(url, timeout=p.get("timeoutSeconds", 1)) as r:
                return 200 <= r.status < 400
        except Exception:
            return False

    def ready(self, ordinal):
        return self.alive(ordinal) and self.probe(ordinal, "readinessProbe")

    def all_started(self, ordinals):
        for o in ordinals:
            if not self.alive(o):
                fail(f"pod {self.spec.pod_name(o)} exited: {self.log_tail(o)}")
        return all(self.probe(o, "startupProbe") for o in ordinals)

    def log_tail(self, ordinal):
        with open(os.path.join(self.work, f"{self.spec.pod_name(ordinal)}.log"), "rb") as f:
            return f.read()[-3000:].decode(errors="replace")

    def alive(self, ordinal):
        p = self.procs.get(ordinal)
        return p is not None and p.poll() is None

    def kill(self, ordinal):
        p = self.procs[ordinal]
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()
        say(f"pod {self.spec.pod_name(ordinal)} killed (SIGKILL)")

    def stop(self, ordinal):
        """preStop, then SIGTERM, then SIGKILL after the grace period."""
        t = time.monotonic()
        pre = self.spec.container.get("lifecycle", {}).get("preStop", {}).get("exec")
        pre_out = None
        if pre:
            pre_out = self.exec_in(ordinal, pre["command"])
            say(f"preStop of {self.spec.pod_name(ordinal)}: exit {pre_out.returncode}: "
                f"{(pre_out.stdout + pre_out.stderr).strip()}")
            if pre_out.returncode != 0:
                fail(f"the preStop hook of {self.spec.pod_name(ordinal)} failed")
        p = self.procs[ordinal]
        left = max(1.0, self.spec.grace - (time.monotonic() - t))
        os.killpg(p.pid, signal.SIGTERM)
        try:
            p.wait(timeout=left)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
            fail(f"pod {ordinal} did not stop within its grace period")
        say(f"pod {self.spec.pod_name(ordinal)} stopped, exit {p.returncode}")
        return pre_out

    def close(self):
        for o, p in self.procs.items():
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                p.wait()


# ---------------------------------------------------------------- scenario


def make_secrets(bitclone, work, spec, nodes):
    certs = os.path.join(work, "certs")
    run(bitclone, "certs", "dev", "--out", certs, "--nodes", str(nodes),
        "--san", f"*.{spec.service}.{spec.namespace}.svc.cluster.local",
        "--san", f"{spec.name}.{spec.namespace}.svc.cluster.local")
    token = run(bitclone, "token", "issue", "--certs", certs, "--tenant", "*",
                "--scope", "read,write,admin", "--ttl", "2h", "--subject", "k8s-run").stdout.strip()

    def read(p):
        with open(os.path.join(certs, p), "rb") as f:
            return f.read()
    node_certs = {f: read(f) for f in os.listdir(certs)
                  if f == "ca.pem" or re.fullmatch(r"node-\d+\.(pem|key)", f)}
    return certs, token, {
        "bitclone-node-certs": node_certs,
        "bitclone-token-keys": {"token.pub": read("token.pub")},
        "bitclone-admin-token": {"token": token.encode()},
        # The api-tls component's Secret (staging, prod): node 1's
        # certificate carries the set's names.
        "bitclone-api-tls": {"tls.crt": read("node-1.pem"), "tls.key": read("node-1.key")},
    }


def cli(bitclone, ca, token_file, endpoint, *args, check=True):
    env = {"PATH": os.environ.get("PATH", IMAGE_PATH), "HOME": os.environ.get("HOME", "/root"),
           "BITCLONE_CA": ca, "BITCLONE_TOKEN_FILE": token_file,
           "BITCLONE_CACHE_DIR": os.path.join(os.path.dirname(token_file), "client-cache")}
    r = subprocess.run([bitclone, "--endpoint", endpoint, *args], capture_output=True,
                       text=True, env=env, timeout=120)
    if check and r.returncode != 0:
        fail(f"bitclone {' '.join(args)}: {r.stderr.strip()}")
    return r


def tree(root, seed, files, size):
    import random
    rnd = random.Random(seed)
    for i in range(files):
        p = os.path.join(root, f"d{i % 5}", f"f{i:04}")
        os.makedirs(os.path.dirname(p), exist_ok=True)
        with open(p, "wb") as f:
            f.write(rnd.randbytes(size))


def same_tree(a, b, exclude=()):
    r = subprocess.run(["diff", "-r", *(f"-x{x}" for x in exclude), a, b],
                       capture_output=True, text=True)
    return r.returncode == 0


def scenario(args):
    kubectl = os.path.join(args.tools, "venv", "bin", "kubectl")
    docs = render(kubectl, args.overlay)
    spec = PodSpec(docs)
    say(f"rendered overlay {args.overlay}: StatefulSet {spec.name} in {spec.namespace}, "
        f"{spec.replicas} replicas, user {spec.uid}")
    # Not under /tmp: the pods mount their emptyDir there, which would hide
    # the volumes' sources.
    work = tempfile.mkdtemp(prefix="bitclone-k8s-run-", dir="/var/tmp")
    # The container paths are mount points; /etc gets a private overlay so
    # nothing is written to the host's /etc.
    upper, wdir = os.path.join(work, "etc-upper"), os.path.join(work, "etc-work")
    os.makedirs(upper)
    os.makedirs(wdir)
    run("mount", "-t", "overlay", "overlay", "-o",
        f"lowerdir=/etc,upperdir={upper},workdir={wdir}", "/etc")
    # Mount points at the root are made here and removed at the end (the
    # root file system is the host's); others only under /etc.
    made = []
    for m in spec.container.get("volumeMounts", []):
        path = m["mountPath"]
        if not os.path.isdir(path):
            top = os.path.dirname(path) == "/"
            if not path.startswith("/etc/") and not top:
                fail(f"mount path {path}: only /etc/... and /NAME are made here")
            os.makedirs(path)
            if top:
                made.append(path)
    # ip netns keeps its names in /run/netns: a tmpfs of this namespace's
    # own, so none is left on the host.
    os.makedirs("/run/netns", exist_ok=True)
    run("mount", "-t", "tmpfs", "tmpfs", "/run/netns")
    run("ip", "link", "set", "lo", "up")
    run("ip", "link", "add", "br0", "type", "bridge")
    run("ip", "addr", "add", f"{BRIDGE_IP}/24", "dev", "br0")
    run("ip", "link", "set", "br0", "up")
    max_pods = 5
    with open("/etc/hosts", "a") as h:
        for o in range(max_pods):
            h.write(f"10.244.0.{10 + o} {spec.fqdn(o)} {spec.pod_name(o)}\n")
        # The client Service: any ready pod; pod 0's IP stands in.
        h.write(f"10.244.0.10 {spec.name}.{spec.namespace}.svc.cluster.local\n")

    ca_dir, _token, secrets = make_secrets(args.bitclone, work, spec, max_pods)
    token_file = os.path.join(work, "client", "admin.token")
    os.makedirs(os.path.dirname(token_file))
    with open(token_file, "w") as f:
        f.write(secrets["bitclone-admin-token"]["token"].decode())
    ca = os.path.join(ca_dir, "ca.pem")
    api_port = spec.ports["api"]

    c = Cluster(spec, work, args.bitclone, secrets)
    result = {"overlay": args.overlay, "steps": []}

    def step(name, t):
        result["steps"].append({"step": name, "seconds": round(time.monotonic() - t, 2)})
        say(f"ok: {name} ({time.monotonic() - t:.1f}s)")

    def endpoint(o):
        return f"https://{spec.fqdn(o)}:{api_port}"

    def status(o):
        r = cli(args.bitclone, ca, token_file, endpoint(o), "--json", "cluster", "status", check=False)
        return json.loads(r.stdout) if r.returncode == 0 else None

    def restores_through(o):
        out = os.path.join(work, f"restored-{o}")
        cli(args.bitclone, ca, token_file, endpoint(o), "get", "--dataset", "k8s", out)
        if not same_tree(src, out):
            fail(f"the tree restored through pod {o} differs from the source")

    def voters(o):
        s = status(o)
        return sorted(m["id"] for m in s["members"] if m.get("voter")) if s else None

    def put(tree_dir, dataset):
        r = cli(args.bitclone, ca, token_file, client_ep, "--json", "put", tree_dir,
                "--dataset", dataset)
        return json.loads(r.stdout)["snapshot"]

    def clone(dataset, snapshot, name):
        """A clone job of the snapshot to /exports/NAME, through the client
        Service; its id."""
        r = cli(args.bitclone, ca, token_file, client_ep, "clone", "--from",
                f"snapshot://{dataset}@{snapshot}", "--dataset", f"{dataset}-{name}",
                "--to", f"file:///exports/{name}")
        return r.stdout.strip()

    def job(o, job_id):
        r = cli(args.bitclone, ca, token_file, endpoint(o), "--json", "job", job_id, check=False)
        return json.loads(r.stdout) if r.returncode == 0 else {}

    def exported(name, tree_dir):
        # The sink's own commit records and manifests live in .bitclone.
        return same_tree(tree_dir, os.path.join(c.host_dir("/exports"), name), [".bitclone"])

    try:
        t = time.monotonic()
        for o in range(spec.replicas):
            c.start(o)
        wait_for("every pod to pass its startup probe", 120,
                 lambda: c.all_started(range(spec.replicas)))
        wait_for("every pod to be ready", 120, lambda: all(c.ready(o) for o in range(spec.replicas)))
        want = list(range(1, spec.replicas + 1))
        wait_for(f"voters {want}", 60, lambda: voters(0) == want)
        step(f"{spec.replicas} pods formed one cluster, every pod ready", t)

        t = time.monotonic()
        src = os.path.join(work, "src")
        tree(src, 7, 60, 20_000)
        client_ep = f"https://{spec.name}.{spec.namespace}.svc.cluster.local:{api_port}"
        cli(args.bitclone, ca, token_file, client_ep, "tenant", "create", "default")
        snapshot = put(src, "k8s")
        restores_through(2)
        step("put through the client Service, restored byte-identical through another pod", t)

        t = time.monotonic()
        j = clone("k8s", snapshot, "clone-1")
        wait_for("the clone job to succeed", 60, lambda: job(0, j).get("state") == "Succeeded")
        if not exported("clone-1", src):
            fail("the clone in /exports/clone-1 differs from the source")
        step("a clone job wrote the dataset to the shared exports volume, byte-identical", t)

        t = time.monotonic()
        # Large enough that the job still runs when its pod is stopped; if
        # it ends first anyway, the pod comes back and a new job tries again.
        big = os.path.join(work, "big")
        tree(big, 8, 2000, 50_000)
        big_snapshot = put(big, "k8s-big")
        for attempt in range(1, 4):
            name = f"drain-{attempt}"
            j = clone("k8s-big", big_snapshot, name)
            seen = {}

            def running():
                seen.update(job(0, j))
                return seen.get("state") in ("Running", "Succeeded") and (
                    seen.get("lease_holder") or seen.get("state") == "Succeeded")

            wait_for("the big clone job to run", 60, running, every=0.05)
            if seen["state"] == "Succeeded":
                say(f"attempt {attempt}: the job ended before its pod could be stopped")
                continue
            holder = int(seen["lease_holder"])
            o = holder - 1
            pre = c.stop(o)
            said = (pre.stdout + pre.stderr) if pre else ""
            handed = re.search(r"(\d+) jobs handed off", said)
            other = next(x for x in range(spec.replicas) if x != o)
            wait_for("the job to succeed on another pod", 120,
                     lambda: job(other, j).get("state") == "Succeeded")
            done = job(other, j)
            c.start(o)
            wait_for("the stopped pod to be ready again", 120, lambda: c.ready(o))
            if not handed or int(handed.group(1)) == 0:
                say(f"attempt {attempt}: the job ended before the drain handed it over ({said.strip()})")
                continue
            if done.get("attempts") != 1 or done.get("last_error"):
                fail(f"the handed-over job cost an attempt or failed one: {done}")
            if done.get("lease_holder") == holder:
                fail(f"the job finished on the drained pod: {done}")
            if not exported(name, big):
                fail(f"the clone in /exports/{name} differs from the source")
            break
        else:
            fail("in three tries no clone job was still running when its pod stopped")
        if voters(0) != want:
            fail(f"after the pod came back the voters are {voters(0)}, not {want}")
        step(f"a pod running a clone job was stopped (preStop drain, SIGTERM): the job went "
             f"on elsewhere with no attempt lost, byte-identical; the pod came back", t)

        t = time.monotonic()
        c.kill(1)
        wait_for("the killed pod to be not ready", 10, lambda: not c.ready(1))
        if not all(c.ready(o) for o in (0, 2)):
            fail("the other pods went unready when one was killed")
        c.start(1)
        wait_for("the restarted pod to be ready", 120, lambda: c.ready(1))
        if voters(1) != want:
            fail(f"after the restart the voters are {voters(1)}, not {want}")
        restores_through(1)
        step("a killed pod came back with its volume, rejoined as itself and serves reads", t)

        t = time.monotonic()
        for o in (3, 4):
            c.start(o)
        wait_for("pods 3 and 4 to be ready", 120, lambda: c.ready(3) and c.ready(4))
        wait_for("five voters", 60, lambda: voters(0) == [1, 2, 3, 4, 5])
        step("scaled 3 -> 5: the new pods joined through the seeds", t)

        t = time.monotonic()
        for o in (4, 3):
            cli(args.bitclone, ca, token_file, endpoint(0), "cluster", "remove", str(o + 1))
            c.stop(o)
        wait_for("three voters", 60, lambda: voters(0) == want)
        if not all(c.ready(o) for o in range(3)):
            fail("a remaining pod is not ready after the scale-down")
        step("scaled 5 -> 3: cluster remove, then the pods stopped (preStop, SIGTERM)", t)
        result["ok"] = True
    finally:
        c.close()
        with open(os.path.join(args.out, "k8s-run.json"), "w") as f:
            json.dump(result, f, indent=2)
        for path in made:
            try:
                os.rmdir(path)
            except OSError:
                pass
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    say(f"all steps passed; report {os.path.join(args.out, 'k8s-run.json')}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bitclone", required=True, help="the bitclone binary the image would hold")
    ap.add_argument("--overlay", default="dev")
    ap.add_argument("--tools", default=os.path.expanduser("~/.cache/bitclone/k8s-tools"))
    ap.add_argument("--out", default=".")
    ap.add_argument("--keep", action="store_true", help="keep the work dir (pod logs)")
    args = ap.parse_args()
    args.bitclone = os.path.abspath(args.bitclone)
    args.out = os.path.abspath(args.out)
    os.makedirs(args.out, exist_ok=True)
    if os.geteuid() != 0:
        say("SKIPPED: needs root (network namespaces, a bridge and mounts); nothing was checked")
        return
    # make or CI stopping the run: clean up as on any failure.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if os.environ.get(INSIDE) != "1":
        # A network and mount namespace of its own: the bridge, the pods'
        # namespaces and every mount go away with it.
        os.environ[INSIDE] = "1"
        os.execvp("unshare", ["unshare", "--net", "--mount", "--propagation", "private", "--",
                              sys.executable, os.path.abspath(__file__), *sys.argv[1:]])
    scenario(args)


if __name__ == "__main__":
    main()
