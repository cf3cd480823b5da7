#!/usr/bin/env bash
# The image, built and started for real, run as the Deployment runs it.
#
# Nothing can be pulled here, so: the runtime base is Debian bookworm made with
# debootstrap (minbase) and imported under the name the Dockerfile's FROM uses
# (when that image is not already present); the Dockerfile's build stage is
# replaced by the binaries the tests ran (`--build-context build=`: the same
# `COPY --from=build` lines, the rest of the Dockerfile unchanged). The model
# image is built from k8s/model.Dockerfile.
#
# Then one pod as k8s/base renders it (kubectl kustomize): the init container
# copies the model into an emptyDir volume, the server and trainer containers
# start with the manifest's command, args, env, Secret, ConfigMap, volumes and
# securityContext (read-only root, user 10001, no capabilities, no privilege
# escalation). Through the pod's port: /health, /ready, a chat completion with
# the demo tenant's key, the k8s/README adapter sequence (upload, promote,
# served under its name, roll back), /metrics with the metrics key. Then a stop
# with the pod's grace period: both containers must exit 0 before it ends.
#
# Needs root, podman, debootstrap, runc (Debian packages; .ci/run installs them).
# Without them: skipped here, an error under CI.
set -euo pipefail
cd "$(dirname "$0")/.."
missing=()
for c in podman debootstrap runc; do command -v "$c" >/dev/null || missing+=("$c"); done
if [ "$(id -u)" -ne 0 ] || [ ${#missing[@]} -gt 0 ]; then
  msg="image check needs root and ${missing[*]:-podman debootstrap runc}"
  if [ -n "${CI:-}" ]; then echo "$msg" >&2; exit 1; fi
  echo "image: skipped ($msg)"; exit 0
fi
VENV="${RETUNE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/retune}/venv-k8s"
[ -x "$VENV/bin/kubectl" ] || { echo "run scripts/k8s-check.sh first (it makes $VENV)" >&2; exit 1; }
MODEL="${RETUNE_MODEL:-$(./scripts/fetch-model.sh)}"
T=$(mktemp -d)
ID="retune-ci-$$"
cleanup() {
  podman pod rm -f -t 0 "$ID" >/dev/null 2>&1 || true
  podman volume rm -f "$ID-data" "$ID-models" >/dev/null 2>&1 || true
  rm -rf "$T"
}
trap cleanup EXIT

BASE=$(sed -n 's/^FROM \([^ ]*\)$/\1/p' Dockerfile | tail -1)   # the runtime stage's base
case "$BASE" in */*) ;; *) BASE="docker.io/library/$BASE" ;; esac
if ! podman image exists "$BASE"; then
  echo "image: $BASE is not here; making it with debootstrap"
  debootstrap --variant=minbase bookworm "$T/rootfs" "${RETUNE_DEBIAN_MIRROR:-http://deb.debian.org/debian}" >"$T/debootstrap.log" 2>&1 \
    || { tail -20 "$T/debootstrap.log" >&2; exit 1; }
  tar -C "$T/rootfs" -c . | podman import --change 'LABEL org.retune.base=debootstrap-minbase-bookworm' - "$BASE" >/dev/null
  rm -rf "$T/rootfs"
fi

# the tests' binaries in place of the build stage
mkdir -p "$T/build/src/target/release" "$T/model"
for b in retune retune-trainer; do
  [ -x "target/release/$b" ] || { echo "target/release/$b missing: build first" >&2; exit 1; }
  cp "target/release/$b" "$T/build/src/target/release/"
  strip "$T/build/src/target/release/$b"
done
podman build -q --isolation chroot --pull=never --build-context build="$T/build" -t localhost/retune:ci . >/dev/null
cp "$MODEL" "$T/model/$(grep -o 'SmolLM2[^ "]*gguf' k8s/model.Dockerfile | head -1)"
podman build -q --isolation chroot --pull=never -f k8s/model.Dockerfile -t localhost/retune-model:ci "$T/model" >/dev/null
echo "image: built localhost/retune:ci and localhost/retune-model:ci"

# A sandbox without CAP_SYS_RESOURCE refuses the OCI runtime's setrlimit even to
# the current values, and crun refuses hybrid cgroups: then runc, with the
# rlimits left as they are (the kubelet's runtime sets them on a real node).
RUNTIME=()
if ! podman run --rm "$BASE" true >"$T/probe.log" 2>&1; then
  if grep -qiE 'rlimit|hybrid' "$T/probe.log"; then
    cat > "$T/runc-keep-rlimits" <<'EOF'
#!/bin/sh
prev=""; b=""
for a in "$@"; do
  if [ "$prev" = "--bundle" ] || [ "$prev" = "-b" ]; then b="$a"; fi
  prev="$a"
done
if [ -n "$b" ] && [ -f "$b/config.json" ]; then
  python3 -c 'import json,sys; p=sys.argv[1]; d=json.load(open(p)); d.get("process",{}).pop("rlimits",None); json.dump(d,open(p,"w"))' "$b/config.json"
fi
exec runc "$@"
EOF
    chmod +x "$T/runc-keep-rlimits"
    RUNTIME=(--runtime "$T/runc-keep-rlimits")
    podman "${RUNTIME[@]}" run --rm "$BASE" true >"$T/probe2.log" 2>&1 || { cat "$T/probe.log" "$T/probe2.log" >&2; exit 1; }
    echo "image: the default OCI runtime refused ($(grep -m1 -i error "$T/probe.log" | cut -c1-140)); running under runc with the rlimits as they are"
  else
    cat "$T/probe.log" >&2; exit 1
  fi
fi

"$VENV/bin/kubectl" kustomize k8s/base > "$T/base.yaml"
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
"$VENV/bin/python" - "$T" "$ID" "$PORT" "${RUNTIME[@]}" <<'PY'
import base64, hashlib, json, pathlib, re, subprocess, sys, time, urllib.request, urllib.error
T, ID, PORT, RUNTIME = pathlib.Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), sys.argv[4:]
import yaml
docs = [d for d in yaml.safe_load_all((T / "base.yaml").read_text()) if d]
dep = next(d for d in docs if d["kind"] == "Deployment")
spec = dep["spec"]["template"]["spec"]
cm = next(d for d in docs if d["kind"] == "ConfigMap")
secret = next(d for d in docs if d["kind"] == "Secret")
images = {"retune": "localhost/retune:ci", "retune-model": "localhost/retune-model:ci"}

def podman(*args, check=True, **kw):
    r = subprocess.run(["podman", *RUNTIME, *args], capture_output=True, text=True, **kw)
    if check and r.returncode != 0:
        sys.exit(f"podman {' '.join(args[:3])}...: {r.stderr.strip()}")
    return r

# the ConfigMap and the Secret as the kubelet projects them
(T / "settings").mkdir()
for k, v in cm["data"].items():
    (T / "settings" / k).write_text(v)
env_file = T / "secret.env"
env_file.write_text("".join(f"{k}={base64.b64decode(v).decode()}\n" for k, v in secret["data"].items()))
volumes = {}
for v in spec["volumes"]:
    if "persistentVolumeClaim" in v:
        volumes[v["name"]] = ("volume", f"{ID}-data")
    elif "configMap" in v:
        volumes[v["name"]] = ("bind", str(T / "settings"))
    elif v["name"] == "models":
        volumes[v["name"]] = ("volume", f"{ID}-models")
    elif "emptyDir" in v:
        volumes[v["name"]] = ("tmpfs", None)
for kind, name in volumes.values():
    if kind == "volume":
        podman("volume", "create", name)
psc = spec.get("securityContext", {})
user = f'{psc.get("runAsUser", 10001)}:{psc.get("runAsGroup", 10001)}'
podman("pod", "create", "--name", ID, "-p", f"127.0.0.1:{PORT}:8080")

def run_args(c, detach):
    a = ["run", "--pod", ID, "--name", f"{ID}-{c['name']}", "--user", user]
    if detach:
        a.append("-d")
    else:
        a.append("--rm")
    sc = c.get("securityContext", {})
    if sc.get("readOnlyRootFilesystem"):
        a.append("--read-only")
    if "ALL" in sc.get("capabilities", {}).get("drop", []):
        a.append("--cap-drop=all")
    if sc.get("allowPrivilegeEscalation") is False:
        a.append("--security-opt=no-new-privileges")
    for m in c.get("volumeMounts", []):
        kind, src = volumes[m["name"]]
        ro = m.get("readOnly", False)
        if kind == "tmpfs":
            a += ["--tmpfs", m["mountPath"]]
        elif kind == "volume":
            # :U chowns the volume to the user, as fsGroup does for the pod
            a += ["-v", f"{src}:{m['mountPath']}:{'ro,' if ro else ''}U"]
        else:
            a += ["-v", f"{src}:{m['mountPath']}:ro"]
    for e in c.get("envFrom", []):
        assert e["secretRef"]["name"] == secret["metadata"]["name"], e
        a += ["--env-file", str(env_file)]
    for e in c.get("env", []):
        if "value" in e:
            a += ["-e", f"{e['name']}={e['value']}"]
        elif e.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") == "metadata.name":
            a += ["-e", f"{e['name']}={ID}"]
        else:
            sys.exit(f"env {e} is not projected by this check")
    if c.get("command"):
        a += ["--entrypoint", json.dumps(c["command"])]
    a.append(images[c["image"].split(":")[0]])
    a += c.get("args", [])
    return a

for c in spec.get("initContainers", []):
    r = podman(*run_args(c, detach=False), check=False)
    if r.returncode != 0:
        sys.exit(f"init container {c['name']} failed: {r.stderr}")
print(f"image: init containers {[c['name'] for c in spec.get('initContainers', [])]} done")
for c in spec["containers"]:
    podman(*run_args(c, detach=True))

def logs():
    return "\n".join(f"--- {c['name']}\n" + podman("logs", f"{ID}-{c['name']}", check=False).stderr[-3000:] for c in spec["containers"])

def call(path, key=None, body=None, ctype="application/json", expect=200):
    req = urllib.request.Request(f"http://127.0.0.1:{PORT}{path}", data=body, method="POST" if body is not None else "GET")
    if key:
        req.add_header("Authorization", f"Bearer {key}")
    if body is not None:
        req.add_header("Content-Type", ctype)
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            status, headers, data = r.status, r.headers, r.read()
    except urllib.error.HTTPError as e:
        status, headers, data = e.code, e.headers, e.read()
    if status != expect:
        sys.exit(f"{path}: {status} (expected {expect}): {data[:500]!r}\n{logs()}")
    return headers, data

deadline = time.time() + 60
while True:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{PORT}/ready", timeout=2) as r:
            if r.status == 200:
                break
    except Exception:
        pass
    if time.time() > deadline:
        sys.exit(f"the server container never became ready\n{logs()}")
    time.sleep(0.3)
call("/health")
settings = cm["data"]["retune.toml"]
assert hashlib.sha256(b"demo-key").hexdigest() in settings, "the demo tenant's key is not demo-key"
chat = lambda model: json.dumps({"model": model, "messages": [{"role": "user", "content": "Say hi"}], "max_tokens": 8, "temperature": 0}).encode()
_, data = call("/v1/chat/completions", "demo-key", chat("smollm2-135m-instruct"))
reply = json.loads(data)["choices"][0]["message"]["content"]
assert reply.strip(), data
print(f"image: a chat completion through the pod's port: {reply!r}")
# the k8s/README sequence with the example operator key (keys.env: its hash)
admin = "example-admin-key"
assert hashlib.sha256(admin.encode()).hexdigest() in env_file.read_text()
fx = pathlib.Path("tests/fixtures/lora/adapter")
def upload(config):
    boundary = "retuneimagecheck"
    parts = b""
    for field, f, body in [("adapter_config", "adapter_config.json", config),
                           ("adapter_model", "adapter_model.safetensors", (fx / "adapter_model.safetensors").read_bytes())]:
        parts += (f'--{boundary}\r\nContent-Disposition: form-data; name="{field}"; filename="{f}"\r\n'
                  "Content-Type: application/octet-stream\r\n\r\n").encode() + body + b"\r\n"
    parts += f"--{boundary}--\r\n".encode()
    _, data = call("/admin/adapters/demo/tickets/upload", admin, parts, f"multipart/form-data; boundary={boundary}", expect=201)
    return json.loads(data)["id"]
def served():
    h, _ = call("/v1/chat/completions", "demo-key", chat("tickets"))
    return h.get("x-retune-adapter-version")
cfg = json.loads((fx / "adapter_config.json").read_text())
v1 = upload(json.dumps(cfg).encode())
cfg["lora_alpha"] = cfg["lora_alpha"] * 2  # a second version: other content, other id
v2 = upload(json.dumps(cfg).encode())
assert v1 != v2
call("/admin/adapters/demo/tickets/promote", admin, json.dumps({"version": v1, "expected": "none"}).encode())
assert served() == v1
# compare-and-set: a stale expectation is refused
call("/admin/adapters/demo/tickets/promote", admin, json.dumps({"version": v2, "expected": "none"}).encode(), expect=409)
call("/admin/adapters/demo/tickets/promote", admin, json.dumps({"version": v2, "expected": v1}).encode())
assert served() == v2
call("/admin/adapters/demo/tickets/rollback", admin, json.dumps({"reason": "image check"}).encode())
assert served() == v1
_, data = call("/admin/adapters/demo/tickets", admin)
assert "rollback" in data.decode(), data[:500]
print(f"image: versions {v1[:8]}, {v2[:8]} uploaded; promoted, served as `tickets`, a stale promote refused (409), rolled back to {v1[:8]}")
metrics_key = base64.b64decode(secret["data"]["metrics-key"]).decode()
_, data = call("/metrics", metrics_key)
assert b"retune_requests_total" in data, data[:300]
# both containers still up, then a stop within the pod's grace period
for c in spec["containers"]:
    st = podman("inspect", f"{ID}-{c['name']}", "--format", "{{.State.Status}}").stdout.strip()
    if st != "running":
        sys.exit(f"container {c['name']} is {st}\n{logs()}")
grace = spec["terminationGracePeriodSeconds"]
t0 = time.time()
podman("pod", "stop", "-t", str(grace), ID)
took = time.time() - t0
for c in spec["containers"]:
    code = podman("inspect", f"{ID}-{c['name']}", "--format", "{{.State.ExitCode}}").stdout.strip()
    if code != "0":
        sys.exit(f"container {c['name']} exited {code} on SIGTERM (stop took {took:.1f}s of {grace}s)\n{logs()}")
if took >= grace - 1:
    sys.exit(f"the stop took {took:.1f}s: the pod's grace period ({grace}s) ran out\n{logs()}")
print(f"image: SIGTERM stopped both containers with exit 0 in {took:.1f}s (grace {grace}s)")
PY
