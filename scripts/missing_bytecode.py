"""Which modules `import unsloth` pulls in without a bytecode cache (each new process then compiles their source).

On a GPU machine with the gpu extra installed: `python scripts/missing_bytecode.py` (docs/BENCHMARKS.md, "Restart
after a preemption").
"""

import collections
import importlib.util
import os
import sys
import time

started = time.time()
import unsloth  # noqa: E402,F401

print(f"import unsloth: {time.time() - started:.1f} s; dont_write_bytecode={sys.flags.dont_write_bytecode} "
      f"pycache_prefix={sys.pycache_prefix}")
missing, total, unwritable = collections.Counter(), collections.Counter(), set()
for module in list(sys.modules.values()):
    path = getattr(module, "__file__", None) or ""
    if not path.endswith(".py"):
        continue
    root = path.split("site-packages/")[-1].split("/")[0] if "site-packages/" in path else os.path.dirname(path)
    total[root] += 1
    if not os.path.exists(importlib.util.cache_from_source(path)):
        missing[root] += 1
        if not os.access(os.path.dirname(path), os.W_OK):
            unwritable.add(root)
print(f"modules without bytecode: {sum(missing.values())} of {sum(total.values())}")
for root, count in missing.most_common(15):
    print(f"  {root}: {count} of {total[root]}{' (directory not writable)' if root in unwritable else ''}")
