#!/usr/bin/env bash
# Offline `dvc plots show`: DVC's HTML page loads vega from a CDN (blank without network). This fetches vega,
# vega-lite and vega-embed from the npm registry once (at setup time, never at run time), writes
# build/plots/index.html (a DVC plots template with the three libraries inlined, so a page works anywhere, even
# mailed) and points this clone's DVC at it (.dvc/config.local plots.html_template). Without npm it changes
# nothing: the plots then need network, and the PNG/HTML report in data/evaluate/report/ needs none.
set -euo pipefail
cd "$(dirname "$0")/.."
PACKAGES="vega@5.33.1 vega-lite@5.23.0 vega-embed@6.29.0"
OUT=build/plots
TEMPLATE="$OUT/index.html"
if [ -f "$TEMPLATE" ] && [ "$(cat "$OUT/.packages" 2>/dev/null)" = "$PACKAGES" ]; then exit 0; fi
command -v npm >/dev/null 2>&1 || {
  echo "warning: npm not found; dvc plots show will load vega from its CDN (see data/evaluate/report/ offline)" >&2; exit 0; }
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
(cd "$work" && npm pack --silent $PACKAGES >/dev/null) || {  # optional: a registry outage must not fail setup
  echo "warning: npm pack $PACKAGES failed; dvc plots show will load vega from its CDN" >&2; exit 0; }
mkdir -p "$OUT"
{
  printf '<!DOCTYPE html>\n<html>\n<head>\n    {refresh_tag}\n    <meta charset="utf-8">\n    <title>DVC Plot</title>\n'
  for package in $PACKAGES; do
    name=${package%@*}
    printf '    <script type="text/javascript">/* %s from the npm registry */\n' "$package"
    tar -xzOf "$work/$name-${package#*@}.tgz" "package/build/$name.min.js"
    printf '\n    </script>\n'
  done
  printf '    <style>table { border-spacing: 15px; }</style>\n</head>\n<body>\n    {plot_divs}\n</body>\n</html>\n'
} > "$TEMPLATE.tmp"
mv "$TEMPLATE.tmp" "$TEMPLATE"
echo "$PACKAGES" > "$OUT/.packages"
DVC_NO_ANALYTICS=true .venv/bin/python -m dvc config --local plots.html_template ../build/plots/index.html
echo "dvc plots: offline template $TEMPLATE ($PACKAGES)"
