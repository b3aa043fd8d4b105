"""Ray execution of a scan. Only this package imports ray.

    summary = run_scan(manifest_uri, out_uri, config)        # a local Ray instance by default
"""
from xray.runner.scan_run import ClusterUnreachable, RunSummary, run_scan  # noqa: F401
