"""Times one ONNX model on DeepSparse for engine/peers.py, from inside DeepSparse's own venv.

It runs under that venv's interpreter (DeepSparse 1.8.0 pins Python 3.11, numpy 1.26, onnx 1.14.1,
so it cannot share a venv with this project), imports only the standard library, numpy and
deepsparse, and speaks JSON lines: one request per line on stdin, one answer per line on the
process's original stdout (DeepSparse's own prints are sent to stderr). Requests:

    {"op": "load", "onnx": PATH, "inputs": NPZ, "threads": N}  -> {"ok": true, "version": ...}
    {"op": "run"}        -> {"ok": true, "outputs": NPZ}   (the outputs, written beside the inputs)
    {"op": "time", "n": K} -> {"ok": true, "seconds": per-call seconds over K calls}
    {"op": "quit"}

An error answers {"ok": false, "error": "..."}; the parent raises it.
"""
import os
import sys

# Run as a script, this file's folder (engine/) leads sys.path, and engine/inspect.py would shadow the
# standard library module that numpy imports.
sys.path = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]

import json  # noqa: E402
import time  # noqa: E402


def main() -> int:
    answer = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # anything else printed to stdout (DeepSparse's banners) goes to stderr
    sys.stdout = sys.stderr
    import numpy as np
    engine = inputs = None
    path = None
    for line in sys.stdin:
        req = json.loads(line)
        try:
            if req["op"] == "quit":
                break
            if req["op"] == "load":
                import deepsparse
                with np.load(req["inputs"]) as z:
                    inputs = [z[k] for k in sorted(z.files)]
                path = req["inputs"]
                engine = deepsparse.compile_model(req["onnx"], batch_size=inputs[0].shape[0],
                                                  num_cores=req["threads"])
                out = {"ok": True, "version": deepsparse.__version__}
            elif engine is None:
                raise RuntimeError("no model loaded")
            elif req["op"] == "run":
                dest = path[:-len(".npz")] + ".out.npz"
                np.savez(dest, *engine.run(inputs))
                out = {"ok": True, "outputs": dest}
            elif req["op"] == "time":
                n = int(req["n"])
                t0 = time.perf_counter()
                for _ in range(n):
                    engine.run(inputs)
                out = {"ok": True, "seconds": (time.perf_counter() - t0) / n}
            else:
                raise ValueError(f"unknown op {req['op']!r}")
        except Exception as e:  # noqa: BLE001 - every failure goes back to the parent
            out = {"ok": False, "error": f"{type(e).__name__}: {e}"}
        answer.write(json.dumps(out) + "\n")
        answer.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
