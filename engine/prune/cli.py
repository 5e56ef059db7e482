"""`sparse-engine prune`: train (or load) a dense model, prune it, fine-tune, and write a plain
pruned state_dict with its masks plus `<out>.report.json` and `<out>.report.png`.

A fixed `--sparsity S` runs one trial; `--max-drop D` / `--min-accuracy A` search for the highest
sparsity that keeps validation accuracy at the target. Under torchrun every rank trains (DDP) and
rank 0 writes the files.

`--hf DIR` instead prunes a Hugging Face encoder folder with calibrated one-shot pruning (sparsegpt,
wanda, magnitude, taylor), optionally distils it (data-parallel under torchrun), and writes a new
folder (engine/prune/hf.py)."""
from __future__ import annotations

import argparse
import importlib
import shlex
import sys
import time
from pathlib import Path

import torch

from . import distributed, target
from .calibrate import CALIBRATED
from .criteria import METHODS
from .distill import LR_DECAYS
from .finetune import DISTILL, OPTIMIZERS, TrainConfig, evaluate, finetune
from .granularity import PruneError, check_sparsity, parse_granularity
from .loop import WHEN, Task, run_trial, search_sparsity
from .masks import MaskSet, export_state_dict, prunable_layers, split_state_dict
from .pruner import SCOPES, PruneConfig
from .report import describe_architecture, plot, report_paths, write_json
from .schedule import SCHEDULES

EXAMPLES = {"mlp-digits": "small", "mlp-digits-wide": "wide"}
HF_ONLY = tuple(m for m in CALIBRATED if m not in METHODS)  # wanda, sparsegpt: --hf folders only


def configure(parser: argparse.ArgumentParser) -> None:
    src = parser.add_argument_group("model and data")
    src.add_argument("--example", choices=sorted(EXAMPLES),
                     help="built-in example: the digits MLP (hidden 100, 50) or its wide variant (2048, 1024)")
    src.add_argument("--model", metavar="PKG.MODULE:FACTORY",
                     help="custom model: a callable returning an nn.Module (called after seeding)")
    src.add_argument("--data", metavar="PKG.MODULE:FACTORY",
                     help="custom data: a callable returning (train_loader, val_loader, test_loader)")
    src.add_argument("--dense", metavar="CKPT", help="start from this trained dense state_dict instead of "
                     "training one (loaded with weights_only=True)")
    src.add_argument("--dense-epochs", type=int, default=60, help="epochs of dense training (default 60)")
    src.add_argument("--hf", metavar="DIR", help="a Hugging Face / sentence-transformers encoder folder "
                     "(e.g. all-MiniLM-L6-v2): calibrated pruning on text, optional distillation; -o is then "
                     "a new folder")

    h = parser.add_argument_group("--hf folders (calibration text, distillation)")
    h.add_argument("--text", metavar="FILE", help="UTF-8 text, one passage per line, instead of the built-in "
                   "corpus (the Python standard library's documentation)")
    h.add_argument("--calib-samples", type=int, default=512,
                   help="calibration sentences (default 512: sentences as the model will see them; on "
                        "MiniLM they beat 128 joined 128-token passages, docs/pruning.md)")
    h.add_argument("--seq-len", type=int, default=128, help="tokens kept of each calibration / training text")
    h.add_argument("--val-sentences", type=int, default=256, help="validation sentences measured (default 256)")
    h.add_argument("--distill-steps", type=int, default=0, help="distillation steps after pruning (default 0)")
    h.add_argument("--distill-lr", type=float, default=6e-4,
                   help="AdamW peak learning rate of distillation (default 6e-4)")
    h.add_argument("--distill-lr-decay", default="cosine", choices=LR_DECAYS,
                   help="cosine (default): 3 %% linear warm-up, then cosine decay to 0 at the end of the run "
                        "(--distill-steps, or --time-budget when that ends it sooner); none: constant rate")
    h.add_argument("--distill-batch", type=int, default=16, help="sentences per distillation step")
    h.add_argument("--eval-every", type=int, default=50, help="validate every N distillation steps")
    h.add_argument("--time-budget", type=float, metavar="SECONDS",
                   help="stop distillation after this many seconds (the best state so far is kept)")
    h.add_argument("--layer-loss", type=float, default=0.0, metavar="W",
                   help="add W x the MSE of the hidden states after every encoder layer (mean over the "
                        "layers) to the distillation loss (default 0: final states and embeddings only)")

    p = parser.add_argument_group("pruning")
    p.add_argument("--method", default=None, choices=METHODS + HF_ONLY,
                   help="default: magnitude; sparsegpt for --hf and for --target-speedup / --latency-budget-ms. "
                        f"--hf folders take {', '.join(CALIBRATED)}; wanda and sparsegpt take --hf folders and "
                        "latency targets (--example / --model with a target too)")
    p.add_argument("--granularity", default="unstructured", metavar="G",
                   help="unstructured | block:RxC (e.g. block:4x4) | nm:N:M (e.g. nm:2:4)")
    p.add_argument("--scope", default="global", choices=SCOPES,
                   help="rank weights across all layers (global, default: keeps 90 %% within a point on the "
                        "digits MLP) or within each layer")
    goal = p.add_mutually_exclusive_group()
    goal.add_argument("--sparsity", type=float, help="fraction of weights to prune, in [0, 1)")
    goal.add_argument("--max-drop", type=float, metavar="D",
                        help="search: highest sparsity whose validation accuracy >= dense - D (0.01 = 1 point)")
    goal.add_argument("--min-accuracy", type=float, metavar="A",
                        help="search: highest sparsity whose validation accuracy >= A")
    p.add_argument("--schedule", default=None, choices=SCHEDULES,
                   help="gradual (Zhu & Gupta cubic ramp over the first half of training; default when "
                        "fine-tuning a trained model) or oneshot (default for --when pre, N:M, --epochs 0 and --hf)")
    p.add_argument("--initial-sparsity", type=float, metavar="S",
                   help="--hf --schedule gradual: prune to S first, then ramp to --sparsity (default 0)")
    p.add_argument("--prune-steps", type=int, metavar="N",
                   help="--hf --schedule gradual: re-prunings along the ramp over the first half of the "
                        "distillation run (default 10; each re-runs the calibrated pruner)")
    p.add_argument("--when", default="auto", choices=("auto",) + WHEN,
                   help="post: prune the trained model then fine-tune; pre: prune at initialisation then "
                        "train from scratch; auto (default): pre for snip, post otherwise")
    p.add_argument("--skip", action="append", default=[], metavar="LAYER",
                   help="leave this layer dense (repeatable), e.g. --skip 4 for the digits MLP's head; with "
                        "--hf an fnmatch pattern, e.g. 'encoder.layer.0.*'")
    p.add_argument("--layer-sparsity", action="append", default=[], metavar="LAYER=S",
                   help="per-layer sparsity override (repeatable)")
    p.add_argument("--calib-batches", type=int, default=8, help="batches scored by gradient/taylor/snip")

    s = parser.add_argument_group("search (with --max-drop / --min-accuracy)")
    s.add_argument("--max-sparsity", type=float, default=0.99)
    s.add_argument("--tol", type=float, default=0.01, help="stop when the bracket is narrower than this")
    s.add_argument("--max-trials", type=int, default=10)

    t = parser.add_argument_group("training")
    t.add_argument("--epochs", type=int, help="epochs after pruning (default 40 post, --dense-epochs pre)")
    t.add_argument("--lr", type=float, default=1e-3)
    t.add_argument("--weight-decay", type=float, default=1e-4)
    t.add_argument("--optimizer", default="adam", choices=OPTIMIZERS)
    t.add_argument("--batch-size", type=int, default=32)
    t.add_argument("--distill", default="none", choices=DISTILL, help="distil from the dense model")
    t.add_argument("--distill-alpha", type=float, default=0.5)
    t.add_argument("--temperature", type=float, default=2.0)
    t.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default 1: small layers gain nothing from more, and on a busy "
                        "machine extra threads mostly spin); 0 keeps torch's default")
    t.add_argument("--seed", type=int, default=0, help="seeds the data split, init, shuffling and random scores")

    target.add_arguments(parser)

    o = parser.add_argument_group("output")
    o.add_argument("-o", "--output", required=True, help="pruned checkpoint path, e.g. pruned.pt")
    o.add_argument("--export-style", default="zeros", choices=("zeros", "torch-prune"),
                   help="zeros: weights with zeros in place + <layer>.weight_mask (default); "
                        "torch-prune: <layer>.weight_orig + <layer>.weight_mask")
    o.add_argument("--save-every-rank", action="store_true",
                   help="under torchrun, every rank also writes <output>.rank<R>.pt (with --hf: the folder "
                        "<output>.rank<R>), to compare ranks")
    o.add_argument("--quiet", action="store_true", help="no progress bars or summary")


def _import(spec: str, what: str):
    if ":" not in spec:
        raise PruneError(f"--{what} {spec!r}: expected PKG.MODULE:FACTORY")
    mod, _, name = spec.partition(":")
    try:
        obj = getattr(importlib.import_module(mod), name)
    except (ImportError, AttributeError) as e:
        raise PruneError(f"--{what} {spec!r}: cannot import it ({e})") from e
    if not callable(obj):
        raise PruneError(f"--{what} {spec!r} is not callable")
    return obj


def build_task(args) -> tuple[Task, str]:
    """The model factory and loaders, from --example or --model/--data; and a name for the report."""
    if args.example and (args.model or args.data):
        raise PruneError("give either --example or --model/--data, not both")
    if args.example:
        from .. import examples
        data = examples.digits_data(args.seed)
        width = EXAMPLES[args.example]
        loaders = [examples.loader(split, args.batch_size) for split in data]
        return Task(lambda seed: examples.mlp_digits(width, seed=seed), *loaders), f"example:{args.example}"
    if not (args.model and args.data):
        raise PruneError("give --example NAME, or both --model PKG.MODULE:FACTORY and --data PKG.MODULE:FACTORY")
    factory, data_factory = _import(args.model, "model"), _import(args.data, "data")

    def make_model(seed):
        torch.manual_seed(seed)
        return factory()
    loaders = data_factory()
    if not (isinstance(loaders, (tuple, list)) and len(loaders) == 3):
        raise PruneError(f"--data {args.data!r} must return (train_loader, val_loader, test_loader), "
                         f"got {type(loaders).__name__}")
    return Task(make_model, *loaders), args.model


def _layer_overrides(items: list[str]) -> dict[str, float]:
    out = {}
    for item in items:
        name, sep, value = item.rpartition("=")
        if not sep or not name:
            raise PruneError(f"--layer-sparsity {item!r}: expected LAYER=S, e.g. 0=0.5")
        try:
            out[name] = check_sparsity(float(value), f"sparsity of layer {name!r}")
        except ValueError as e:
            raise PruneError(f"--layer-sparsity {item!r}: {e}") from e
    return out


def _own_argv(args) -> list[str]:
    """An equivalent command line for the report: every option whose value is not its default.
    (Rebuilt from `args` because the verb may be called in-process, where sys.argv is not ours.)"""
    parser = argparse.ArgumentParser()
    configure(parser)
    argv = []
    for action in parser._actions:
        if not action.option_strings or action.dest == "help":
            continue
        value, flag = getattr(args, action.dest, None), action.option_strings[-1]
        if value == action.default or value is None:
            continue
        if isinstance(action, argparse._StoreTrueAction):
            argv.append(flag)
        elif isinstance(value, list):
            for v in value:
                argv += [flag, str(v)]
        else:
            argv += [flag, str(value)]
    return argv


def run(args, argv: list[str] | None = None) -> dict:
    """Everything `main` does, returning the report (rank 0 also writes the files)."""
    started = time.time()
    args.method = args.method or "magnitude"
    distributed.init_from_env()
    progress = not args.quiet and sys.stderr.isatty() and distributed.is_main()
    gran = parse_granularity(args.granularity)
    when = args.when if args.when != "auto" else ("pre" if args.method == "snip" else "post")
    args.schedule = args.schedule or ("oneshot" if when == "pre" or gran.kind == "nm" or args.epochs == 0 else "gradual")
    searching = args.max_drop is not None or args.min_accuracy is not None
    if searching and gran.fixed_sparsity is not None:
        raise PruneError(f"granularity {gran} fixes the sparsity at {gran.fixed_sparsity:g}; there is "
                         f"nothing to search, drop --max-drop / --min-accuracy")
    if args.max_drop is not None and not 0 <= args.max_drop < 1:
        raise PruneError(f"--max-drop must be in [0, 1) (0.01 = one accuracy point), got {args.max_drop}")
    if args.min_accuracy is not None and not 0 < args.min_accuracy <= 1:
        raise PruneError(f"--min-accuracy must be in (0, 1], got {args.min_accuracy}")
    sparsity = args.sparsity
    if not searching:
        if sparsity is None:
            sparsity = gran.fixed_sparsity
        if sparsity is None:
            raise PruneError("give --sparsity S, --max-drop D or --min-accuracy A")
        check_sparsity(sparsity)
        if gran.fixed_sparsity is not None and abs(sparsity - gran.fixed_sparsity) > 1e-9:
            raise PruneError(f"granularity {gran} means sparsity {gran.fixed_sparsity:g}, but --sparsity "
                             f"{sparsity:g} was given")

    task, model_name = build_task(args)
    prune_cfg = PruneConfig(args.method, str(gran), args.scope, tuple(args.skip),
                            _layer_overrides(args.layer_sparsity), args.calib_batches, args.seed)
    epochs = args.epochs if args.epochs is not None else (40 if when == "post" else args.dense_epochs)
    train_cfg = TrainConfig(epochs, args.lr, args.weight_decay, args.optimizer, args.batch_size, args.distill,
                            args.distill_alpha, args.temperature, args.seed, progress)
    train_cfg.validate()

    dense = task.make_model(args.seed)
    prune_cfg.validate(dense)  # fail on a bad layer name or block size before any training
    if args.dense:
        try:
            state = torch.load(args.dense, map_location="cpu", weights_only=True)
            dense.load_state_dict(split_state_dict(state)[0])  # also takes an earlier pruned checkpoint
        except (OSError, RuntimeError, ValueError) as e:
            raise PruneError(f"--dense {args.dense!r}: cannot load it into the model ({e})") from e
    else:
        dense_cfg = TrainConfig(args.dense_epochs, args.lr, args.weight_decay, args.optimizer, args.batch_size,
                                seed=args.seed, progress=progress, desc="dense")
        finetune(dense, task.train_loader, task.val_loader, dense_cfg, loss_fn=task.loss_fn)
    dense_val, dense_test = evaluate(dense, task.val_loader), evaluate(dense, task.test_loader)
    teacher = dense if args.distill != "none" else None

    def trial(s):
        return run_trial(task, dense, s, prune_cfg, train_cfg, when=when, schedule=args.schedule, teacher=teacher)

    search_info = None
    if searching:
        threshold = dense_val - args.max_drop if args.max_drop is not None else args.min_accuracy
        if dense_val < threshold:
            raise PruneError(f"the dense model's validation accuracy {dense_val:.4f} is already below the "
                             f"target {threshold:.4f}")
        bar = None
        if progress:
            from tqdm.auto import tqdm
            bar = tqdm(total=args.max_trials, desc="search", unit="trial")

        def on_trial(t):
            if bar is not None:
                bar.update(1)
                bar.set_postfix(sparsity=f"{t.sparsity:.4f}", val=f"{t.val_accuracy:.4f}")
        result = search_sparsity(trial, threshold=threshold, max_sparsity=args.max_sparsity, tol=args.tol,
                                 max_trials=args.max_trials, on_trial=on_trial)
        if bar is not None:
            bar.close()
        trials = result.trials
        final = result.best
        if final is None:  # nothing met the target: the answer is the dense model, sparsity 0
            layers = prunable_layers(dense, tuple(args.skip))
            final_model, final_masks = dense, MaskSet({n: torch.ones_like(m.weight, dtype=torch.bool)
                                                       for n, m in layers.items()})
            final_val, final_test, final_target = dense_val, dense_test, 0.0
        else:
            final_model, final_masks = final.model, final.masks
            final_val, final_test, final_target = final.val_accuracy, final.test_accuracy, final.sparsity
        search_info = {"mode": "max-drop" if args.max_drop is not None else "min-accuracy",
                       "max_drop": args.max_drop, "min_accuracy": args.min_accuracy, "threshold": threshold,
                       "sparsity_found": final_masks.sparsity(), "target_sparsity_found": final_target,
                       "max_sparsity": args.max_sparsity, "tol": args.tol, "trials": len(trials)}
    else:
        final = trial(sparsity)
        trials = [final]
        final_model, final_masks = final.model, final.masks
        final_val, final_test, final_target = final.val_accuracy, final.test_accuracy, sparsity

    state = export_state_dict(final_model, final_masks, args.export_style)
    layers = {}
    for name, module in prunable_layers(final_model).items():
        w = module.weight
        layers[name] = {"shape": list(w.shape), "pruned": name in final_masks.masks,
                        "nnz": int((w != 0).sum()), "sparsity": float((w == 0).sum()) / w.numel()}
    total = sum(torch.Size(v["shape"]).numel() for v in layers.values())
    zeros = sum(torch.Size(v["shape"]).numel() - v["nnz"] for v in layers.values())
    report = {
        "format": "sparse-engine.prune-report/1",
        "checkpoint": Path(args.output).name,
        "export_style": args.export_style,
        "mask_keys": "<layer>.weight_mask beside <layer>.weight for every pruned layer",
        "architecture": describe_architecture(final_model, factory=args.model),
        "model": model_name,
        "command": "sparse-engine prune " + shlex.join(argv if argv is not None else _own_argv(args)),
        "config": {"method": args.method, "granularity": str(gran), "scope": args.scope,
                   "schedule": args.schedule, "when": when, "skip": list(args.skip),
                   "layer_sparsity": prune_cfg.layer_sparsity, "epochs": epochs,
                   "dense_epochs": None if args.dense else args.dense_epochs, "dense_checkpoint": args.dense,
                   "optimizer": args.optimizer, "lr": args.lr, "weight_decay": args.weight_decay,
                   "batch_size": args.batch_size, "distill": args.distill, "seed": args.seed,
                   "world_size": distributed.world_size()},
        "dense": {"val_accuracy": dense_val, "test_accuracy": dense_test},
        "final": {"target_sparsity": final_target, "sparsity": final_masks.sparsity(),
                  "model_sparsity": zeros / total if total else 0.0,
                  "val_accuracy": final_val, "test_accuracy": final_test, "layers": layers},
        "search": search_info,
        "steps": [t.summary() for t in trials],
        "seconds": round(time.time() - started, 2),
    }
    if args.save_every_rank and distributed.active():
        out = Path(args.output)
        torch.save(state, out.with_name(f"{out.stem}.rank{distributed.rank()}{out.suffix}"))
    if distributed.is_main():
        out = Path(args.output)
        out.parent.mkdir(parents=True, exist_ok=True)
        torch.save(state, out)
        json_path, png_path = report_paths(out)
        write_json(report, json_path)
        plot(report, png_path)
    return report


def run_hf(args) -> dict:
    """`--hf DIR`: the folder pipeline of hf.py."""
    from .hf import prune_folder
    if args.example or args.model or args.data or args.dense:
        raise PruneError("--hf takes no --example, --model, --data or --dense")
    if args.sparsity is None:
        raise PruneError("--hf needs --sparsity S (the accuracy search is for --example / --model)")
    method = args.method or "sparsegpt"
    if method not in CALIBRATED:
        raise PruneError(f"--hf --method {method!r}: folders are pruned with {', '.join(CALIBRATED)}")
    distributed.init_from_env()  # under torchrun: distillation runs data-parallel, rank 0 writes
    quiet = args.quiet or not distributed.is_main()
    log = (lambda _m: None) if quiet else (lambda m: print(m, file=sys.stderr, flush=True))
    return prune_folder(args.hf, args.output, method=method, granularity=args.granularity, sparsity=args.sparsity,
                        skip=args.skip, text=args.text, calib_samples=args.calib_samples, seq_len=args.seq_len,
                        val_sentences=args.val_sentences, distill_steps=args.distill_steps,
                        schedule=args.schedule or "oneshot", initial_sparsity=args.initial_sparsity,
                        prune_steps=args.prune_steps, every_rank=args.save_every_rank, log=log,
                        distill=dict(lr=args.distill_lr, lr_decay=args.distill_lr_decay, batch=args.distill_batch,
                                     eval_every=args.eval_every, time_budget=args.time_budget,
                                     layer_loss=args.layer_loss, seed=args.seed))


def main(args) -> int:
    threads = torch.get_num_threads()
    try:
        if args.threads < 0:
            raise PruneError(f"--threads must be >= 0, got {args.threads}")
        if args.threads:
            torch.set_num_threads(args.threads)
        if target.targeted(args):
            report = target.run_cli(args)
            if not args.quiet:
                print(f"plan for {report['budget_ms']:.3f} ms at batch {report['batch']}: predicted "
                      f"{report['predicted_ms']:.3f} ms, measured {report['measured_ms']:.3f} ms "
                      f"({report['measured_speedup']:.2f}x the engine's dense {report['dense_ms']:.3f} ms); quality "
                      f"{report['quality']['quality']:.4f} (dense {report['dense_quality']['quality']:.4f}); wrote "
                      f"{args.output}, {report['artifact']}, {target.side_path(Path(args.output), target.REPORT_SUFFIX)}")
            return 0
        if args.hf:
            report = run_hf(args)
            if not args.quiet and distributed.is_main():
                f = report["final"]
                print(f"pruned {report['method']} {report['granularity']} sparsity {report['measured_sparsity']:.4f}: "
                      f"cosine to dense {f['cosine_mean']:.4f}, NN agreement {f['nn_agreement']:.3f}; "
                      f"wrote {args.output}")
            return 0
        if args.initial_sparsity is not None or args.prune_steps is not None:
            raise PruneError("--initial-sparsity and --prune-steps are for --hf folders (--schedule gradual)")
        if args.method in HF_ONLY:
            raise PruneError(f"--method {args.method} prunes --hf folders; for --example / --model use the "
                             "Python API engine.prune.calibrate.calibrated_prune")
        report = run(args)
        main_rank = distributed.is_main()
    except PruneError as e:
        print(f"sparse-engine prune: error: {e}", file=sys.stderr)
        return 2
    finally:
        torch.set_num_threads(threads)  # callers in the same process (tests, scripts) keep theirs
        distributed.shutdown()
    if not args.quiet and main_rank:
        f, d = report["final"], report["dense"]
        found = "" if report["search"] is None else f" (search: {len(report['steps'])} trials, target val " \
                                                   f">= {report['search']['threshold']:.4f})"
        print(f"dense   val {d['val_accuracy']:.4f}  test {d['test_accuracy']:.4f}")
        print(f"pruned  val {f['val_accuracy']:.4f}  test {f['test_accuracy']:.4f}  sparsity "
              f"{f['sparsity']:.4f}{found}")
        json_path, png_path = report_paths(args.output)
        print(f"wrote {args.output}, {json_path}, {png_path}")
    return 0
