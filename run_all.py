#!/usr/bin/env python
"""Run the four perturbnmf notebooks with one YAML of parameters and render the reports.

    python run_all.py [PARAMS.yaml] [--only STEP] [--from STEP] [--debug]

Without PARAMS.yaml the demo (params/demo.yaml: a simulated screen with known truth) runs.
The YAML is checked against the parameter schema before anything runs: unknown keys, wrong
types and out-of-range values are errors. Relative paths in it are relative to this
repository. Outputs: reports/<run_name>/index.html, one HTML per step, data/.

A run is written to a temporary folder next to the report (.<run_name>.running-<pid>) and
replaces reports/<run_name>/ only when every step succeeded. A failed or interrupted run
leaves the previous report untouched and is kept as <run_name>.failed-<timestamp>/ with
ERROR.txt. --from and --only start from a copy of the previous complete run, after
checking that its parameters and input files match the current ones.

Exit status: 0 complete, 1 a step failed, 2 refused (parameters, input or run folder),
128 + N interrupted by signal N. The work is done by perturbnmf.report.runner.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

DEFAULT_PARAMS = Path(__file__).resolve().parent / "params" / "demo.yaml"


def parse_args(argv: list[str]) -> argparse.Namespace:
    from perturbnmf.report.runfolder import STEPS

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("params", nargs="?", default=str(DEFAULT_PARAMS), help="YAML parameter file (default: the demo)")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--only", choices=STEPS,
                       help="run just this step, on the saved outputs of the earlier steps of the complete run")
    which.add_argument("--from", dest="start", choices=STEPS,
                       help="run this step and the ones after it, on the saved outputs of the earlier steps")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    from perturbnmf.report.runner import run

    return run(args.params, only=args.only, start=args.start, debug=args.debug, argv=argv)


if __name__ == "__main__":
    sys.exit(main())
