#!/usr/bin/env bash
# A first session in the studio, as a person would have it, in a real window under Xvfb, with a
# screenshot of every step to look at: the demo's model and data, rows held out to evaluate on,
# the preflight check, a run paused and resumed, a 600-step run stopped by Shift+F5, the Runs
# page (a past run opened with its samples, two compared with their config diff), the adapter and GGUF exported,
# and the Chat page answering with the fine-tune and its base side by side. Then every page
# again at 900 px wide.
#
#   scripts/gui/journey.sh [OUT_DIR]      (default: a new folder under /tmp, printed at the end)
#
# TUNESTUDIO_BIN names a built binary to use instead of `cargo build --release`'s.
# README=1 also writes the README's screenshots (assets/screenshot*.png) from the journey's.
# Clicks are at the places the studio draws its widgets in a 1600x1000 window at scale 1; a
# change of layout moves them: look at the screenshots, which is what this script is for.
# Needs what scripts/gui/screenshot.sh needs (Xvfb, xdotool, ImageMagick, mesa).
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
cd "$root"
out="${1:-$(mktemp -d /tmp/tunestudio-journey.XXXXXX)}"
mkdir -p "$out"
display=":${SCREENSHOT_DISPLAY:-96}"
# ImageMagick 7 is `magick`; 6 is `convert`, which some machines shadow with another program.
if command -v magick >/dev/null; then im=(magick); else im=(/usr/bin/convert); fi

bin="${TUNESTUDIO_BIN:-}"
if [ -z "$bin" ]; then
  cargo build --release --bin tunestudio
  bin="$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')/release/tunestudio"
fi

work="$(mktemp -d)"
cleanup() {
  [ -n "${app_pid:-}" ] && kill "$app_pid" 2>/dev/null || true
  [ -n "${xvfb_pid:-}" ] && kill "$xvfb_pid" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

# The demo's config with absolute paths, its runs and exports in this script's own folder.
sed -e "s|^path = \"model\"|path = \"$root/assets/demo/model\"|" \
    -e "s|^path = \"data/train.jsonl\"|path = \"$root/assets/demo/data/train.jsonl\"|" \
    -e "s|^dir = .*|dir = \"$work/runs\"|" assets/demo/run.toml >"$work/run.toml"
# Samples during training on, as a user watching the answers change would have them: the
# Training page and a past run opened from Runs show them with their steps.
printf '\n[samples]\nevery = 10\ncount = 2\nmax_new_tokens = 32\n' >>"$work/run.toml"

Xvfb "$display" -screen 0 1600x1000x24 -nolisten tcp >"$work/xvfb.log" 2>&1 &
xvfb_pid=$!
export DISPLAY="$display"
for _ in $(seq 50); do xdotool getdisplaygeometry >/dev/null 2>&1 && break; sleep 0.1; done

mkdir -m 700 "$work/xdg-run"
XDG_RUNTIME_DIR="$work/xdg-run" XDG_CONFIG_HOME="$work/config" XDG_DATA_HOME="$work/data" \
  "$bin" studio "$work/run.toml" >"$work/studio.log" 2>&1 &
app_pid=$!
win="$(timeout 60 xdotool search --sync --name '^TuneStudio' | head -1)"
xdotool windowmove "$win" 0 0
xdotool windowsize "$win" 1600 1000
sleep 5 # the model and the dataset preview load on workers

width=1600
shot() { # NAME: the window as it is, the pointer parked where it draws no tooltip
  xdotool mousemove $((width - 10)) 990
  sleep 0.7
  import -window root "$work/full.png"
  "${im[@]}" "$work/full.png" -crop "${width}x1000+0+0" +repage "$out/$1.png"
}
click() { xdotool mousemove "$1" "$2" click 1; sleep "${3:-1}"; }
page() { # the navigation on the left, top to bottom
  case "$1" in
    model) click 40 75 ;; dataset) click 40 98 ;; hyper) click 40 121 ;; training) click 40 144 ;;
    runs) click 40 167 ;; chat) click 40 190 ;; export) click 40 213 ;;
  esac
  sleep 1
}
key() { xdotool windowfocus "$win"; xdotool key "$@"; }

shot 01-model
page dataset
click 369 281 0.5 # Evaluation rows ▾
click 380 331 3   # hold out a fraction (0.1): the preview reads the data again
shot 02-dataset-held-out
page hyper
shot 03-hyperparameters
key F5
sleep 0.2
shot 04-preflight-checking
sleep 4
shot 05-preflight
key Return
sleep 4
shot 06-training
key F6
sleep 2
shot 07-paused
key F6
sleep 5
shot 08-done

# A longer run to stop by key: 600 steps, about 15 epochs over the demo's rows (the preflight
# warns), stopped after a few seconds.
page hyper
click 457 607 0.5 # Step limit's steps
xdotool key ctrl+a
xdotool type 600
xdotool key Return
sleep 1 # the edit is the config's from the next frame on
key F5
sleep 4
shot 09-preflight-many-epochs
key Return
sleep 4
key shift+F5
sleep 0.2
shot 10-stopping
sleep 3
shot 11-stopped

page runs
shot 12-runs
click 479 151 2 # Open (the first run)
shot 13-past-run
page runs
click 188 125 0.5 # tick both runs
click 188 151 0.5
click 507 75 2 # Compare 2 selected
shot 14-compare

click 615 151 # Export… (the first run)
click 230 195 3 # Export adapter
shot 15-export-adapter
click 595 195 10 # Export GGUF (q8_0)
shot 16-export-gguf

page chat
click 187 122 0.5 # Side by side with the base model
click 806 898 0.3 # the message field
xdotool type "What is the capital of Veloria?"
xdotool key Return
sleep 10
shot 17-chat

# Every page again in a window 900 px wide.
width=900
xdotool windowsize "$win" 900 1000
sleep 1
for p in model dataset hyper training runs chat export; do
  page "$p"
  shot "narrow-$p"
done

if [ "${README:-0}" = 1 ]; then
  small() { "${im[@]}" "$out/$1.png" -resize 50% -strip -define png:compression-level=9 "assets/$2.png"; }
  small 08-done screenshot
  small 09-preflight-many-epochs screenshot-preflight
  small 14-compare screenshot-runs
  # The chat's turns sit at the top of an empty page: the top, at a size the answers read at.
  "${im[@]}" "$out/17-chat.png" -crop 1600x260+0+0 +repage -resize 60% -strip -define png:compression-level=9 assets/screenshot-chat.png
  echo "README screenshots: assets/screenshot.png, screenshot-preflight.png, screenshot-runs.png, screenshot-chat.png"
fi
grep -i -E "error|panic" "$work/studio.log" | grep -v XDG_RUNTIME_DIR >&2 || true
echo "screenshots: $out"
