#!/bin/sh
# Install what the browser test (tests/test_serving_browser.py) needs: Debian's Chromium and Playwright for
# Python. Playwright's own browser download (`playwright install`) is NOT used: the test drives /usr/bin/chromium.
set -eu
if [ "$(id -u)" -ne 0 ]; then SUDO=sudo; else SUDO=; fi
$SUDO apt-get update
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y --no-install-recommends chromium fonts-dejavu-core
python -m pip install playwright
/usr/bin/chromium --version
python -c "import playwright.sync_api; print('playwright for Python is installed')"
