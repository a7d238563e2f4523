"""Kernel tests: make `helpers` importable as `tests.kernels.helpers` or plain `helpers`."""

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
