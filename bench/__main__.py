"""``python -m bench [NAME ...]``: run the benchmarks (all by default) and print their figures."""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

BENCHES = ("freeze", "pendulum", "pendulum_seeds", "updates", "memory", "stability", "diverge", "carla", "causes",
           "checkpoint", "report", "wire", "fleet")
# Run only when named (`python -m bench soak`, `make soak`): at least 20 minutes.
ON_REQUEST = ("soak",)


def main() -> int:
    parser = argparse.ArgumentParser(prog="bench")
    parser.add_argument("names", nargs="*", default=list(BENCHES),
                        help=f"benchmarks to run: {', '.join(BENCHES)} (default: all of them); "
                             f"{', '.join(ON_REQUEST)} only when named")
    parser.add_argument("--out", type=Path, default=Path("bench/results"), help="where JSON results go")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    for name in args.names:
        if name not in BENCHES + ON_REQUEST:
            parser.error(f"unknown benchmark {name!r}; choose from {', '.join(BENCHES + ON_REQUEST)}")
        module = __import__(f"bench.{name.split('_')[0]}", fromlist=["run"])
        print(f"== {name}", flush=True)
        result = module.run_seeds() if name == "pendulum_seeds" else module.run()
        (args.out / f"{name}.json").write_text(json.dumps(result, indent=2))
    return 0


sys.exit(main())
