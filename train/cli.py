"""`regionbert-pretrain CONFIG [--set section.key=value ...]`: pretrain from a TOML or JSON config."""

from __future__ import annotations

import argparse
import json
import sys

from regionbert.data import ShardError

from .config import load_config
from .loop import NonFiniteLoss
from .run import run


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="regionbert-pretrain", description="Pretrain a single-stream multimodal BERT on region shards and "
        "captions (MLM, MRFR, MRC, MRC-kl, ITM + WRA). The resolved config is written to RUN/config.json. "
        "Under torchrun (torchrun --nproc_per_node N -m regionbert.train.cli ...) it trains on N processes.")
    p.add_argument("config", nargs="?", help="a .toml or .json config (sections model, data, tasks, optim, run)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a setting, e.g. --set model.num_layers=2 --set tasks.mix.mrc=0.1 (JSON values)")
    p.add_argument("--out", help="run folder (same as --set run.out=...)")
    p.add_argument("--resume", nargs="?", const="latest", metavar="latest|CHECKPOINT",
                   help="continue a run: 'latest' (RUN/checkpoint.pt; from scratch if the run has none yet, so the "
                   "same command restarts a preempted job) or a checkpoint file")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    args = p.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides + ([f"run.out={args.out}"] if args.out else []))
        if args.print_config:
            print(json.dumps(cfg.to_dict(), indent=1))
            return 0
        run(cfg, resume=args.resume)
    except (ValueError, KeyError, FileNotFoundError, ShardError) as e:
        print(f"regionbert-pretrain: error: {e.args[0] if isinstance(e, KeyError) else e}", file=sys.stderr)
        return 2
    except NonFiniteLoss as e:
        print(f"regionbert-pretrain: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
