"""One-shot (no fine-tuning) test accuracy of the digits MLP: magnitude vs wanda vs sparsegpt.

    python bench/digits_calibrated.py     (a table of it: bench/results/minilm_pruning.md)
"""
import copy, sys, torch
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1]))
from engine import examples
from engine.prune.calibrate import calibrated_prune
torch.set_num_threads(1)
data = examples.digits_data(0)
dense = examples.mlp_digits("small", seed=0)
examples.train_dense(dense, data, epochs=60, seed=0)
print(f"dense test accuracy {examples.accuracy(dense, data.test):.4f}")
calib = [data.train.x[:512]]  # the first 512 training images
for s, gran in ((0.5, "unstructured"), (0.7, "unstructured"), (0.8, "unstructured"), (0.5, "nm:2:4"), (0.7, "block:4x4")):
    row = []
    for method in ("magnitude", "wanda", "sparsegpt"):
        m = copy.deepcopy(dense)
        skip = ("4",) if gran.startswith("nm") else ()
        calibrated_prune(m, calib, method, s, gran, skip)
        row.append(f"{method} {examples.accuracy(m, data.test):.4f}")
    print(f"{gran} {s:.0%}: " + ", ".join(row), flush=True)
