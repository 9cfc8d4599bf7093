#!/usr/bin/env bash
# Fetch QEMU 7.2's scripts/analyze-migration.py (LGPL-2.1+, kept out of this
# repository) from Debian's qemu source package into ~/.cache/ferry/, where
# tests/test_analyze_migration.py looks for it (or set QEMU_ANALYZE_MIGRATION).
# Uses a private apt source list: the system's apt configuration is untouched.
set -euo pipefail
dest="${QEMU_ANALYZE_MIGRATION:-$HOME/.cache/ferry/analyze-migration.py}"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/lists/partial" "$(dirname "$dest")"
cat > "$work/src.list" <<LIST
deb-src [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian bookworm main
deb-src [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian-security bookworm-security main
LIST
opts=(-o "Dir::Etc::SourceList=$work/src.list" -o "Dir::Etc::SourceParts=/dev/null" -o "Dir::State::Lists=$work/lists")
apt-get "${opts[@]}" update >/dev/null
(cd "$work" && apt-get "${opts[@]}" source --download-only qemu >/dev/null)
tar -xJf "$work"/qemu_*.orig.tar.xz -C "$work" --wildcards '*/scripts/analyze-migration.py'
cp "$work"/qemu-*/scripts/analyze-migration.py "$dest"
echo "$dest"
