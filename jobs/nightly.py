"""Nightly regression over a model zoo, as a Ray job (a thin wrapper over xray.nightly).

    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python jobs/nightly.py --state s3://bucket/xray-nightly --recipe demo \
            --config manifests/configs/demo.yaml

Rebuilds the zoo only when its recipe changed (by recipe digest), scans it with the current code
(models already scored by this code and config are skipped), compares with the last accepted
baseline, and writes report.html and comparison.{txt,md,json} under <state>/nights/<night id>/.
The baseline moves only with --accept (this night) or --accept-night ID (a past night, no scan).

Exit status: 0 clean or no baseline yet, 1 regression, 2 usage error. See jobs/README.md.
"""
from __future__ import annotations

import argparse
import logging
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="jobs/nightly.py", description=__doc__.split("\n")[0])
    parser.add_argument("--state", required=True, metavar="URI",
                        help="Folder holding the zoo, scans, nights and the baseline pointer.")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--recipe", metavar="FILE|NAME", help="Zoo recipe (built under --state).")
    source.add_argument("--manifest", metavar="URI", help="Scan this manifest / round as it is.")
    parser.add_argument("--config", metavar="FILE", help="Scan config YAML (default: modelxray).")
    parser.add_argument("--preset", help="Preset for every detector that has it (e.g. small).")
    parser.add_argument("--tolerances", metavar="FILE", help="Comparison tolerances YAML / JSON.")
    parser.add_argument("--accept", action="store_true",
                        help="Make this night's scan the baseline once it is done.")
    parser.add_argument("--accept-night", metavar="ID",
                        help="Only move the baseline to night ID ('latest' = newest); no scan.")
    parser.add_argument("--rescan", choices=["code", "config"], default="code",
                        help="What starts a fresh full scan: any code change (default) or only "
                             "detector versions / configs.")
    parser.add_argument("--address", help="Ray address (default: the job's cluster, or local).")
    parser.add_argument("--workers", type=int, help="Training processes for a zoo rebuild.")
    parser.add_argument("--drilldown", type=int, default=None,
                        help="Drill-down models in the report (default: the report's default).")
    parser.add_argument("--quiet", action="store_true", help="No progress bars.")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")

    from xray import nightly
    from xray.config import load_config, with_preset
    from xray.reduce.compare import CompareUsageError, load_tolerances

    if args.accept_night:
        pointer = nightly.accept_night(args.state, args.accept_night)
        print(f"baseline: night {pointer['night_id']} ({pointer['scan_uri']})")
        return 0
    if not (args.recipe or args.manifest):
        parser.error("one of --recipe and --manifest is required (or --accept-night)")
    try:
        config = load_config(args.config)
        if args.preset:
            config = with_preset(config, args.preset)
        tolerances = load_tolerances(args.tolerances)
    except (CompareUsageError, ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    report = {} if args.drilldown is None else {"max_drilldown": args.drilldown}
    night = nightly.run_nightly(args.state, recipe=args.recipe, manifest=args.manifest,
                                config=config, tolerances=tolerances, accept=args.accept,
                                rescan=args.rescan, address=args.address, workers=args.workers,
                                report=report, show_progress=not args.quiet)
    print(nightly.describe(night))
    return night.exit_code


if __name__ == "__main__":
    sys.exit(main())
