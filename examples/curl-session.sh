#!/usr/bin/env bash
# A first session with the HTTP API, against `atlas-serve serve` on the demo world (the README's
# main command). Needs curl and the atlas-serve binary (for `demo export`); ATLAS=... to use
# another binary, URL=... for another address, PRESET=ci for the small world.
set -euo pipefail
URL=${URL:-http://127.0.0.1:8080}
ATLAS=${ATLAS:-atlas-serve}
PRESET=${PRESET:-full}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# Ready once the backbone and task vectors are loaded (503 before).
curl -sf "$URL/readyz"; echo
# The library: one task vector per demo task, fine-tuned on this machine.
curl -s "$URL/task-vectors"; echo

# Images of the demo world's "position" task, as ImageFolder directories of PNGs.
"$ATLAS" demo export --preset "$PRESET" --task position --split train --out "$work/train" >/dev/null
"$ATLAS" demo export --preset "$PRESET" --task position --split test --out "$work/test" >/dev/null
classes=("top left" "top right" "bottom left" "bottom right")
head='{"classes": ["top left", "top right", "bottom left", "bottom right"],
       "templates": ["a photo of an object in the {}.", "an image of a shape in the {}."]}'

# A head (class names × prompt templates), then zero-shot classification with the pre-trained
# model: a JSON part named "request" and the images as file parts.
hid=$(curl -s "$URL/heads" -H 'content-type: application/json' -d "$head" | sed -E 's/.*"id":"([^"]+)".*/\1/')
img=$(find "$work/test/top left" -name '*.png' | head -1)
curl -s "$URL/classify" -F "request={\"head\": \"$hid\", \"top_k\": 2};type=application/json" -F "image=@$img"; echo

# Task arithmetic: one scalar per task vector; servable at once (201).
curl -s "$URL/compositions" -H 'content-type: application/json' \
    -d '{"name": "position+count", "task_vectors": ["position", "count"], "coefficients": [0.5, 0.3]}'; echo

# aTLAS few-shot: learn per-block coefficients of every task vector from 16 labelled images
# per class (crops and flips off: they would change a position's label). 202: a queued job.
examples="" files=()
for i in "${!classes[@]}"; do
    for f in $(cd "$work/train/${classes[$i]}" && ls | head -16); do
        examples+="{\"file\": \"$i-$f\", \"label\": $i},"
        files+=(-F "files=@$work/train/${classes[$i]}/$f;filename=$i-$f")
    done
done
job="{\"objective\": \"few_shot\", \"config\": {\"augment\": false},
      \"tasks\": [${head%\}}, \"examples\": [${examples%,}]}]}"
id=$(curl -s "$URL/compositions" -H 'Idempotency-Key: readme-position-16' \
    -F "request=$job;type=application/json" "${files[@]}" | sed -E 's/.*"id":"([^"]+)".*/\1/')
echo "job $id"

# Progress as Server-Sent Events until the job ends (curl returns when the stream closes).
curl -sN "$URL/compositions/$id/events" | grep '^data:' | tail -3

# The learned composition serves at once; Λ as a heat map (task vectors × blocks).
curl -s "$URL/classify" -F "request={\"composition\": \"$id\", \"head\": \"$hid\", \"top_k\": 2};type=application/json" -F "image=@$img"; echo
curl -s "$URL/compositions/$id/coefficients.svg" -o "$work/lambda.svg" && echo "heat map: $(wc -c <"$work/lambda.svg") bytes of SVG"
curl -s "$URL/metrics" | grep -E '^atlas_(jobs|cache_hits_total|batch_size_count)'
