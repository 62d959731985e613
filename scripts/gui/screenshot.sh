#!/usr/bin/env bash
# Take the README screenshot the way a person would see the studio: build, start `cargo run
# --release` under Xvfb (the demo opens already selected), click Start with xdotool, confirm the
# preflight dialog with Enter, wait, and grab the screen.
#
#   scripts/gui/screenshot.sh [OUT.png] [SECONDS]      (defaults: assets/screenshot.png, 20)
#
# Needs: apt-get install -y xvfb mesa-vulkan-drivers libgl1-mesa-dri libegl1 libxkbcommon-x11-0 \
#        imagemagick xdotool
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
cd "$root"
out="${1:-assets/screenshot.png}"
wait_s="${2:-20}"
display=":${SCREENSHOT_DISPLAY:-97}"
width=1280
height=820

cargo build --release --bin tunestudio
# ImageMagick 7 is `magick`; 6 is `convert`, which some machines shadow with another program.
if command -v magick >/dev/null; then im=(magick); else im=(/usr/bin/convert); fi

work="$(mktemp -d)"
cleanup() {
  [ -n "${app_pid:-}" ] && kill "$app_pid" 2>/dev/null || true
  [ -n "${xvfb_pid:-}" ] && kill "$xvfb_pid" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

Xvfb "$display" -screen 0 "${width}x${height}x24" -nolisten tcp >"$work/xvfb.log" 2>&1 &
xvfb_pid=$!
export DISPLAY="$display"
for _ in $(seq 50); do xdotool getdisplaygeometry >/dev/null 2>&1 && break; sleep 0.1; done

# A private settings folder, so the recent-models list of whoever runs this is left alone.
XDG_CONFIG_HOME="$work/config" cargo run --release --bin tunestudio >"$work/studio.log" 2>&1 &
app_pid=$!
win="$(timeout 60 xdotool search --sync --name '^TuneStudio')"
xdotool windowmove "$win" 0 0
sleep 4   # the model and the dataset preview load on workers

# Start sits first in the toolbar, under the menu bar (see StudioApp::toolbar).
xdotool mousemove --window "$win" 35 40 click 1
sleep 3   # the preflight check reads the model and tokenizes the data
# Without a window manager nothing gives the window the keyboard: focus it, then Enter confirms
# the dialog's "Start training". The pointer moves off the toolbar so no tooltip covers the plot.
xdotool windowfocus "$win"
xdotool mousemove --window "$win" 900 700
xdotool key Return
sleep "$wait_s"

import -window root "$work/full.png"
# Half size keeps the PNG small enough for the README.
"${im[@]}" "$work/full.png" -resize 60% -strip -define png:compression-level=9 "$out"
echo "screenshot: $out ($(du -h "$out" | cut -f1))"
grep -i -E "error|panic" "$work/studio.log" >&2 || true
