"""`ray job submit ... -- python jobs/score_round.py --manifest URI --out URI [scan options]`

Score a round on the cluster the job runs on: the same options as `xray scan`, connecting to
the job's cluster (address "auto") unless --address says otherwise.
"""
import sys

from xray.cli import main

if __name__ == "__main__":
    args = sys.argv[1:]
    if "--address" not in args:
        args += ["--address", "auto"]
    sys.exit(main(["scan", *args]))
