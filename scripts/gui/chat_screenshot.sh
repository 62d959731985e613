#!/usr/bin/env bash
# The README's Chat page screenshot, taken as a person would see it: train the demo on the CPU
# (60 steps, about a minute), open the studio under Xvfb with the demo model and the run's
# adapter, go to Chat, tick "Side by side with the base model", type a question from the demo's
# dataset, press Enter, wait for both answers and grab the screen.
#
#   scripts/gui/chat_screenshot.sh [OUT.png] [SECONDS]   (defaults: assets/screenshot-chat.png, 15)
#
# TUNESTUDIO_BIN names a built binary to use instead of `cargo build --release`'s.
# Needs what scripts/gui/screenshot.sh needs (Xvfb, xdotool, imagemagick, mesa).
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
cd "$root"
out="${1:-assets/screenshot-chat.png}"
wait_s="${2:-15}"
display=":${SCREENSHOT_DISPLAY:-98}"
width=1280
height=820

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

# A real fine-tune of the demo, so the two columns show what training changed.
"$bin" train assets/demo/run.toml --device cpu --output "$work/runs" >"$work/train.log" 2>&1
run_dir="$(ls -d "$work"/runs/*/ | head -1)"
adapter="${run_dir%/}/adapter"
[ -f "$adapter/adapter_model.safetensors" ] || { echo "the demo run wrote no adapter: see $work/train.log" >&2; exit 1; }
# The demo's config with absolute paths and the run's adapter on the Model page.
sed -e "s|^path = \"model\"|path = \"$root/assets/demo/model\"\nadapter = \"$adapter\"|" \
    -e "s|^path = \"data/train.jsonl\"|path = \"$root/assets/demo/data/train.jsonl\"|" \
    -e "s|^dir = .*|dir = \"$work/runs\"|" assets/demo/run.toml >"$work/chat.toml"

Xvfb "$display" -screen 0 "${width}x${height}x24" -nolisten tcp >"$work/xvfb.log" 2>&1 &
xvfb_pid=$!
export DISPLAY="$display"
for _ in $(seq 50); do xdotool getdisplaygeometry >/dev/null 2>&1 && break; sleep 0.1; done

mkdir -m 700 "$work/xdg-run"
XDG_RUNTIME_DIR="$work/xdg-run" XDG_CONFIG_HOME="$work/config" "$bin" studio "$work/chat.toml" >"$work/studio.log" 2>&1 &
app_pid=$!
win="$(timeout 60 xdotool search --sync --name '^TuneStudio')"
xdotool windowmove "$win" 0 0
sleep 4
xdotool windowfocus "$win"
# Positions in the 1280x820 window: "Chat" in the navigation (StudioApp's page list), then the
# side-by-side checkbox under the page's model row, then the message field at the bottom.
xdotool mousemove --window "$win" 30 190 click 1
sleep 1
xdotool mousemove --window "$win" 190 ${CHAT_CHECKBOX_Y:-122} click 1
sleep 0.5
# Open "System message and sampling" so the settings show.
xdotool mousemove --window "$win" 200 ${CHAT_SETTINGS_Y:-145} click 1
sleep 0.5
xdotool mousemove --window "$win" 600 ${CHAT_INPUT_Y:-745} click 1
sleep 0.5
xdotool type --delay 20 "Where can you find the frostling?"
xdotool key Return
xdotool mousemove --window "$win" 1000 400
sleep "$wait_s"

# 75%: the answers stay legible. Grabbed and resized by `import` alone (ImageMagick's `convert` may be shadowed by another tool).
import -window root -resize 75% -strip -define png:compression-level=9 "$out"
echo "screenshot: $out ($(du -h "$out" | cut -f1))"
grep -i -E "error|panic" "$work/studio.log" >&2 || true
