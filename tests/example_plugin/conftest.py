# Not part of the example: blockgraph's own test run collects this folder, where the example is not
# installed (tests/test_example_plugin.py registers it in-process instead). Installed, it runs as is.
import importlib.util

collect_ignore = [] if importlib.util.find_spec("blockgraph_ramdisk") else ["tests"]
