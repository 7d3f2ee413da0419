"""Host-side tests of the lab harness: make tests/vm/lab.py importable."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
