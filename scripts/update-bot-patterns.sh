#!/usr/bin/env bash
# Copies the bot pattern list and licence of the `isbot` crate VERSION (from its crate package,
# fetched by cargo) into src/core/bots/, and its test fixtures into tests/fixtures/isbot/ (all
# bot lines, every 8th browser line). Then: set ISBOT_VERSION in src/core/bots.rs, update the
# version in the two README.md files there, run `cargo test --lib bots` and commit.
#
#   scripts/update-bot-patterns.sh 0.1.3
set -euo pipefail
version=${1:?usage: $0 VERSION}
root=$(cd "$(dirname "$0")/.." && pwd)
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

mkdir -p "$tmp/src"
cat > "$tmp/Cargo.toml" <<TOML
[package]
name = "isbot-fetch"
version = "0.0.0"
edition = "2021"
[dependencies]
isbot = { version = "=$version", default-features = false }
TOML
touch "$tmp/src/lib.rs"
manifest=$(cd "$tmp" && cargo metadata --format-version 1 |
    python3 -c 'import json, sys
print(next(p["manifest_path"] for p in json.load(sys.stdin)["packages"] if p["name"] == "isbot"))')
crate=$(dirname "$manifest")

cp "$crate/src/bot_regex_patterns.txt" "$root/src/core/bots/isbot-patterns.txt"
cp "$crate/LICENSE" "$root/src/core/bots/LICENSE-isbot"
cp "$crate/LICENSE" "$root/tests/fixtures/isbot/LICENSE"
tr -d '\r' < "$crate/fixtures/bots.txt" | grep -v '^$' > "$root/tests/fixtures/isbot/bots.txt"
tr -d '\r' < "$crate/fixtures/browsers.txt" | grep -v '^$' | awk 'NR % 8 == 1' \
    > "$root/tests/fixtures/isbot/browsers-sample.txt"
echo "isbot $version: $(grep -c . "$root/src/core/bots/isbot-patterns.txt") patterns," \
    "$(wc -l < "$root/tests/fixtures/isbot/bots.txt") bots," \
    "$(wc -l < "$root/tests/fixtures/isbot/browsers-sample.txt") browsers (sample)"
