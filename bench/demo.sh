#!/usr/bin/env bash
# The main job on the built-in example (run by `make demo`): prune + fine-tune the wide digits MLP
# (scikit-learn's bundled handwritten digits, no download), convert it to a verified sparse artifact,
# inspect it, compare its speed dense vs sparse, then serve it and answer one request over HTTP.
set -euo pipefail
out=${1:-out}
mkdir -p "$out"
se=.venv/bin/sparse-engine
py=.venv/bin/python

echo "== 1/5 prune + fine-tune: wide digits MLP (64-2048-1024-10), 90 % magnitude pruning in 8x8 blocks"
# The 10-row classifier head does not tile by 8 and is tiny: it stays dense (--skip 4).
$se prune --example mlp-digits-wide --method magnitude --granularity block:8x8 --sparsity 0.9 \
    --skip 4 --dense-epochs 20 --epochs 10 --quiet -o "$out/pruned.pt"
$py -c 'import json, sys
r = json.load(open(sys.argv[1]))
dense, final = r["dense"]["test_accuracy"], r["final"]["test_accuracy"]
print("test accuracy: dense %.3f, pruned %.3f at sparsity %.3f" % (dense, final, r["final"]["sparsity"]))' \
    "$out/pruned.report.json"

echo "== 2/5 convert (verified against the checkpoint before it reports success)"
$se convert "$out/pruned.pt" -o "$out/digits.spz"

echo "== 3/5 inspect"
$se inspect "$out/digits.spz"

echo "== 4/5 speed: the pruned model, dense torch vs engine (2 threads)"
$se bench --model "$out/digits.spz" --batch 1,32 --threads 2

echo "== 5/5 serve on a free loopback port and answer one Open Inference Protocol request"
log="$out/serve.log"
$se serve "$out/digits.spz" --name digits --port 0 >"$log" 2>&1 &
server=$!
trap 'kill -TERM $server 2>/dev/null || true' EXIT
url=""
for _ in $(seq 1 120); do
    url=$(grep -o 'http://127.0.0.1:[0-9]*' "$log" | head -n 1 || true)
    [ -n "$url" ] && curl -sf "$url/v2/health/ready" >/dev/null && break
    kill -0 $server 2>/dev/null || { cat "$log"; exit 1; }
    sleep 0.5
done
[ -n "$url" ] || { echo "server did not come up" >&2; cat "$log"; exit 1; }
request=$($py -c '
import json
from sklearn.datasets import load_digits
d = load_digits()
x = (d.data[:3] / 16.0).tolist()
print(json.dumps({"inputs": [{"name": "input", "shape": [3, 64], "datatype": "FP32",
                              "data": [v for row in x for v in row]}]}))')
echo "POST $url/v2/models/digits/infer  (the first 3 digits of the data set: labels 0, 1, 2)"
curl -sf "$url/v2/models/digits/infer" -H 'Content-Type: application/json' -d "$request" \
    | $py -c 'import json, sys
r = json.load(sys.stdin)["outputs"][0]
logits = [r["data"][i * 10:(i + 1) * 10] for i in range(r["shape"][0])]
print("predicted classes:", [max(range(10), key=row.__getitem__) for row in logits])'
kill -TERM $server
wait $server && echo "server drained and stopped (exit 0)"
trap - EXIT
