#!/usr/bin/env python3
"""Compatibility name of scripts/lib/oci-image.py (same CLI; the tests' callers use this name).

  mk-oci-image.py --busybox /bin/busybox --name localhost/meshcni-pause:latest \
      --entrypoint /bin/sleep --cmd 2147483647 -o pause.tar
"""
import os
import runpy
import sys

sys.argv[0] = os.path.join(os.path.dirname(os.path.abspath(__file__)), "oci-image.py")
runpy.run_path(sys.argv[0], run_name="__main__")
