#!/usr/bin/env bash
# Smoke test of the container images on a machine without a registry and without a GPU:
#   sudo docker/smoke.sh            (as root, from anywhere; needs podman, buildah, debootstrap, pip)
# It builds a local Debian base image with the project's torch/torchvision (the CUDA base of the Dockerfile
# cannot be pulled here), builds both targets of docker/Dockerfile on it (only BASE is overridden), and runs the
# scenario the images exist for, as the images' own non-root user with their volumes:
#   extract (uid 10001) a read-only image folder into a shard volume -> publish it read-only as root ->
#   verify + pretrain on it (uid 10001) into /runs -> the quickstart inside the train image,
# plus an extract image with local detector weights baked in (--build-arg WEIGHTS=<file from the context>).
# Prints PASS/FAIL per step with timings; exits 1 if any step failed. Idempotent: the base image is built once
# and reused (SMOKE_REBUILD_BASE=1 to rebuild it: needed when pyproject.toml gains a dependency, since the base's
# /wheels is what the Dockerfile's offline `pip install .` finds); every run starts from fresh volumes.
# Not part of CI: the base image takes 6 GB (torch with its CUDA libraries) and the first run needs about 25 GB free
# while it is made, and 15 minutes; later runs about 12 minutes on a busy 2-core machine.
#
# Settings (environment):
#   SMOKE_WORK          scratch folder (default /var/tmp/regionbert-smoke; volumes, logs, the base's rootfs while built)
#   SMOKE_BASE          the local base image (default localhost/regionbert-smoke-base:bookworm)
#   SMOKE_MIRROR        Debian mirror for debootstrap (default: the first one in /etc/apt/sources.list*)
#   SMOKE_PIP           pip that downloads the wheels for the base (default: pip3); its config decides the index
#   SMOKE_QUICKSTART_ARGS  arguments for regionbert-quickstart (default: --images 32 --steps 40, a few minutes on
#                       a busy 2-core machine; set it empty for the full quickstart)
#   SMOKE_KEEP=1        keep the working containers (buildah containers) for a look afterwards; the volumes and
#                       logs under SMOKE_WORK stay until the next run anyway
# `podman run` needs cgroups and rlimits that sandboxes often refuse; the commands run with
# `buildah from IMAGE` + `buildah run --isolation chroot --user 10001:10001 -v HOST:/vol ...` instead, which is
# the same image, user and mounts (the ENTRYPOINT is spelled out, since buildah run does not apply it).
set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
WORK=${SMOKE_WORK:-/var/tmp/regionbert-smoke}
BASE=${SMOKE_BASE:-localhost/regionbert-smoke-base:bookworm}
PIP=${SMOKE_PIP:-pip3}
EXTRACT_IMAGE=localhost/regionbert-smoke-extract:latest
TRAIN_IMAGE=localhost/regionbert-smoke-train:latest
BAKED_IMAGE=localhost/regionbert-smoke-extract-baked:latest
LABEL=regionbert-smoke=1
APP_UID=10001           # the Dockerfile's USER
DETECTOR=mobilenet_v3_large_320_fpn   # small and fast on a CPU
WEIGHTS_FILE=docker/weights/smoke-${DETECTOR}.pth   # in the build context; ignored by git

declare -a STEP_NAMES=() STEP_RESULTS=() STEP_TIMES=() CONTAINERS=()
LOGS=$WORK/logs

log() { printf '[smoke %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "$*"; exit 2; }

# step NAME CMD...: run CMD with its output in $LOGS/NAME.log (the tail shown on failure) and record the outcome.
step() {
    local name=$1 rc result t0 t1
    shift
    log "$name ..."
    t0=$(date +%s.%N)
    "$@" >"$LOGS/$name.log" 2>&1
    rc=$?
    t1=$(date +%s.%N)
    if ((rc == 0)); then result=PASS; else result="FAIL (exit $rc)"; fi
    if ((rc != 0)); then tail -n 25 "$LOGS/$name.log" | sed "s/^/  $name| /" >&2; fi
    STEP_NAMES+=("$name") STEP_RESULTS+=("$result")
    STEP_TIMES+=("$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.1f", b - a }')")
    log "$name: $result"
    return "$rc"
}

# ---------------------------------------------------------------------------------------------------------------
# The base image: Debian minbase + python3 + a venv with torch and torchvision, like the official PyTorch image
# (which has them in /opt/conda). /wheels holds the project's other dependencies, and pip is told to install only
# from there, so the Dockerfile's own `pip install .` runs offline.

debian_mirror() {
    if [[ -n ${SMOKE_MIRROR:-} ]]; then echo "$SMOKE_MIRROR"; return; fi
    # deb822 (URIs: ...) or one-line (deb URL suite ...) sources; comments skipped; not the security archive
    grep -hsE '^[[:space:]]*(URIs:|deb[[:space:]])' /etc/apt/sources.list /etc/apt/sources.list.d/* \
        | sed -E 's/^[[:space:]]*URIs:[[:space:]]*//; s/^[[:space:]]*deb[[:space:]]+(\[[^]]*\][[:space:]]+)?//' \
        | awk '{print $1}' | grep -v security | head -n 1
}

# packages too big to keep in the image's /wheels: installed into the venv from the host folder instead
BIG_WHEELS='^(torch|torchvision|triton|nvidia_|nvidia-|cuda_|cuda-)'

# a command inside the rootfs, with none of this host's environment (its pip settings name host paths)
in_rootfs() { env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8 chroot "$WORK/rootfs" "$@"; }

build_base() {
    local rootfs=$WORK/rootfs wheels=$WORK/wheels mirror
    mirror=$(debian_mirror)
    [[ -n $mirror ]] || { echo "no Debian mirror in /etc/apt/sources.list*; set SMOKE_MIRROR"; return 1; }
    # the wheels are downloaded for this pip's Python, which must be the image's (3.11 on bookworm)
    [[ $("$PIP" --version) == *"python 3.11"* ]] || { echo "$PIP is not a Python 3.11 pip"; return 1; }
    rm -rf "$rootfs" "$wheels"
    mkdir -p "$wheels" || return 1
    echo "debootstrap from $mirror"
    debootstrap --variant=minbase --include=python3,python3-venv,python3-pip bookworm "$rootfs" "$mirror" || return 1
    "$PIP" download -d "$wheels" "$ROOT" setuptools wheel || return 1
    rm -f "$wheels"/regionbert-*  # the project itself comes from the build context
    mkdir -p "$rootfs/wheels" "$rootfs/tmp/big"
    local w
    for w in "$wheels"/*; do
        if [[ $(basename "$w") =~ $BIG_WHEELS ]]; then ln "$w" "$rootfs/tmp/big/" || cp "$w" "$rootfs/tmp/big/"
        else cp "$w" "$rootfs/wheels/"; fi
    done
    in_rootfs /usr/bin/python3 -m venv /opt/venv || return 1
    in_rootfs /opt/venv/bin/pip install --no-index --no-cache-dir --find-links /tmp/big --find-links /wheels \
        torch torchvision || return 1
    rm -rf "$rootfs/tmp/big" "$rootfs/var/cache/apt/archives/"*.deb "$rootfs/var/lib/apt/lists/"*
    in_rootfs /opt/venv/bin/python -c "import torch, torchvision; print('torch', torch.__version__, \
'torchvision', torchvision.__version__)" || return 1
    tar -C "$rootfs" -c . | podman import \
        --change 'ENV PATH=/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'ENV PIP_NO_INDEX=1' --change 'ENV PIP_FIND_LINKS=/wheels' \
        --change 'CMD ["python3"]' - "$BASE" || return 1
    rm -rf "$rootfs" "$wheels"  # the image holds what is needed; the rootfs and wheels take gigabytes
}

# ---------------------------------------------------------------------------------------------------------------
# Running the images: a fresh working container per command, like `docker run --rm`.

# run_in IMAGE USER [VOLUME_OPTIONS...] -- CMD...
run_in() {
    local image=$1 user=$2 c
    shift 2
    local opts=()
    while (($#)) && [[ $1 != -- ]]; do opts+=("$1"); shift; done
    shift
    c=$(buildah from --pull=never --quiet "$image") || return 1
    CONTAINERS+=("$c")
    # buildah (1.28, Debian bookworm) ignores a lone -v onto one of the image's VOLUMEs and mounts an empty copy
    # there instead; without the VOLUME entries the -v mounts apply and the rest are the image's own folders
    local v unset=()
    # shellcheck disable=SC2016  # a Go template, not shell
    for v in $(buildah inspect --format '{{range $k, $_ := .OCIv1.Config.Volumes}}{{$k}} {{end}}' "$c"); do
        unset+=(--volume "$v-")
    done
    ((${#unset[@]} == 0)) || buildah config "${unset[@]}" "$c" || return 1
    buildah run --isolation chroot --user "$user" "${opts[@]}" "$c" -- "$@"
}

build_target() {  # build_target TARGET TAG [BUILD OPTIONS...]
    local target=$1 tag=$2
    shift 2
    podman build --isolation=chroot --pull=never --layers --label "$LABEL" -f "$ROOT/docker/Dockerfile" \
        --target "$target" --build-arg BASE="$BASE" "$@" -t "$tag" "$ROOT" || return 1
    podman image prune -f --filter "label=$LABEL" >/dev/null  # this script's superseded builds only
    local user
    user=$(podman image inspect --format '{{.Config.User}}' "$tag")
    echo "image $tag runs as $user"
    [[ $user == "$APP_UID:$APP_UID" ]]
}

owner_of() { stat -c %u "$1"; }

# ---------------------------------------------------------------------------------------------------------------
# The steps

base_step() {
    if [[ ${SMOKE_REBUILD_BASE:-0} != 1 ]] && podman image exists "$BASE"; then
        echo "reusing $BASE"
    else
        build_base || return 1
    fi
    podman run --help >/dev/null  # podman itself works (its `run` may not, here)
    run_in "$BASE" 0:0 -- python -c "import torch, torchvision; print('torch', torch.__version__, \
'torchvision', torchvision.__version__)"
}

sample_data_step() {  # drawn inside the train image, as root: images, captions and vocabulary, then read-only
    mkdir -p "$V/data"
    run_in "$TRAIN_IMAGE" 0:0 -v "$V/data:/out" -- python -c "from regionbert.quickstart.sample_data import \
write_sample_data; print(write_sample_data('/out', num_images=24))" || return 1
    chown -R 0:0 "$V/data" && chmod -R a-w,a+rX "$V/data"
    echo "$(find "$V/data/images" -name '*.jpg' | wc -l) images"
}

extract_step() {  # as the image's user, images read-only, into a volume the user owns (k8s: fsGroup)
    install -d -o "$APP_UID" -g "$APP_UID" "$V/shards"
    run_in "$EXTRACT_IMAGE" "$APP_UID:$APP_UID" -v "$V/data/images:/images:ro" -v "$V/shards:/shards" -- \
        regionbert-extract /images --out /shards --weights none --detector "$DETECTOR" --workers 1 \
        --batch-size 4 || return 1
    local shard=$V/shards/shard-00000-of-00001
    ls -ln "$V/shards"
    [[ -d $shard && $(owner_of "$shard") == "$APP_UID" ]] || { echo "no shard owned by $APP_UID at $shard"; return 1; }
}

publish_step() {  # another owner publishes the shard: a checked copy and an index, then root-owned, read-only
    mkdir -p "$V/published"
    run_in "$TRAIN_IMAGE" 0:0 -v "$V/shards:/scratch:ro" -v "$V/published:/published" -- sh -c \
        'regionbert-shards copy /scratch/shard-00000-of-00001 /published/shard-00000-of-00001 &&
         regionbert-shards index /published/shard-00000-of-00001 -o /published/index.json' || return 1
    chown -R 0:0 "$V/published" || return 1
    find "$V/published" -type d -exec chmod 0555 {} + && find "$V/published" -type f -exec chmod 0444 {} +
    ls -lnR "$V/published"
}

verify_step() {  # the train image's user reads the published shards through a read-only mount
    run_in "$TRAIN_IMAGE" "$APP_UID:$APP_UID" -v "$V/published:/shards:ro" -- \
        regionbert-shards verify /shards/index.json
}

train_step() {  # a few steps of configs/tiny.toml on the published shards, with captions, into /runs
    install -d -o "$APP_UID" -g "$APP_UID" "$V/runs"
    run_in "$TRAIN_IMAGE" "$APP_UID:$APP_UID" -v "$V/published:/shards:ro" -v "$V/data:/data:ro" \
        -v "$V/runs:/runs" -- \
        regionbert-pretrain /opt/regionbert/configs/tiny.toml --set data.shards=/shards/index.json \
        --set data.captions=/data/captions.csv --set data.tokenizer=/data/vocab.txt --set optim.steps=12 \
        --set optim.warmup_steps=2 --set run.log_every=4 --set data.num_workers=0 --out /runs/tiny || return 1
    local f
    for f in config.json log.jsonl checkpoint.pt; do
        [[ -s $V/runs/tiny/$f && $(owner_of "$V/runs/tiny/$f") == "$APP_UID" ]] || { echo "no $f"; return 1; }
    done
    tail -n 2 "$V/runs/tiny/log.jsonl"
}

quickstart_step() {  # the whole quickstart inside the train image, as its user, writing to /runs
    install -d -o "$APP_UID" -g "$APP_UID" "$V/runs"
    # shellcheck disable=SC2086  # SMOKE_QUICKSTART_ARGS is a list of words
    run_in "$TRAIN_IMAGE" "$APP_UID:$APP_UID" -v "$V/runs:/runs" -- \
        regionbert-quickstart --out /runs/quickstart ${SMOKE_QUICKSTART_ARGS---images 32 --steps 40} || return 1
    [[ -s $V/runs/quickstart/summary.json ]] || { echo "no summary.json"; return 1; }
    cat "$V/runs/quickstart/summary.json"
}

make_weights_step() {  # a detector checkpoint to bake in: seeded random weights (no download), saved as a state dict
    mkdir -p "$V/weights"
    run_in "$TRAIN_IMAGE" 0:0 -v "$V/weights:/out" -- python -c "
import torch
from regionbert.extract.detector import DetectorSpec
from regionbert.extract.families import build_detector
model, _, info = build_detector(DetectorSpec('$DETECTOR', 'none', seed=7))
torch.save(model.state_dict(), '/out/w.pth')
open('/out/digest', 'w').write(info['weights_digest'])
print(info['weights_digest'])" || return 1
    install -m 0644 "$V/weights/w.pth" "$ROOT/$WEIGHTS_FILE"
}

baked_step() {  # the extract image with that file baked in uses it by default, with no --detector/--weights
    local in_image=/opt/regionbert/weights/${WEIGHTS_FILE##*/}
    build_target extract "$BAKED_IMAGE" --build-arg DETECTOR="$DETECTOR" --build-arg WEIGHTS="$in_image"
    local rc=$?
    rm -f "$ROOT/$WEIGHTS_FILE"  # or every later extract image would carry it too
    ((rc == 0)) || return 1
    podman image inspect --format '{{range .Config.Env}}{{println .}}{{end}}' "$BAKED_IMAGE" | grep REGIONBERT_
    install -d -o "$APP_UID" -g "$APP_UID" "$V/shards-baked"
    mkdir -p "$V/few" && find "$V/data/images" -name '*.jpg' | sort | head -n 4 | xargs cp -t "$V/few" || return 1
    run_in "$BAKED_IMAGE" "$APP_UID:$APP_UID" -v "$V/few:/images:ro" -v "$V/shards-baked:/shards" -- \
        regionbert-extract /images --out /shards --workers 1 --batch-size 4 || return 1
    run_in "$BAKED_IMAGE" "$APP_UID:$APP_UID" -v "$V/shards-baked:/shards:ro" -- \
        regionbert-shards inspect --json /shards >"$V/baked-inspect.json" || return 1
    local digest
    digest=$(cat "$V/weights/digest")
    grep -E '"(weights|weights_digest)"' "$V/baked-inspect.json"
    grep -qF "\"$in_image\"" "$V/baked-inspect.json" || { echo "the shard does not name $in_image"; return 1; }
    grep -qF "\"$digest\"" "$V/baked-inspect.json" || { echo "the shard's weights are not $digest"; return 1; }
    echo "the shard was extracted with the baked weights $in_image ($digest)"
}


report() {
    local i
    printf '\nregionbert container smoke test (%s, base %s)\n' "$(date -u +%FT%TZ)" "$BASE"
    for i in "${!STEP_NAMES[@]}"; do
        printf '  %-14s %-28s %8ss\n' "${STEP_NAMES[$i]}" "${STEP_RESULTS[$i]}" "${STEP_TIMES[$i]}"
    done
    printf 'logs: %s\n' "$LOGS"
}

cleanup() {
    if [[ ${SMOKE_KEEP:-0} != 1 && ${#CONTAINERS[@]} -gt 0 ]]; then buildah rm "${CONTAINERS[@]}" >/dev/null 2>&1; fi
}

main() {
    ((EUID == 0)) || die "run as root (podman build, buildah run --user, chown of the volumes)"
    local tool
    for tool in podman buildah debootstrap "$PIP"; do
        command -v "$tool" >/dev/null || die "$tool not found (apt-get install -y podman buildah debootstrap)"
    done
    V=$WORK/vol
    rm -rf "$V" "$LOGS"
    mkdir -p "$V" "$LOGS" || die "cannot make $WORK"
    trap cleanup EXIT
    local ok=1
    step base base_step || ok=0
    if ((ok)); then
        step build-extract build_target extract "$EXTRACT_IMAGE" || ok=0
        step build-train build_target train "$TRAIN_IMAGE" || ok=0
    fi
    if ((ok)); then
        step sample-data sample_data_step &&
            step extract extract_step &&
            step publish publish_step
        step verify verify_step
        step train train_step
        step quickstart quickstart_step
        step make-weights make_weights_step && step baked-weights baked_step
    fi
    report
    local r
    for r in "${STEP_RESULTS[@]}"; do [[ $r == PASS ]] || return 1; done
    ((ok))
}

if [[ ${BASH_SOURCE[0]} == "$0" ]]; then main "$@"; fi
