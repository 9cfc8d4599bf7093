#!/usr/bin/env bash
# Fetch QEMU's scripts/analyze-migration.py (LGPL-2.1+, kept out of this
# repository) from the distribution's qemu source package into ~/.cache/ferry/,
# where tests/test_analyze_migration.py looks for it (or set
# QEMU_ANALYZE_MIGRATION). The source list is the system's own binary package
# sources turned into deb-src entries, in a private apt configuration: the
# system's apt setup is untouched.
set -euo pipefail
dest="${QEMU_ANALYZE_MIGRATION:-$HOME/.cache/ferry/analyze-migration.py}"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/lists/partial" "$work/parts" "$(dirname "$dest")"
for f in /etc/apt/sources.list.d/*.sources; do
    [ -e "$f" ] && sed 's/^Types:.*/Types: deb-src/' "$f" > "$work/parts/$(basename "$f")"
done
if [ -s /etc/apt/sources.list ]; then
    grep -E '^deb ' /etc/apt/sources.list | sed 's/^deb /deb-src /' > "$work/parts/system.list" || true
fi
opts=(-o "Dir::Etc::SourceList=/dev/null" -o "Dir::Etc::SourceParts=$work/parts" -o "Dir::State::Lists=$work/lists")
apt-get "${opts[@]}" update >/dev/null
(cd "$work" && apt-get "${opts[@]}" source --download-only qemu >/dev/null)
tar -xJf "$work"/qemu_*.orig.tar.xz -C "$work" --wildcards '*/scripts/analyze-migration.py'
cp "$work"/qemu-*/scripts/analyze-migration.py "$dest"
echo "$dest"
