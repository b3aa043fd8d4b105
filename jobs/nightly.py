"""`ray job submit ... -- python jobs/nightly.py --state URI --recipe FILE|NAME [options]`

The nightly regression over a model zoo: `xray nightly` (a thin wrapper over
xray.nightly.run_nightly) with the same options, logging at INFO level for the job's log. Exit 0
clean or no baseline yet, 1 on a regression, 2 on a usage error. See jobs/README.md.
"""
import sys

from xray.cli import main

if __name__ == "__main__":
    sys.exit(main(["-v", "nightly", *sys.argv[1:]]))
