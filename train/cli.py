"""`regionbert-pretrain CONFIG [--set section.key=value ...]`: pretrain from a TOML or JSON config.

    regionbert-pretrain export RUN -o DIR         the run as a Hugging Face model folder (train/export.py)
    regionbert-pretrain score RUN_OR_DIR --shards S --captions C -o scores.csv
                                                  one ITM match score per caption row (train/infer.py)

A config file ends in .toml or .json, so the words export and score never name one."""

from __future__ import annotations

import argparse
import json
import sys

from regionbert.data import ShardError

from .config import load_config
from .loop import NonFiniteLoss
from .run import prepare, run

SUBCOMMANDS = ("export", "score")


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in SUBCOMMANDS:
        return subcommand(argv[0], argv[1:])
    p = argparse.ArgumentParser(
        prog="regionbert-pretrain", description="Pretrain a single-stream multimodal BERT on region shards and "
        "captions (MLM, MRFR, MRC, MRC-kl, ITM + WRA). The resolved config is written to RUN/config.json. "
        "Under torchrun (torchrun --nproc_per_node N -m regionbert.train.cli ...) it trains on N processes.")
    p.add_argument("config", nargs="?", help="a .toml or .json config (sections model, data, tasks, optim, run); "
                   "or the subcommand export (RUN -o DIR: a Hugging Face model folder) or score (RUN_OR_DIR "
                   "--shards S --captions C -o scores.csv); see `regionbert-pretrain export --help`")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a setting, e.g. --set model.num_layers=2 --set tasks.mix.mrc=0.1 (JSON values)")
    p.add_argument("--out", help="run folder (same as --set run.out=...)")
    p.add_argument("--resume", nargs="?", const="latest", metavar="latest|CHECKPOINT",
                   help="continue a run: 'latest' (RUN/checkpoint.pt; from scratch if the run has none yet, so the "
                   "same command restarts a preempted job) or a checkpoint file")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("--prepare-only", action="store_true", help="build the tokenized captions tables of data.split "
                   "and data.eval_split (beside the manifest, or in data.captions_cache) and exit: a job's ranks then "
                   "start by reading them")
    args = p.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides + ([f"run.out={args.out}"] if args.out else []))
        if args.print_config:
            print(json.dumps(cfg.to_dict(), indent=1))
            return 0
        if args.prepare_only:
            for line in prepare(cfg):
                print(f"regionbert-pretrain: captions table {line}")
            return 0
        run(cfg, resume=args.resume)
    except (ValueError, KeyError, FileNotFoundError, ShardError) as e:
        print(f"regionbert-pretrain: error: {e.args[0] if isinstance(e, KeyError) else e}", file=sys.stderr)
        return 2
    except NonFiniteLoss as e:
        print(f"regionbert-pretrain: error: {e}", file=sys.stderr)
        return 1
    return 0


def subcommand(name: str, argv: list[str]) -> int:
    """`export` and `score`: exit 0, or 2 with one line naming the file at fault."""
    from .export import export
    from .infer import Model, score_manifest

    if name == "export":
        p = argparse.ArgumentParser(prog="regionbert-pretrain export", description="Write a run's newest checkpoint "
                                    "as a model folder that transformers loads (AutoModel / AutoModelForPreTraining, "
                                    "trust_remote_code=True) and regionbert.train.infer loads without transformers: "
                                    "model.safetensors, config.json, the model code, the tokenizer, a model card.")
        p.add_argument("run", help="a run folder (its checkpoint.pt) or a checkpoint file")
        p.add_argument("-o", "--out", required=True, help="the folder to write (must not exist)")
        p.add_argument("--tokenizer", help="the run's vocab.txt or tokenizer.json, if its config's path is gone")
    else:
        p = argparse.ArgumentParser(prog="regionbert-pretrain score", description="Score every caption of a "
                                    "manifest against its image's regions with the ITM head: a CSV with image_id, "
                                    "caption, score (logit(match) - logit(no match)) and match_prob, one row per "
                                    "caption, in the manifest's order.")
        p.add_argument("model", help="an exported folder, a run folder or a checkpoint file")
        p.add_argument("--shards", nargs="+", required=True, help="shard folders, folders of shards or index files")
        p.add_argument("--captions", required=True, help="manifest: image_id, caption[, split]")
        p.add_argument("--split", help="score only the manifest's rows of this split")
        p.add_argument("-o", "--out", required=True, help="the CSV to write")
        p.add_argument("--batch-size", type=int, default=64)
        p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
        p.add_argument("--tokenizer", help="a vocab.txt or tokenizer.json instead of the model's")
    args = p.parse_args(argv)
    try:
        if name == "export":
            out = export(args.run, args.out, args.tokenizer)
            print(f"regionbert-pretrain export: {out}")
            return 0
        from regionbert.data import ShardSet

        if args.batch_size < 1:
            raise ValueError(f"--batch-size {args.batch_size}: must be >= 1")
        model = Model.load(args.model, args.device, args.tokenizer)
        n = score_manifest(model, ShardSet(args.shards), args.captions, args.out, args.split, args.batch_size)
        print(f"regionbert-pretrain score: {n} captions scored -> {args.out}")
    except (ValueError, KeyError, FileNotFoundError, ShardError) as e:
        print(f"regionbert-pretrain {name}: error: {e.args[0] if isinstance(e, KeyError) else e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
