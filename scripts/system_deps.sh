#!/usr/bin/env bash
# Makes sure the Debian packages the book needs are there.
#   scripts/system_deps.sh book   TeX (xelatex, latexmk, fonts) for the PDF
#   scripts/system_deps.sh test   the same, plus Chromium and poppler-utils for the browser and PDF tests
# Installs what is missing when running as root with apt-get; otherwise prints the exact command.
# Exit status: 0 when everything is there, 3 when something is missing and could not be installed.
set -euo pipefail

what=${1:-book}
# fonts-symbola: a monochrome emoji font for the PDF (_latex/emojifallback.sty); xelatex cannot use
# the colour emoji of fonts-noto-color-emoji.
tex=(texlive-latex-recommended texlive-latex-extra texlive-fonts-recommended texlive-xetex latexmk fonts-freefont-otf
     fonts-symbola)
case "$what" in
  book) pkgs=("${tex[@]}"); cmds=(xelatex latexmk) ;;
  test) pkgs=("${tex[@]}" chromium poppler-utils); cmds=(xelatex latexmk chromium pdftotext) ;;
  *) echo "usage: $0 book|test" >&2; exit 2 ;;
esac

missing=()
if command -v dpkg-query >/dev/null 2>&1; then
  for p in "${pkgs[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
else
  for c in "${cmds[@]}"; do command -v "$c" >/dev/null 2>&1 || missing+=("$c")
  done
fi
[ ${#missing[@]} -eq 0 ] && exit 0

if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "Installing Debian packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  exit 0
fi

echo "Missing system packages: ${missing[*]}"
echo "Install them with:"
echo "  sudo apt-get update && sudo apt-get install -y --no-install-recommends ${missing[*]}"
exit 3
