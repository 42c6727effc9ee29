"""Makes detectron2 unimportable, as on a fresh machine (it is on no package registry).

`.ci/run` puts this folder first on PYTHONPATH for its second test run, so the test process and
every Python process it starts run this at start-up: `import detectron2` (and any submodule)
raises ModuleNotFoundError and `importlib.util.find_spec("detectron2")` returns None. Locally:

    PYTHONPATH=.ci/no_detectron2 python3 -m pytest tests -ra -q
"""

import sys

sys.modules["detectron2"] = None  # Python's own marker for "this import is blocked"
