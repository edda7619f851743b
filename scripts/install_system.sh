#!/bin/sh
# Install the system packages the test suite needs, from Debian's archive (no other downloads):
# - Chromium and Playwright for Python, for the browser test (tests/test_serving_browser.py). Playwright's own
#   browser download (`playwright install`) is NOT used: the test drives /usr/bin/chromium.
# - WordNet 3.0 (wordnet-base: /usr/share/wordnet), which WUPS in VQA evaluation reads through NLTK
#   (vlfuse/metrics/wups.py, tests/test_wups.py).
# - A font with Chinese characters (WenQuanYi Micro Hei, 5 MB), so that the browser shows Chinese captions as text,
#   not boxes (the web page's language switch; tests/test_serving_browser.py).
set -eu
if [ "$(id -u)" -ne 0 ]; then SUDO=sudo; else SUDO=; fi
$SUDO apt-get update
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y --no-install-recommends chromium fonts-dejavu-core fonts-wqy-microhei wordnet-base
python -m pip install playwright
/usr/bin/chromium --version
python -c "import playwright.sync_api; print('playwright for Python is installed')"
test -f /usr/share/wordnet/data.noun && echo "WordNet is installed in /usr/share/wordnet"
