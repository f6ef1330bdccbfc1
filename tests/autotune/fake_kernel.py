"""A kernel whose configs misbehave on purpose, for the tuner's tests (module-level
callables, so a worker process can unpickle it).

BLOCK 1 and 2 are right (2 is faster), 4 is wrong but fastest, 8 raises, 16 hangs, 32
kills its process, 64 is outside the constraints.
"""
import os
import time


from rewriter.autotune.space import Space
from rewriter.autotune.tuner import Tunable

DELAY_S = {1: 0.004, 2: 0.001, 4: 0.0}


def shape_of(x):
    return {"n": int(x.shape[0]), "dtype": str(x.dtype).removeprefix("torch.")}


SPACE = Space("fake", params={"BLOCK": [1, 2, 4, 8, 16, 32, 64]}, keep=lambda config, shape: config["BLOCK"] != 64,
              default=lambda shape: {"BLOCK": 1}, shape_of=shape_of)


def reference(args):
    return args[0] * 2


def run(args, config):
    block = config["BLOCK"]
    if block == 8:
        raise RuntimeError("out of resources: shared memory (simulated)")
    if block == 16:
        time.sleep(3600)
    if block == 32:
        os._exit(17)
    time.sleep(DELAY_S[block])
    return args[0] * (3 if block == 4 else 2)


def tunable(blocks=None):
    space = SPACE
    if blocks is not None:
        space = Space("fake", params={"BLOCK": list(blocks)}, keep=SPACE.keep, default=SPACE.default,
                      shape_of=shape_of)
    return Tunable(kernel="fake", kind="cpu", space=space, run=run, reference=reference, source="test")
