"""The cross-domain benchmark (benchmark.md): every pair, every method, every seed, from one YAML file.

spec.py reads the bench YAML; plan.py turns it into runs (a source model per task, source domain and seed, then per
pair, method and seed an adaptation, a source-only evaluation or a target-only training), each in a folder named by
identity.py's hash of its resolved config; run.py runs them and results.py records them in ``results.jsonl``, so
that re-running the same config skips finished runs and resumes unfinished ones; tables.py renders the report.
"""

from tmtseg.tools.bench.identity import HASH_VERSION, config_hash
from tmtseg.tools.bench.plan import Plan, Run, data_splits, plan, source_checkpoint
from tmtseg.tools.bench.results import describe, provenance, read_results, read_sessions, report
from tmtseg.tools.bench.run import execute, run_bench
from tmtseg.tools.bench.spec import ADAPT_METHODS, PACKAGED, REFERENCE_METHODS, BenchConfig, load_bench

# the renderer is tables.py, not report.py, so that `report` (results.report) is not shadowed by a module of that
# name. HASH_VERSION is a copy: patch it in tmtseg.tools.bench.identity, where config_hash reads it
__all__ = [
    "ADAPT_METHODS",
    "HASH_VERSION",
    "PACKAGED",
    "REFERENCE_METHODS",
    "BenchConfig",
    "Plan",
    "Run",
    "config_hash",
    "data_splits",
    "describe",
    "execute",
    "load_bench",
    "plan",
    "provenance",
    "read_results",
    "read_sessions",
    "report",
    "run_bench",
    "source_checkpoint",
]
