"""``python -m benchmarks run [--quick]``: measure, then write ``benchmarks/results/<date>-<host>``;
``python -m benchmarks report <json>`` renders a run's markdown again."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from benchmarks import report
from benchmarks.runner import RESULTS_DIR, Plan, run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks")
    commands = parser.add_subparsers(dest="command", required=True)
    cmd = commands.add_parser("run", help="run every system at every load level and report")
    cmd.add_argument("--quick", action="store_true",
                     help="two rounds of a few hundred requests per cell (minutes, noisy)")
    cmd.add_argument("--repeats", type=int, help="interleaved rounds (default 2 quick, 3 full)")
    cmd.add_argument("--requests", type=int, dest="max_requests", help="at most, per cell")
    cmd.add_argument("--duration", type=float, dest="duration_s", help="seconds, at most, per cell")
    cmd.add_argument("--levels", type=lambda s: tuple(int(x) for x in s.split(",")),
                     help="concurrency levels, comma-separated (default 1,16,64)")
    cmd.add_argument("--token-delay-ms", type=float, help="upstream delay per token (default 1)")
    cmd.add_argument("--systems", type=lambda s: tuple(s.split(",")),
                     help=f"comma-separated subset of {','.join(report.SYSTEM_ORDER)}")
    cmd.add_argument("--no-memory-bench", dest="memory", action="store_false", default=None,
                     help="skip benchmarks/memory.py")
    cmd.add_argument("--out", type=Path, default=RESULTS_DIR, help="where results are written")
    again = commands.add_parser("report", help="write the markdown of a results JSON again")
    again.add_argument("json", type=Path)
    args = parser.parse_args(argv)
    if args.command == "report":
        print(report.rerender(args.json), file=sys.stderr)
        return 0
    overrides = {k: getattr(args, k) for k in ("repeats", "max_requests", "duration_s", "levels",
                                              "token_delay_ms", "systems", "memory")}
    md, js = run(Plan.make(args.quick, **overrides), args.out)
    print(md.read_text().split("\n## Machine")[0])
    print(f"written: {md} and {js}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
