"""``python -m perturbnmf.report params [--write]``: check (or rewrite) the notebooks' parameters
cells and README's parameter table against the parameter schema."""

import sys

from .params import main

if sys.argv[1:2] != ["params"]:
    sys.exit("usage: python -m perturbnmf.report params [--write]")
sys.exit(main(sys.argv[2:]))
