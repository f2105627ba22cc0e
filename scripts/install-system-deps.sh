#!/usr/bin/env bash
# Install the Debian packages audiokd uses, when we can; otherwise say exactly what to run.
#
#   ffmpeg                             decoding for torchaudio/torchcodec, MP3/Opus codec augmentation
#   fluidsynth                         the soundfont synthesiser behind the rendered datasets
#   fluid-soundfont-gm                 FluidR3_GM, the training timbres (MIT)
#   musescore-general-soundfont-small  MuseScore General, the held-out timbres (MIT)
#
# Without them the project still runs on pip packages alone (soundfile decodes, tinysoundfont
# renders with the TimGM6mb soundfont from pretty_midi), with fewer timbres.
#
# With --browser (what `make test` asks for), also:
#   chromium chromium-driver           headless Chromium and its WebDriver, for the test that plays
#                                      the report's audio players in a real browser (skipped without)
set -u
packages=(ffmpeg fluidsynth fluid-soundfont-gm musescore-general-soundfont-small)
if [ "${1:-}" = "--browser" ]; then
  packages=(chromium chromium-driver)
fi

missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
  echo "system packages: all present (${packages[*]})"
  exit 0
fi

command="apt-get update && apt-get install -y --no-install-recommends ${missing[*]}"
if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" -eq 0 ]; then
  echo "system packages: installing ${missing[*]}"
  if DEBIAN_FRONTEND=noninteractive bash -c "$command" >/tmp/audiokd-apt.log 2>&1; then
    echo "system packages: installed"
    exit 0
  fi
  echo "system packages: apt-get failed (log: /tmp/audiokd-apt.log)"
fi
if [ "${1:-}" = "--browser" ]; then
  echo "system packages missing: ${missing[*]}; the browser test will be skipped. To run it: $command"
  exit 0
fi
cat <<MSG
system packages missing: ${missing[*]}
  To install them, run as root (or with sudo):
    $command
  Continuing with the pip-only fallback: soundfile for decoding, tinysoundfont with the
  TimGM6mb soundfont for rendering (one timbre set, so no held-out-soundfont split), and
  libsndfile instead of FFmpeg for the codec augmentation.
MSG
exit 0
