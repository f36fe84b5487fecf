"""The built-in synthetic safety testbed and the demo.

`build_testbed(out_dir, seed=0, quick=False, force=False) -> Testbed`, `Testbed.load(dir)`;
`DemoContext` and `DemoRow` are the contract for demo row modules (`demo_<name>.py`).
"""

from surgery.testbed.build import Testbed, build_testbed
from surgery.testbed.demo_api import DemoContext, DemoRow

__all__ = ["DemoContext", "DemoRow", "Testbed", "build_testbed"]
