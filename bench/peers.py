"""Whole pruned models against their peers: `python bench/peers.py [options]` is
`sparse-engine bench --peers [options]` (the code and its documentation: engine/peers.py).

    PYTHONPATH=. .venv/bin/python bench/peers.py --threads 2 --deepsparse-python ~/.venvs/deepsparse/bin/python
"""
import sys

from engine.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["bench", "--peers", *sys.argv[1:]]))
