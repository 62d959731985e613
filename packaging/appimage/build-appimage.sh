#!/usr/bin/env bash
# Build TuneStudio as an AppImage: a release binary (the demo is embedded in it) plus the desktop
# entry and icons in an AppDir, packed by appimagetool when it is on PATH.
#
#   packaging/appimage/build-appimage.sh            # → dist/TuneStudio-x86_64.AppImage
#   APPDIR_ONLY=1 packaging/appimage/build-appimage.sh   # stop after dist/TuneStudio.AppDir
#   SKIP_BUILD=1 …                                        # package $CARGO_TARGET_DIR/release/tunestudio as it is
#
# The AppDir alone runs in place (dist/TuneStudio.AppDir/AppRun), which is how it is checked on
# machines without appimagetool. See packaging/README.md.
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
cd "$root"
target="${CARGO_TARGET_DIR:-$root/target}"
if [ -z "${SKIP_BUILD:-}" ]; then
  cargo build --release --bin tunestudio
fi

appdir="$root/dist/TuneStudio.AppDir"
rm -rf "$appdir"
mkdir -p "$appdir/usr/bin" "$appdir/usr/share/applications" \
         "$appdir/usr/share/icons/hicolor/256x256/apps" "$appdir/usr/share/icons/hicolor/scalable/apps"
install -m 755 "$target/release/tunestudio" "$appdir/usr/bin/tunestudio"
# Line tables are for our own backtraces; a package does not need them (~200 MB → ~40 MB).
strip "$appdir/usr/bin/tunestudio" 2>/dev/null || true
install -m 644 packaging/tunestudio.desktop "$appdir/usr/share/applications/tunestudio.desktop"
install -m 644 packaging/icons/tunestudio-256.png "$appdir/usr/share/icons/hicolor/256x256/apps/tunestudio.png"
install -m 644 packaging/icons/tunestudio.svg "$appdir/usr/share/icons/hicolor/scalable/apps/tunestudio.svg"
# appimagetool wants the entry and the icon at the top of the AppDir as well.
cp packaging/tunestudio.desktop "$appdir/tunestudio.desktop"
cp packaging/icons/tunestudio-256.png "$appdir/tunestudio.png"
ln -sf tunestudio.png "$appdir/.DirIcon"
cat > "$appdir/AppRun" <<'APPRUN'
#!/bin/sh
# Started by the AppImage runtime (or directly, from an unpacked AppDir).
here="$(dirname "$(readlink -f "$0")")"
if [ "$#" -eq 0 ]; then set -- studio; fi
exec "$here/usr/bin/tunestudio" "$@"
APPRUN
chmod 755 "$appdir/AppRun"
echo "AppDir: $appdir"

if [ -n "${APPDIR_ONLY:-}" ]; then
  exit 0
fi
if ! command -v appimagetool >/dev/null 2>&1; then
  echo "appimagetool is not on PATH: the AppDir above is complete; pack it on a machine that has appimagetool:" >&2
  echo "  ARCH=x86_64 appimagetool $appdir dist/TuneStudio-x86_64.AppImage" >&2
  exit 2
fi
ARCH=x86_64 appimagetool "$appdir" "$root/dist/TuneStudio-x86_64.AppImage"
echo "AppImage: $root/dist/TuneStudio-x86_64.AppImage"
