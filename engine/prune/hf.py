"""`sparse-engine prune --hf DIR`: prune a Hugging Face / sentence-transformers encoder folder.

read the folder (a family from the registry must recognise it; its tokenizer is required) ->
calibrated one-shot pruning on text (`corpus.py`) -> optional distillation against the dense
model (`distill.py`) -> a new folder beside the old one: config.json, model.safetensors with zeros
in place plus `<weight>_mask` entries under the original key names, every other file copied
(tokenizer, sentence-transformers configs), and prune.report.json + prune.report.png. Every input
is checked before anything is written; the folder appears whole (written aside, then renamed).
"""
from __future__ import annotations

import fnmatch
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from . import corpus as corpus_io
from . import distributed
from .calibrate import calibrated_prune
from .embeddings import fidelity, token_batches, tokenizer
from .granularity import PruneError, check_sparsity, parse_granularity
from .masks import MaskSet, prunable_layers
from .schedule import SCHEDULES, pruning_plan

REPORT_JSON, REPORT_PNG = "prune.report.json", "prune.report.png"
WEIGHTS = "model.safetensors"


@dataclass
class Encoder:
    """A loaded folder: the family that recognised it, the dense model (tokenizer attached)."""
    family: object
    config: dict
    model: nn.Module
    tokenizer_json: str
    path: Path


def load_folder(path: str | os.PathLike) -> Encoder:
    from .. import checkpoint as checkpoint_io
    from ..models import ArchError, families
    path = Path(path)
    if not (path / "config.json").is_file():
        raise PruneError(f"--hf {str(path)!r}: not a Hugging Face model folder (no config.json)")
    try:
        ck = checkpoint_io.read(path)
    except (checkpoint_io.CheckpointError, OSError) as e:
        raise PruneError(f"--hf {str(path)!r}: {e}") from None
    found = [(f, opt) for f in families() for opt in [f.recognise(ck)] if opt is not None]
    if not found:
        raise PruneError(f"--hf {str(path)!r}: config.json has model_type {(ck.hf_config or {}).get('model_type')!r}, "
                         f"which no registered model family recognises (families: "
                         f"{', '.join(f.name for f in families())})")
    family, option = found[0]
    tok = family.tokenizer_json(ck)
    if tok is None:
        raise PruneError(f"--hf {str(path)!r}: the folder has no tokenizer.json; calibration and "
                         "validation need the model's tokenizer")
    try:
        config, sd, _ = family.from_checkpoint(ck, option)
        model = family.build(config)
        model.load_state_dict(sd)
    except (ArchError, RuntimeError) as e:
        raise PruneError(f"--hf {str(path)!r}: {e}") from None
    if not (hasattr(model, "encode") and hasattr(model, "pool")):
        raise PruneError(f"--hf {str(path)!r}: the {family.name} family gives no sentence embeddings "
                         "(encode/pool), which calibrated pruning of a folder measures")
    family.attach_tokenizer(model, config, tokenizer(tok))
    return Encoder(family, config, model.eval(), tok, path)


def select_layers(model: nn.Module, skip: list[str]) -> tuple[str, ...]:
    """Layer names matching any `--skip` pattern (fnmatch); a pattern matching nothing is an error."""
    names = list(prunable_layers(model))
    skipped = []
    for pattern in skip:
        hit = [n for n in names if fnmatch.fnmatchcase(n, pattern)]
        if not hit:
            raise PruneError(f"--skip {pattern!r} matches no prunable layer; layers are named like {names[:3]}")
        skipped += hit
    return tuple(dict.fromkeys(skipped))


def check_output(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise PruneError(f"-o {str(out)!r} exists and is not an empty folder; choose a new folder")


def write_folder(enc: Encoder, model: nn.Module, masks: MaskSet, report: dict, out: Path) -> None:
    """The pruned folder: original files copied, weights replaced under their original key names."""
    from safetensors.torch import load_file, save_file
    src = enc.path / WEIGHTS
    original = load_file(str(src)) if src.is_file() else torch.load(enc.path / "pytorch_model.bin", weights_only=True)
    state = model.state_dict()

    def model_key(key: str) -> str | None:  # 'bert.encoder.x.weight' -> 'encoder.x.weight'
        hits = [k for k in state if key == k or key.endswith("." + k)]
        return max(hits, key=len) if hits else None

    tensors = {}
    for key, value in original.items():
        if key.endswith("_mask"):
            continue  # an earlier pruning's masks: replaced by this one's below
        mk = model_key(key)
        tensors[key] = (state[mk] if mk is not None else value).detach().contiguous()
        layer = mk[:-len(".weight")] if mk is not None and mk.endswith(".weight") else None
        if layer in masks.masks:
            tensors[key + "_mask"] = masks.masks[layer].to(torch.uint8).contiguous()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        shutil.copytree(enc.path, tmp, dirs_exist_ok=True,
                        ignore=shutil.ignore_patterns(WEIGHTS, "pytorch_model.bin", REPORT_JSON, REPORT_PNG, ".git*"))
        save_file(tensors, str(tmp / WEIGHTS))
        (tmp / REPORT_JSON).write_text(json.dumps(report, indent=2) + "\n")
        plot(report, tmp / REPORT_PNG)
        if out.exists():
            out.rmdir()
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def plot(report: dict, path: Path) -> None:
    """Per-layer sparsity and relative output error; validation cosine at every step."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    layers = report["layers"]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    names = list(layers)
    a.bar(range(len(names)), [layers[n]["sparsity"] for n in names], label="sparsity")
    a.plot(range(len(names)), [layers[n].get("error", 0) for n in names], "r.-", label="relative output error")
    a.set_xlabel("layer (in order)")
    a.set_title(f"{report['method']} {report['granularity']}")
    a.legend()
    steps = report["steps"]
    b.plot([s["step"] for s in steps], [s["cosine_mean"] for s in steps], "o-", label="cosine to dense")
    b.plot([s["step"] for s in steps], [s["nn_agreement"] for s in steps], "s--", label="NN agreement")
    b.set_xlabel("distillation step")
    b.set_ylim(0, 1.02)
    b.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def prune_folder(src: str | os.PathLike, out: str | os.PathLike, *, method: str = "sparsegpt",
                 granularity: str = "unstructured", sparsity: float = 0.5, skip: list[str] = (),
                 text: str | None = None, calib_samples: int = 512, seq_len: int = 128,
                 val_sentences: int = 256, distill_steps: int = 0, schedule: str = "oneshot",
                 initial_sparsity: float | None = None, prune_steps: int | None = None,
                 distill: dict | None = None, every_rank: bool = False,
                 log: Callable[[str], None] = print) -> dict:
    """The `prune --hf` pipeline; -> the report (also written as OUT/prune.report.json).
    schedule="gradual": pruned to `initial_sparsity` (default 0) first, then `prune_steps` (default 10)
    times more along the cubic ramp (first half of the run) to `sparsity`, distilling in between.
    Under torchrun rank 0 writes OUT; with `every_rank`, rank R also writes OUT.rankR (to compare)."""
    started, out = time.time(), Path(out)
    gran = parse_granularity(granularity)
    sparsity = gran.fixed_sparsity if gran.kind == "nm" else check_sparsity(sparsity)
    if calib_samples < 1 or seq_len < 2:
        raise PruneError(f"--calib-samples must be >= 1 and --seq-len >= 2, got {calib_samples}, {seq_len}")
    if distill_steps < 0:
        raise PruneError(f"--distill-steps must be >= 0, got {distill_steps}")
    check_output(out)
    if distributed.active():  # every rank has checked -o before rank 0 may create it
        torch.distributed.barrier()
    enc = load_folder(src)
    texts = corpus_io.load(text)
    skipped = select_layers(enc.model, list(skip))
    import copy
    teacher = enc.model.requires_grad_(False)
    student = copy.deepcopy(teacher)
    val = texts.val[:val_sentences]
    dense_emb = teacher.encode(val)
    calib = token_batches(tokenizer(enc.tokenizer_json, seq_len), texts.samples("calib", calib_samples))
    if schedule not in SCHEDULES:
        raise PruneError(f"unknown schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}")
    if schedule == "gradual" and (not distill_steps or gran.kind == "nm"):
        raise PruneError("--schedule gradual needs --distill-steps N > 0 and a granularity with a free "
                         "sparsity (not N:M)")
    if schedule != "gradual" and (initial_sparsity is not None or prune_steps is not None):
        raise PruneError("--initial-sparsity and --prune-steps shape the gradual schedule; add --schedule gradual")
    initial_sparsity = 0.0 if initial_sparsity is None else initial_sparsity
    prune_steps = 10 if prune_steps is None else prune_steps
    if schedule == "gradual" and not 0.0 <= initial_sparsity < sparsity:
        raise PruneError(f"--initial-sparsity must lie in [0, --sparsity {sparsity}), got {initial_sparsity}")
    if prune_steps < 1:
        raise PruneError(f"--prune-steps must be >= 1, got {prune_steps}")
    plan = {0: sparsity}
    if schedule == "gradual":  # in fractions of the run, which a time budget may end before distill_steps
        plan = {k / distill_steps: s for k, s in pruning_plan(schedule, sparsity, distill_steps, initial=initial_sparsity,
                                                              n_prunes=prune_steps).items()}
    t0 = time.time()
    masks, layers = calibrated_prune(student, calib, method, plan[0], gran, skipped, log=log)
    steps = [{"step": 0, "seconds": time.time() - t0, **fidelity(dense_emb, student.encode(val))}]
    log(f"one-shot {method} {gran} {sparsity:.2f}: cosine {steps[0]['cosine_mean']:.4f}, "
        f"NN agreement {steps[0]['nn_agreement']:.3f} ({steps[0]['seconds']:.0f} s)")
    if distill_steps:
        from .distill import distill as run_distill
        def reprune(s):
            return calibrated_prune(student, calib, method, s, gran, skipped)[0]
        history, masks = run_distill(student, teacher, masks, enc.tokenizer_json, texts, dense_emb, val,
                                     steps=distill_steps, seq_len=seq_len, log=log, reprune=reprune,
                                     plan=plan if schedule == "gradual" else None, start=steps[0],
                                     **(distill or {}))
        steps += history
    report = {"source": str(Path(src)), "family": enc.family.name, "method": method, "granularity": str(gran),
              "sparsity": sparsity, "schedule": schedule,
              **({"initial_sparsity": initial_sparsity, "prune_steps": prune_steps} if schedule == "gradual" else {}),
              "measured_sparsity": masks.sparsity(), "skip": list(skipped),
              "corpus": texts.source, "calib_samples": calib_samples, "seq_len": seq_len,
              "val_sentences": len(val), "threads": torch.get_num_threads(),
              "world_size": distributed.world_size(), "distill": dict(distill or {}), "layers": layers, "steps": steps,
              "final": next((s for s in steps if s.get("kept")), steps[-1]),
              "seconds_total": time.time() - started}
    masks.apply(student)
    if every_rank and distributed.active():
        write_folder(enc, student, masks, report, out.with_name(f"{out.name}.rank{distributed.rank()}"))
    if distributed.is_main():
        write_folder(enc, student, masks, report, out)
    return report
