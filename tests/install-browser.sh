#!/bin/sh
# The browser the audit viewer's tests drive (tests/test_web.py): Debian's
# headless Chromium and its chromedriver. Nothing to do when both are there;
# otherwise installed with apt-get, which needs root. Selenium is pointed at
# these two files, so it downloads no browser of its own.
set -eu
if [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; then
  exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
  echo "tests/install-browser.sh: chromium and chromedriver are missing; as root run:" >&2
  echo "  apt-get update && apt-get install -y chromium chromium-driver" >&2
  exit 1
fi
echo "tests/install-browser.sh: installing chromium and chromium-driver" >&2
apt-get update -q >/dev/null
DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver >/dev/null
