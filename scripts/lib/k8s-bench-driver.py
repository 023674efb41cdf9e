#!/usr/bin/env python3
"""k8s-bench-driver.py: the measuring half of scripts/bench-k8s.sh. Runs INSIDE the node's
namespaces (scripts/k8s-node.sh exec), talks to the kube-apiserver over HTTPS with the node's
admin client certificate (one keep-alive connection for requests, one for a watch stream), so
the client adds no process start-up to the pod timings (kubectl would add ~100 ms per call).
Standard library only.

  k8s-bench-driver.py podstart --pki DIR --ns NS --rounds N --metrics URL
        --plain-src FILE --plain-dst FILE --image IMG --sidecar-image IMG --out JSON
      Pod start with meshcni in the chain vs without, interleaved. "Without" = FILE --plain-dst
      (a conflist sorting before the agent's, with the reference chain only: bridge + portmap)
      is present, so containerd (max_conf_num = 1) loads it instead of the agent-managed one;
      "with" = it is absent, containerd loads the agent-managed conflist (… portmap, meshcni).
      After every switch the script waits until `crictl info` shows the expected chain loaded.
      Round r creates, one pod at a time (each waited for Ready before the next):
        arm A: a plain pod, then an injected pod; switch; arm B: plain, injected
      with A = with, B = without on even rounds and the other way round on odd rounds.
      Per pod: create (POST sent) -> phase Running and -> Ready (watch events, monotonic
      clock), and the agent's `meshcni_cni_request_duration_seconds{command="ADD"}` count/sum
      delta across the pod (exactly 1 ADD for a "with" pod — its in-process ADD time — and 0
      for a "without" pod, which proves the switch; anything else is an error).
  k8s-bench-driver.py execfloor --plugin PATH --n N --out JSON
      Wall time of exec'ing the plugin with CNI_COMMAND=VERSION (process exec, dynamic loading,
      start-up, exit): the part of an ADD the plugin's own timer does not see.
  k8s-bench-driver.py watchload --pki DIR --ns NS --pods N --image IMG --pid PID
        --seconds S --interval I --out JSON
      Samples /proc/PID (VmRSS, VmHWM, threads, utime+stime) every I seconds while N pods are
      created in NS (all POSTed, then waited for Ready) and then for S seconds more.
"""
import argparse
import datetime
import http.client
import json
import os
import re
import ssl
import subprocess
import sys
import threading
import time

API_HOST = "10.243.0.1"
API_PORT = 6443


def log(msg):
    print(f"driver: {msg}", file=sys.stderr, flush=True)


class Api:
    def __init__(self, pki):
        self.ctx = ssl.create_default_context(cafile=os.path.join(pki, "ca.crt"))
        self.ctx.load_cert_chain(os.path.join(pki, "admin.crt"), os.path.join(pki, "admin.key"))
        self.conn = None

    def connect(self, timeout=30):
        return http.client.HTTPSConnection(API_HOST, API_PORT, context=self.ctx, timeout=timeout)

    def request(self, method, path, body=None):
        for attempt in (1, 2):
            if self.conn is None:
                self.conn = self.connect()
            try:
                data = json.dumps(body).encode() if body is not None else None
                headers = {"Content-Type": "application/json"} if data else {}
                self.conn.request(method, path, body=data, headers=headers)
                resp = self.conn.getresponse()
                raw = resp.read()
                return resp.status, (json.loads(raw) if raw else None)
            except (http.client.HTTPException, OSError):
                self.conn.close()
                self.conn = None
                if attempt == 2:
                    raise
        raise RuntimeError("unreachable")

    def must(self, method, path, body=None, ok=(200, 201)):
        status, obj = self.request(method, path, body)
        if status not in ok:
            raise RuntimeError(f"{method} {path}: HTTP {status}: {json.dumps(obj)[:400]}")
        return obj


class PodWatch:
    """One watch stream on the pods of a namespace; first-seen monotonic times per pod."""

    def __init__(self, api, ns, resource_version):
        self.times = {}  # name -> {"running": t, "ready": t}
        self.cond = threading.Condition()
        self.error = None
        conn = api.connect(timeout=None)
        conn.request("GET", f"/api/v1/namespaces/{ns}/pods?watch=1&resourceVersion={resource_version}")
        self.resp = conn.getresponse()
        if self.resp.status != 200:
            raise RuntimeError(f"watch pods in {ns}: HTTP {self.resp.status}")
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self):
        try:
            while True:
                line = self.resp.readline()
                now = time.monotonic()
                if not line:
                    raise RuntimeError("watch stream ended")
                ev = json.loads(line)
                if ev.get("type") == "ERROR":
                    raise RuntimeError(f"watch ERROR event: {line[:300]!r}")
                pod = ev.get("object", {})
                name = pod.get("metadata", {}).get("name")
                st = pod.get("status", {})
                with self.cond:
                    t = self.times.setdefault(name, {})
                    if st.get("phase") == "Running" and "running" not in t:
                        t["running"] = now
                    for c in st.get("conditions") or []:
                        if c.get("type") == "Ready" and c.get("status") == "True" and "ready" not in t:
                            t["ready"] = now
                    self.cond.notify_all()
        except Exception as e:  # reported to the waiting thread
            with self.cond:
                self.error = f"pod watch failed: {e}"
                self.cond.notify_all()

    def wait_ready(self, names, timeout):
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                if self.error:
                    raise RuntimeError(self.error)
                missing = [n for n in names if "ready" not in self.times.get(n, {})]
                if not missing:
                    return
                left = deadline - time.monotonic()
                if left <= 0:
                    raise RuntimeError(f"{len(missing)} pod(s) not Ready within {timeout}s, e.g. {missing[:5]}")
                self.cond.wait(left)


def ensure_namespace(api, ns):
    status, _ = api.request("GET", f"/api/v1/namespaces/{ns}")
    if status == 404:
        api.must("POST", "/api/v1/namespaces", {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}})
    rv = api.must("GET", f"/api/v1/namespaces/{ns}/pods")["metadata"]["resourceVersion"]
    # The namespace's default service account is not needed (no token is mounted).
    return rv


def plain_pod(name, ns, image, labels):
    return {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": ns, "labels": labels},
        "spec": {
            "terminationGracePeriodSeconds": 0,
            "automountServiceAccountToken": False,
            "enableServiceLinks": False,
            "containers": [{"name": "app", "image": image, "imagePullPolicy": "Never"}],
        },
    }


SIDECAR_STATUS = json.dumps({
    "initContainers": None, "containers": ["istio-proxy"], "volumes": ["istio-envoy"],
    "imagePullSecrets": None, "revision": "default"})


def injected_pod(name, ns, image, sidecar_image, labels):
    """A pod as Istio's sidecar injector writes it in CNI mode (no istio-init): the meshcni ADD
    programs the in-pod redirection for it. istio-proxy only sleeps (no Envoy here)."""
    p = plain_pod(name, ns, image, dict(labels, **{"security.istio.io/tlsMode": "istio"}))
    p["metadata"]["annotations"] = {"sidecar.istio.io/status": SIDECAR_STATUS}
    p["spec"]["containers"].append({
        "name": "istio-proxy", "image": sidecar_image, "imagePullPolicy": "Never",
        "command": ["/bin/sh", "-c", "exec sleep 3600", "pilot-agent"],
        "args": ["proxy", "sidecar", "--domain", f"{ns}.svc.cluster.local"],
        "securityContext": {"runAsUser": 1337, "runAsGroup": 1337},
    })
    return p


RFC3339_RE = re.compile(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.(\d+))?(Z|[+-]\d\d:\d\d)$")


def rfc3339_ns(text):
    """Seconds since the epoch (float) of an RFC 3339 time with up to nanosecond fraction."""
    m = RFC3339_RE.match(text)
    if not m:
        raise RuntimeError(f"unexpected CRI time {text!r}")
    tz = "+00:00" if m.group(3) == "Z" else m.group(3)
    base = datetime.datetime.fromisoformat(m.group(1) + tz).timestamp()
    return base + (int(m.group(2)) / 10 ** len(m.group(2)) if m.group(2) else 0.0)


def crictl_json(*args):
    out = subprocess.run(["crictl", args[0], "-o", "json", *args[1:]], capture_output=True, text=True, timeout=60)
    if out.returncode != 0:
        raise RuntimeError(f"crictl {' '.join(args)} failed: {out.stderr.strip()}")
    return json.loads(out.stdout)


def cri_times(ns, name):
    """The runtime's own timestamps (ns resolution, wall clock) for a pod: sandbox created,
    first container created, last container started."""
    items = crictl_json("pods", "--label", f"io.kubernetes.pod.name={name}",
                        "--label", f"io.kubernetes.pod.namespace={ns}")["items"]
    if len(items) != 1:
        raise RuntimeError(f"{ns}/{name}: {len(items)} sandboxes in the runtime, expected 1")
    sb = items[0]
    cs = crictl_json("ps", "-a", "--pod", sb["id"])["containers"]
    if not cs:
        raise RuntimeError(f"{ns}/{name}: no containers in sandbox {sb['id']}")
    st = crictl_json("inspect", *[c["id"] for c in cs])
    st = st if isinstance(st, list) else [st]
    return {
        "sandbox_created": int(sb["createdAt"]) / 1e9,
        "first_container_created": min(int(c["createdAt"]) for c in cs) / 1e9,
        "containers_started": max(rfc3339_ns(x["status"]["startedAt"]) for x in st),
        "sandbox_id": sb["id"],
    }


# ------------------------------------------------------------------------------------------
# The CNI config containerd has loaded, from `crictl info`.
def loaded_chain():
    out = subprocess.run(["crictl", "info"], capture_output=True, text=True, timeout=30)
    if out.returncode != 0:
        raise RuntimeError(f"crictl info failed: {out.stderr.strip()}")
    info = json.loads(out.stdout)
    cni = info.get("cniconfig") or info.get("info", {}).get("cniconfig")
    if cni is None:
        raise RuntimeError("crictl info has no cniconfig")
    nets = cni.get("Networks") or []
    if not nets:
        return []
    conf = nets[-1].get("Config", {})
    return [p.get("Network", {}).get("type") for p in conf.get("Plugins") or []]


def write_atomic(path, data):
    tmp = os.path.join(os.path.dirname(path), "." + os.path.basename(path) + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.rename(tmp, path)


def switch(arm, plain_src, plain_dst):
    t0 = time.monotonic()
    if arm == "without":
        with open(plain_src, "rb") as f:
            write_atomic(plain_dst, f.read())
    else:
        try:
            os.unlink(plain_dst)
        except FileNotFoundError:
            pass
    want_mesh = arm == "with"
    deadline = t0 + 60
    while True:
        chain = loaded_chain()
        if ("meshcni" in chain) == want_mesh and chain:
            return time.monotonic() - t0, chain
        if time.monotonic() > deadline:
            raise RuntimeError(f"containerd did not load the '{arm}' chain within 60 s (loaded: {chain})")
        time.sleep(0.05)


METRIC_RE = re.compile(r'^meshcni_cni_request_duration_seconds_(sum|count)\{command="ADD"\}\s+(\S+)$')


def add_metrics(url):
    """(count, sum) of the agent's ADD histogram (plugin-reported in-process times)."""
    u = url.removeprefix("http://")
    hostport, _, path = u.partition("/")
    host, _, port = hostport.partition(":")
    conn = http.client.HTTPConnection(host, int(port or 80), timeout=10)
    conn.request("GET", "/" + path)
    body = conn.getresponse().read().decode()
    conn.close()
    vals = {"count": 0.0, "sum": 0.0}
    for line in body.splitlines():
        m = METRIC_RE.match(line)
        if m:
            vals[m.group(1)] = float(m.group(2))
    return int(vals["count"]), vals["sum"]


def cmd_podstart(a):
    api = Api(a.pki)
    rv = ensure_namespace(api, a.ns)
    watch = PodWatch(api, a.ns, rv)
    pods = []
    switches = []
    cur = None
    for r in range(a.rounds):
        order = ["with", "without"] if r % 2 == 0 else ["without", "with"]
        for arm in order:
            if arm != cur:
                dt, chain = switch(arm, a.plain_src, a.plain_dst)
                switches.append({"to": arm, "seconds": dt, "chain": chain})
                cur = arm
            for kind in ("plain", "injected"):
                name = f"{kind}-{arm}-{r:03d}"
                labels = {"bench": "podstart", "arm": arm, "kind": kind}
                body = (plain_pod(name, a.ns, a.image, labels) if kind == "plain"
                        else injected_pod(name, a.ns, a.image, a.sidecar_image, labels))
                c0, s0 = add_metrics(a.metrics)
                w0 = time.time()
                t0 = time.monotonic()
                api.must("POST", f"/api/v1/namespaces/{a.ns}/pods", body)
                watch.wait_ready([name], 180)
                want = 1 if arm == "with" else 0
                for _ in range(50):
                    c1, s1 = add_metrics(a.metrics)
                    if c1 - c0 >= want:
                        break
                    time.sleep(0.1)
                if c1 - c0 != want:
                    raise RuntimeError(f"{name}: the agent saw {c1 - c0} meshcni ADD(s) for a '{arm}' pod, expected {want}")
                t = watch.times[name]
                cri = cri_times(a.ns, name)
                pods.append({
                    "name": name, "arm": arm, "kind": kind, "round": r,
                    "running": t.get("running", t["ready"]) - t0, "ready": t["ready"] - t0,
                    "started": cri["containers_started"] - w0,
                    "sandbox_to_container": cri["first_container_created"] - cri["sandbox_created"],
                    "add_inproc": (s1 - s0) if want else None,
                })
                log(f"{name}: containers started in {1000 * pods[-1]['started']:.0f} ms, "
                    f"Ready in {1000 * (t['ready'] - t0):.0f} ms"
                    + (f", meshcni ADD {1000 * (s1 - s0):.1f} ms" if want else ""))
    # Leave the chain with meshcni (the agent-managed conflist) for what follows.
    if cur != "with":
        switch("with", a.plain_src, a.plain_dst)
    with open(a.out, "w") as f:
        json.dump({"pods": pods, "switches": switches}, f)


def cmd_execfloor(a):
    times = []
    for _ in range(a.n):
        t0 = time.monotonic()
        p = subprocess.run([a.plugin], input=b"", capture_output=True, env={"CNI_COMMAND": "VERSION"})
        times.append(time.monotonic() - t0)
        if p.returncode != 0 or b"cniVersion" not in p.stdout:
            raise RuntimeError(f"{a.plugin} VERSION failed: rc={p.returncode} {p.stdout[:200]!r} {p.stderr[:200]!r}")
    with open(a.out, "w") as f:
        json.dump({"version_exec": times}, f)


def proc_sample(pid, tck):
    with open(f"/proc/{pid}/status") as f:
        st = dict(line.split(":", 1) for line in f if ":" in line)
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    # fields[0] is field 3 (state): utime = field 14, stime = field 15
    cpu = (int(fields[11]) + int(fields[12])) / tck
    kib = lambda k: int(st[k].split()[0])  # noqa: E731
    return {"t": time.monotonic(), "rss_kib": kib("VmRSS"), "hwm_kib": kib("VmHWM"),
            "threads": int(st["Threads"]), "cpu_s": cpu}


def cmd_watchload(a):
    api = Api(a.pki)
    tck = os.sysconf("SC_CLK_TCK")
    samples = []
    stop = threading.Event()
    phase = {"name": "before"}

    gone = {}

    def sampler():
        while not stop.is_set():
            try:
                s = proc_sample(a.pid, tck)
            except (FileNotFoundError, ProcessLookupError) as e:
                gone["error"] = f"{e} (phase {phase['name']}, {len(samples)} samples taken)"
                return
            s["phase"] = phase["name"]
            samples.append(s)
            stop.wait(a.interval)

    rv = ensure_namespace(api, a.ns)
    watch = PodWatch(api, a.ns, rv)
    th = threading.Thread(target=sampler, daemon=True)
    th.start()
    time.sleep(a.interval)
    phase["name"] = "create"
    t0 = time.monotonic()
    names = []
    for i in range(a.pods):
        name = f"w-{i:03d}"
        api.must("POST", f"/api/v1/namespaces/{a.ns}/pods", plain_pod(name, a.ns, a.image, {"bench": "watch"}))
        names.append(name)
    watch.wait_ready(names, 1800)
    created = time.monotonic() - t0
    if not th.is_alive():
        raise RuntimeError(f"sampling /proc/{a.pid} stopped while the pods were created: {gone.get('error')}")
    log(f"{a.pods} pods Ready {created:.1f} s after the first POST; sampling for {a.seconds} s")
    phase["name"] = "steady"
    t1 = time.monotonic()
    while time.monotonic() - t1 < a.seconds:
        time.sleep(1)
        if not th.is_alive():
            raise RuntimeError(f"sampling /proc/{a.pid} stopped: the agent process is gone: {gone.get('error')}")
    stop.set()
    th.join()
    with open(a.out, "w") as f:
        json.dump({"samples": samples, "create_seconds": created, "pods": a.pods}, f)


# ------------------------------------------------------------------------------------------
def pct(xs, q):
    """Nearest-rank percentile (q in 0..100) of a non-empty list."""
    ys = sorted(xs)
    k = max(1, -(-len(ys) * q // 100))
    return ys[int(k) - 1]


def median(xs):
    ys = sorted(xs)
    n = len(ys)
    return ys[n // 2] if n % 2 else (ys[n // 2 - 1] + ys[n // 2]) / 2


def boot_ci(xs, stat=None, n=2000, seed=1):
    """95 % bootstrap interval of stat (default: the median) over xs (fixed seed)."""
    import random
    stat = stat or median
    rng = random.Random(seed)
    vals = sorted(stat([rng.choice(xs) for _ in xs]) for _ in range(n))
    return vals[int(0.025 * n)], vals[int(0.975 * n) - 1]


def ms(x):
    return f"{1000 * x:.1f}"


def cmd_report(a):
    # Several runs pool: pods (rounds kept apart per run), switches and exec floors.
    ps = {"pods": [], "switches": []}
    for i, path in enumerate(a.podstart):
        with open(path) as f:
            one = json.load(f)
        for p in one["pods"]:
            p["round"] += 100000 * i
        ps["pods"] += one["pods"]
        ps["switches"] += one["switches"]
    floor = []
    for path in a.execfloor:
        with open(path) as f:
            floor += json.load(f)["version_exec"]
    pods = ps["pods"]
    out = []
    w = out.append
    floor_med = median(floor)
    w(f"### Pod start with meshcni in the chain vs without ({a.context})")
    w("")
    w("Times in ms, median / p90 / max. *create -> started*: the API POST to the last container of")
    w("the pod started (the runtime's own `startedAt`, ns resolution); *sandbox -> 1st container*: the")
    w("sandbox's creation to its first container's creation (RunPodSandbox, where the CNI ADD runs,")
    w("plus the kubelet's hand-over); *create -> Ready*: the Ready condition seen on a watch (the")
    w("kubelet reports it after its next PLEG relist, every 1 s, so this one is coarse).")
    w("")
    w("| pods | meshcni | n | create -> started | sandbox -> 1st container | create -> Ready |")
    w("| --- | --- | ---: | ---: | ---: | ---: |")

    def mpm(xs):
        return f"{ms(median(xs))} / {ms(pct(xs, 90))} / {ms(max(xs))}"

    checks = []
    for kind in ("plain", "injected", "all"):
        sel = [p for p in pods if kind == "all" or p["kind"] == kind]
        meds = {}
        for arm in ("with", "without"):
            arm_pods = [p for p in sel if p["arm"] == arm]
            st = [p["started"] for p in arm_pods]
            sc = [p["sandbox_to_container"] for p in arm_pods]
            rd = [p["ready"] for p in arm_pods]
            meds[arm] = (median(st), median(sc))
            w(f"| {kind} | {arm} | {len(arm_pods)} | {mpm(st)} | {mpm(sc)} | {mpm(rd)} |")
        adds = [p["add_inproc"] for p in sel if p["arm"] == "with"]
        # Paired by round: the with and the without pod of the same kind in the same round.
        by = {(p["kind"], p["round"], p["arm"]): p for p in sel}
        keys = [(k, r) for (k, r, arm) in by if arm == "with" and (k, r, "without") in by]
        pst = [by[(k, r, "with")]["started"] - by[(k, r, "without")]["started"] for k, r in keys]
        psc = [by[(k, r, "with")]["sandbox_to_container"] - by[(k, r, "without")]["sandbox_to_container"]
               for k, r in keys]
        checks.append((kind, meds["with"][0] - meds["without"][0], pst,
                       meds["with"][1] - meds["without"][1], psc, adds))
    w("")
    w("### The plugin's own ADD share (the `with` pods) against the with - without difference")
    w("")
    w("ADD share = the plugin's in-process ADD time (median, per pod from the agent's histogram)")
    w("+ the exec floor (median wall time of exec'ing the plugin for VERSION). Differences in ms:")
    w("difference of the medians; median of the per-round paired differences with its 95 %")
    w("bootstrap interval. Verdict: *within* when the whole interval is at or below the ADD share,")
    w("*above* when the whole interval is above it, otherwise *not resolved* (the run's noise is")
    w("larger than the ADD share: the interval contains both 0 and the share).")
    w("")
    w("| pods | meshcni ADD in-process, median / p90 / max | ADD share | create -> started: medians diff; paired [95 % CI] "
      "| verdict | sandbox -> 1st container: medians diff; paired [95 % CI] | verdict |")
    w("| --- | ---: | ---: | ---: | --- | ---: | --- |")

    def verdict(lo, hi, share):
        return "within" if hi <= share else ("**above**" if lo > share else "not resolved")

    for kind, dst, pst, dsc, psc, adds in checks:
        share = median(adds) + floor_med
        lo1, hi1 = boot_ci(pst)
        lo2, hi2 = boot_ci(psc)
        w(f"| {kind} | {mpm(adds)} | {ms(share)} | {ms(dst)}; {ms(median(pst))} [{ms(lo1)}, {ms(hi1)}] "
          f"| {verdict(lo1, hi1, share)} | {ms(dsc)}; {ms(median(psc))} [{ms(lo2)}, {ms(hi2)}] "
          f"| {verdict(lo2, hi2, share)} |")
    sw = ps["switches"]
    w("")
    w(f"Chain switches: {len(sw)}, containerd had the new chain loaded after median "
      f"{ms(median([s['seconds'] for s in sw]))} ms (max {ms(max(s['seconds'] for s in sw))} ms); "
      f"exec floor = `meshcni` with CNI_COMMAND=VERSION, {len(floor)} runs, median {ms(floor_med)} ms, "
      f"p90 {ms(pct(floor, 90))} ms.")
    w("")
    if not a.watchload:
        sys.stdout.write("\n".join(out) + "\n")
        return
    with open(a.watchload) as f:
        wl = json.load(f)
    smp = wl["samples"]
    steady = [s for s in smp if s["phase"] == "steady"]
    create = [s for s in smp if s["phase"] in ("before", "create")]
    mib = lambda k: k / 1024  # noqa: E731
    dur = steady[-1]["t"] - steady[0]["t"]
    cpu = steady[-1]["cpu_s"] - steady[0]["cpu_s"]
    rss = [s["rss_kib"] for s in steady]
    w(f"### Agent (`meshcni-agent`, ambient on) with {wl['pods']} pods on the node, watched")
    w("")
    w("| window | samples | RSS min / median / max MiB | peak RSS (VmHWM) MiB | threads | CPU s | CPU % of one core |")
    w("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    if len(create) >= 2:
        ccpu = create[-1]["cpu_s"] - create[0]["cpu_s"]
        cdur = create[-1]["t"] - create[0]["t"]
        crss = [s["rss_kib"] for s in create]
        w(f"| creating the {wl['pods']} pods ({wl['create_seconds']:.0f} s to all Ready) | {len(create)} "
          f"| {mib(min(crss)):.1f} / {mib(median(crss)):.1f} / {mib(max(crss)):.1f} | {mib(create[-1]['hwm_kib']):.1f} "
          f"| {create[-1]['threads']} | {ccpu:.2f} | {100 * ccpu / cdur:.2f} |")
    w(f"| steady, {dur:.0f} s with all {wl['pods']} pods Ready | {len(steady)} "
      f"| {mib(min(rss)):.1f} / {mib(median(rss)):.1f} / {mib(max(rss)):.1f} | {mib(steady[-1]['hwm_kib']):.1f} "
      f"| {steady[-1]['threads']} | {cpu:.2f} | {100 * cpu / dur:.3f} |")
    text = "\n".join(out) + "\n"
    sys.stdout.write(text)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("podstart")
    p.add_argument("--pki", required=True)
    p.add_argument("--ns", required=True)
    p.add_argument("--rounds", type=int, required=True)
    p.add_argument("--metrics", required=True)
    p.add_argument("--plain-src", required=True)
    p.add_argument("--plain-dst", required=True)
    p.add_argument("--image", required=True)
    p.add_argument("--sidecar-image", required=True)
    p.add_argument("--out", required=True)
    p = sub.add_parser("execfloor")
    p.add_argument("--plugin", required=True)
    p.add_argument("--n", type=int, default=30)
    p.add_argument("--out", required=True)
    p = sub.add_parser("watchload")
    p.add_argument("--pki", required=True)
    p.add_argument("--ns", required=True)
    p.add_argument("--pods", type=int, required=True)
    p.add_argument("--image", required=True)
    p.add_argument("--pid", type=int, required=True)
    p.add_argument("--seconds", type=int, required=True)
    p.add_argument("--interval", type=float, default=5)
    p.add_argument("--out", required=True)
    p = sub.add_parser("report")
    p.add_argument("--podstart", required=True, nargs="+")
    p.add_argument("--execfloor", required=True, nargs="+")
    p.add_argument("--watchload")
    p.add_argument("--context", default="")
    a = ap.parse_args()
    try:
        {"podstart": cmd_podstart, "execfloor": cmd_execfloor, "watchload": cmd_watchload,
         "report": cmd_report}[a.cmd](a)
    except Exception as e:
        print(f"k8s-bench-driver.py {a.cmd}: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
