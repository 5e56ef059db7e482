"""`sparse-engine` (also `python -m engine`): one verb per step of the pipeline.

Each verb lives in its own module, which defines `configure(parser)` and `main(args) -> int`; the
module is imported only when its verb runs, so `sparse-engine --help` stays fast."""
from __future__ import annotations

import argparse
import importlib
import sys

from .version import __version__

VERBS = {
    "prune": ("engine.prune.cli", "prune + fine-tune a built-in example, a model given by import path, or a HF encoder folder"),
    "profile": ("engine.prune.profile_cli", "measure each layer's latency and sensitivity per format and sparsity; "
                "allocate per-layer sparsity under a latency budget"),
    "convert": ("engine.convert", "pruned checkpoint -> verified sparse artifact"),
    "keygen": ("engine.signing", "write an Ed25519 key pair to sign (convert --sign-key) and verify artifacts"),
    "inspect": ("engine.inspect", "per-layer table of an artifact: format, block, sparsity, bytes, speedup"),
    "run": ("engine.runtime", "offline inference: .npy in, .npy or JSON out"),
    "serve": ("engine.serve.server", "Open Inference Protocol v2 server (HTTP, and gRPC with --grpc-port) with dynamic batching; "
              "--ray N: N replicas on Ray Serve"),
    "bench": ("engine.bench", "speed comparison against dense torch and torch.sparse; --peers: whole models against ONNX Runtime and DeepSparse"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sparse-engine",
        description="Prune, convert, run, serve and benchmark sparse neural networks on custom kernels.",
        epilog="`sparse-engine VERB --help` lists a verb's options.")
    parser.add_argument("--version", action="version", version=f"sparse-engine {__version__}")
    sub = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    for verb, (_, help_text) in VERBS.items():
        sub.add_parser(verb, help=help_text, description=help_text, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in VERBS:
        build_parser().parse_args(argv)  # prints usage / help / the error, and exits
        return 2
    verb, rest = argv[0], argv[1:]
    module = importlib.import_module(VERBS[verb][0])
    parser = argparse.ArgumentParser(prog=f"sparse-engine {verb}", description=VERBS[verb][1])
    module.configure(parser)
    return int(module.main(parser.parse_args(rest)) or 0)


if __name__ == "__main__":
    sys.exit(main())
