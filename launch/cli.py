"""The `unroll` command line."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any


def _emit(text: str) -> None:
    """print() for listings that are often piped into `head`: a reader that leaves early is no error."""
    try:
        print(text, flush=True)
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the flush at exit does not fail too


class UsageError(Exception):
    """A command line that parses but cannot run (e.g. no config); printed with the command's usage."""


def _print_keys(args) -> int:
    """Every config key with its type and default, or with the value CONFIG and the overrides give it."""
    from unroll.train.config import Config, load_config
    from unroll.train.config_keys import config_keys, format_keys

    given = bool(args.config or args.overrides)
    _emit(
        format_keys(
            config_keys(load_config(args.config, args.overrides) if given else Config()),
            "value" if given else "default",
        )
    )
    return 0


def _train(args) -> int:
    from unroll.train.config import load_config

    if args.keys:
        return _print_keys(args)
    if not args.config:
        raise UsageError("the following arguments are required: config (a preset or YAML file; `unroll presets`)")
    cfg = load_config(args.config, args.overrides)  # a config's mistakes answer before torch is imported
    from unroll.train.trainer import train

    summary = train(cfg)
    code = 128 + 15 if summary.get("stopped") else 0
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # One of several ranks, its process group already ended (the trainer's close): leave without the
        # interpreter's teardown, where a gloo rank was seen to abort ("terminate called without an active
        # exception", SIGABRT) after finishing its work, which made a completed SLURM job FAILED.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def _train_epilog() -> str:
    """The presets and the config's sections (for --help only)."""
    import dataclasses
    import textwrap

    from unroll.train.config import Config, preset_names

    fill: dict[str, Any] = dict(width=100, subsequent_indent="  ", break_on_hyphens=False)
    return "\n".join(
        [
            textwrap.fill("presets: " + ", ".join(preset_names()) + " (`unroll presets`: sizes and hardware)", **fill),
            textwrap.fill("config sections: " + ", ".join(f.name for f in dataclasses.fields(Config)), **fill),
            textwrap.fill(
                "every key with its type and default: `unroll train --keys`; a config's values: "
                "`unroll train CONFIG [key=value ...] --keys`",
                **fill,
            ),
        ]
    )


class _TrainHelp(argparse.Action):
    """-h/--help for train: the usual help, then the presets and the config's sections."""

    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, help="show this help and exit")

    def __call__(self, parser, namespace, values, option_string=None):
        parser.epilog = _train_epilog()
        parser.print_help()
        parser.exit()


def _presets(args) -> int:
    import json

    from unroll.launch.presets import format_presets, preset_rows

    rows = preset_rows()
    _emit(json.dumps(rows, indent=2) if args.json else format_presets(rows))
    return 0


def _info(args) -> int:
    import json

    from unroll.models.flops import format_flops, model_flops
    from unroll.models.summary import format_summary, summarize
    from unroll.train.config import load_config

    if args.keys:
        return _print_keys(args)
    if not args.config:
        return _presets(args)
    cfg = load_config(args.config, args.overrides)
    summary, flops = summarize(cfg.model), model_flops(cfg.model, cfg.data.seq_len)
    if args.json:
        _emit(json.dumps(summary | {"flops": flops.as_dict()}, indent=2))
    else:
        _emit(format_summary(args.config, summary) + "\n\n" + format_flops(flops))
    return 0


def _plan(args) -> int:
    from unroll.train.config import load_config
    from unroll.train.planning import plan as P

    overrides = list(args.overrides)
    if args.seq_len:
        overrides.append(f"data.seq_len={args.seq_len}")
    if args.micro_batch:
        overrides.append(f"train.micro_batch_size={args.micro_batch}")
    cfg = load_config(args.config, overrides)
    world = args.nodes * args.gpus_per_node
    print(P.__doc__.split("\n\n", 1)[1].rstrip())
    print(
        f"\n{args.config}: {args.nodes} node(s) × {args.gpus_per_node} GPUs of {args.gpu_gib:g} GiB, "
        f"sequence {cfg.data.seq_len}, batch {cfg.train.batch_size}, micro-batch "
        f"{cfg.train.micro_batch_size or 'batch / data ranks (split per pipeline stage when pp > 1)'}, "
        f"activation checkpointing {cfg.train.activation_checkpoint}, loss chunk {cfg.train.loss_chunk}"
    )
    fits = P.plan(cfg, nodes=args.nodes, gpus_per_node=args.gpus_per_node, gpu_gib=args.gpu_gib)
    if not fits:
        print(
            f"no layout on {world} GPUs fits 90% of {args.gpu_gib:g} GiB; more GPUs, a shorter sequence, "
            f"a smaller micro-batch or train.activation_checkpoint=full"
        )
        return 1
    print("layouts that fit 90% of the memory, least model parallelism first (GiB):")
    for e in fits[: args.top]:
        print("  " + P.format_estimate(e))
    best = fits[0].layout
    print(
        "recommended: "
        + " ".join(f"parallel.{k}={getattr(best, k)}" for k in ("pp", "dp_replicate", "dp_shard", "cp", "tp", "ep"))
    )
    if cfg.parallel.engine == "deepspeed":  # a rehearsal runs the torch engine's program
        print(
            f"(parallel.engine=deepspeed, ZeRO-{cfg.deepspeed.zero_stage}: `unroll rehearse` runs the torch engine only)"
        )
        return 0
    print(
        f"check it before queueing: unroll rehearse {args.config} --nodes {args.nodes} "
        f"--gpus-per-node {args.gpus_per_node} data.seq_len=256 "
        + " ".join(
            f"parallel.{k}={getattr(best, k)}" for k in ("pp", "dp_shard", "cp", "tp", "ep") if getattr(best, k) > 1
        )
    )
    return 0


def _rehearse(args) -> int:
    import json

    from unroll.train.planning.rehearse import format_rehearsal, rehearse, to_json

    r = rehearse(
        args.config,
        args.overrides,
        nodes=args.nodes,
        gpus_per_node=args.gpus_per_node,
        rank=args.rank,
        steps=args.steps,
        microbatches=args.microbatches,
    )
    text = json.dumps(to_json(r), indent=1) if args.json else format_rehearsal(args.config, r)
    if args.out:  # under torchrun every rank rehearses itself: one file each
        Path(args.out.format(rank=r.rank)).write_text(text + "\n")
    else:
        print(text)
    return 0


def _tokenizer(args) -> int:
    if args.kind == "hf-bpe":
        if args.model_type is not None or args.seed is not None:
            raise UsageError("--model-type and --seed are sentencepiece's: --kind hf-bpe reads every document")
        from unroll.data.hf_bpe import train_hf_bpe

        path = train_hf_bpe(args.input, args.out, args.vocab_size, text_key=args.text_key)
    else:
        from unroll.data.sentencepiece_tokenizer import train_tokenizer

        path = train_tokenizer(
            args.input,
            args.out,
            args.vocab_size,
            model_type=args.model_type or "bpe",
            text_key=args.text_key,
            seed=args.seed or 0,
        )
    print(f"tokenizer written to {path}")
    return 0


def _prepare(args) -> int:
    import time

    from tqdm import tqdm

    from unroll.data.tokenizer import load_tokenizer

    started = time.perf_counter()
    sources = args.input[0] if len(args.input) == 1 else args.input
    tokenizer = load_tokenizer(args.tokenizer, eos_token=args.eos_token)
    common = dict(valid_fraction=args.valid_fraction, seed=args.seed, workers=args.workers, text_key=args.text_key)
    if args.shard_tokens is None and args.shard_size is None:
        from unroll.data.prepare import prepare_shards

        meta = prepare_shards(sources, tokenizer, args.out, progress=None, **common)["meta"]
        counts = {split: (meta[split]["docs"], meta[split]["tokens"]) for split in ("train", "valid")}
        written = f"shards written to {args.out}"
    else:
        from unroll.data.prepare_dir import prepare_directory, tokens_per_shard

        shard_tokens = args.shard_tokens or tokens_per_shard(args.shard_size, tokenizer)
        manifest = prepare_directory(
            sources,
            tokenizer,
            args.out,
            shard_tokens=shard_tokens,
            progress=None,
            log=lambda line: tqdm.write(line, file=sys.stderr),
            **common,
        )
        totals = manifest["totals"]
        counts = {split: (totals[split]["docs"], totals[split]["tokens"]) for split in ("train", "valid")}
        written = f"{totals['train']['shards']} train and {totals['valid']['shards']} valid shards in {args.out}"
    seconds = time.perf_counter() - started
    print(
        f"{written}: "
        + ", ".join(f"{split} {docs} docs / {tokens:,} tokens" for split, (docs, tokens) in counts.items())
        + f" ({seconds:.1f} s)"
    )
    return 0


def _generate(args) -> int:
    from unroll.train.lifecycle.inference import generate_text

    print(
        generate_text(
            args.run_dir,
            args.prompt,
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            top_k=args.top_k,
            seed=args.seed,
        )
    )
    return 0


def _export(args) -> int:
    from unroll.train.lifecycle.export import export

    meta = export(args.checkpoint, args.out, fmt=args.format, dtype=args.dtype)
    print(f"exported step {meta['step']} to {meta['out']} ({meta['layout']} layout, {meta['dtype']})")
    return 0


def _import(args) -> int:
    from unroll.train.lifecycle.export import import_export

    done = import_export(args.export, args.out, config=args.config, overrides=args.overrides, step=args.step)
    raised = done["steps_raised_from"]
    why = (
        f"; train.steps raised from {raised}, which the export had reached: add train.steps=N to choose another end"
        if raised is not None
        else ""
    )
    print(
        f"checkpoint {done['checkpoint']} written; `unroll train {done['out']}/config.yaml` continues from "
        f"step {done['step']} to step {done['steps']} (fresh optimizer state{why})"
    )
    return 0


def _plot(args) -> int:
    from unroll.train.plot import plot_run

    print(plot_run(args.run_dir, args.out))
    return 0


def _grow(args) -> int:
    from unroll.train.config import ConfigError
    from unroll.train.lifecycle import grow as G

    if args.plan:
        if args.params is None or args.tokens is None:
            raise ConfigError("--plan needs --params N and --tokens D (e.g. --params 7B --tokens 2T)")
        print(G.plan_text(G.parse_count(args.params, "--params"), G.parse_count(args.tokens, "--tokens")))
        return 0
    if args.checkpoint is None or args.out is None:
        raise ConfigError("unroll grow CHECKPOINT --factor G --out DIR (or --plan --params N --tokens D)")
    done = G.grow(args.checkpoint, args.factor, args.out, args.overrides)
    print(
        f"grown {done['pattern'][0]!r} → {done['pattern'][1]!r} ({done['params'][0]:,} → {done['params'][1]:,} "
        f"parameters) from {done['source']} (step {done['source_step']}); fresh optimizer, step 0, data from "
        f"sample {done['samples_consumed']:,}\ncontinue with: unroll train {Path(args.out) / 'config.yaml'}"
    )
    return 0


# name: (module whose main(argv) runs it, one line for `unroll bench --help`)
BENCHES = {
    "attention": (
        "unroll.launch.bench.attention",
        "attention over isolated documents: flex_attention's tile mask and SDPA's dense mask against causal",
    ),
    "checkpoint": ("unroll.launch.bench.checkpoint", "checkpoint save and load against the disk's own speed"),
    "data": (
        "unroll.launch.bench.data",
        "prepare against the tokenizer and Megatron, its memory at 10 MB and 1 GB, the loader against memmap",
    ),
    "growth": ("unroll.launch.bench.growth", "G_stack growth and training on against the deep model from scratch"),
    "loader": ("unroll.launch.bench.loader", "loader reads in the Feistel vs numpy order; the map's cost; prefetch"),
    "m2rnn": ("unroll.launch.bench.m2rnn", "the M²RNN recurrence's Triton kernels against the PyTorch loop"),
    "prepare": (
        "unroll.launch.bench.prepare",
        "`unroll data prepare` tokens/s with 1, 2 workers against the tokenizer",
    ),
    "seqpar": ("unroll.launch.bench.seqpar", "sequence-parallel Newton on 2 ranks against 1 rank, weak scaling"),
    "solver": ("unroll.launch.bench.solver", "sequential loop vs Newton (PyTorch and Triton scans) on recurrences"),
    "state-tracking": (
        "unroll.launch.bench.state_tracking",
        "parity and S5 past the trained length: each model family against attention",
    ),
    "throughput": ("unroll.launch.bench.throughput", "training tokens/s of presets as ratios to a baseline preset"),
    "tnt": ("unroll.launch.bench.tnt", "a TNT memory layer's throughput against chunkwise Titans"),
    "zero-offload": (
        "unroll.launch.bench.zero_offload",
        "memory per rank of DeepSpeed ZeRO-3 with CPU offload against FSDP2, 2 ranks, a ~110M model",
    ),
}
CHECKS = {
    "kernels": ("unroll.launch.triton_aot", "every Triton kernel compiled for a CUDA GPU (default sm_90) without one"),
}
LAUNCHERS = {
    "local": ("unroll.launch.local", "`unroll train` under torchrun on this machine: per-rank logs, restarts"),
    "slurm": ("unroll.launch.slurm", "write (and submit) an sbatch job: torchrun on every node"),
}


def _run_module(args) -> int:
    import importlib

    return importlib.import_module(args.table[args.name][0]).main(args.rest)


def _add_module_command(sub, command: str, summary: str, table: dict) -> None:
    """`unroll launch|bench NAME ...`: everything after NAME, --help included, goes to that module's own
    parser (argparse's REMAINDER takes it before this parser's -h can); `unroll launch|bench --help` lists
    the names, one line each."""
    width = max(map(len, table))
    listing = "\n".join(f"  {name:<{width}}  {line}" for name, (_, line) in table.items())
    one = sub.add_parser(
        command, help=summary, formatter_class=argparse.RawDescriptionHelpFormatter, epilog=f"NAME, one of:\n{listing}"
    )
    one.add_argument("name", choices=list(table), metavar="NAME", help="one of those listed below")
    one.add_argument("rest", nargs=argparse.REMAINDER, help=f"its own options (`unroll {command} NAME --help`)")
    one.set_defaults(func=_run_module, table=table)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("unroll")
    except PackageNotFoundError:
        return "(not installed)"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="unroll",
        description=__doc__,
        epilog=(
            "start with `unroll presets`, then `unroll train tiny-gru` (`make run` prepares its data first); "
            "`unroll COMMAND --help` for each command, `unroll train --keys` for every config key"
        ),
    )
    p.add_argument("--version", action="version", version=f"unroll {_version()}")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser(
        "train",
        help="train (or resume) a model; also under torchrun",
        add_help=False,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    t.add_argument("-h", "--help", action=_TrainHelp)
    t.add_argument("config", nargs="?", help="a YAML config file or a preset name (`unroll presets`)")
    t.add_argument("overrides", nargs="*", default=[], metavar="key=value", help="e.g. train.steps=100 run.dir=runs/x")
    t.add_argument(
        "--keys",
        action="store_true",
        help="print every config key with its type and default (with CONFIG: its value) and exit",
    )
    t.set_defaults(func=_train)

    i = sub.add_parser(
        "info",
        help="parameter counts (total, active), per-layer state and training FLOPs per token of a config; "
        "without one, the presets",
    )
    i.add_argument("config", nargs="?", help="a YAML config file or a preset name; none: `unroll presets`")
    i.add_argument("overrides", nargs="*", default=[], metavar="key=value")
    i.add_argument("--json", action="store_true", help="print the figures as JSON")
    i.add_argument("--keys", action="store_true", help="as `unroll train --keys`")
    i.set_defaults(func=_info)

    ps = sub.add_parser("presets", help="the bundled presets: parameters, shape and intended hardware")
    ps.add_argument("--json", action="store_true", help="print the table as JSON")
    ps.set_defaults(func=_presets)

    pn = sub.add_parser("plan", help="per-GPU memory on paper and the parallel layouts that fit")
    pn.add_argument("config", help="a YAML config file or a preset name (see configs/)")
    pn.add_argument("overrides", nargs="*", default=[], metavar="key=value")
    pn.add_argument("--nodes", type=int, required=True)
    pn.add_argument("--gpus-per-node", type=int, required=True)
    pn.add_argument("--gpu-gib", type=float, default=80.0)
    pn.add_argument("--seq-len", type=int, default=0, help="default: the config's data.seq_len")
    pn.add_argument(
        "--micro-batch",
        type=int,
        default=0,
        help="sequences per GPU per forward (default: the config's train.micro_batch_size)",
    )
    pn.add_argument("--top", type=int, default=5)
    pn.set_defaults(func=_plan)

    rh = sub.add_parser(
        "rehearse",
        help="one rank of an N×G job run for real on this CPU (fake process group): "
        "memory per component beside unroll plan's, collective bytes, checkpoint size",
    )
    rh.add_argument("config", help="a YAML config file or a preset name (see configs/)")
    rh.add_argument(
        "overrides",
        nargs="*",
        default=[],
        metavar="key=value",
        help="e.g. data.seq_len=256 (figures are extrapolated to the config's own length)",
    )
    rh.add_argument("--nodes", type=int, required=True)
    rh.add_argument("--gpus-per-node", type=int, required=True)
    rh.add_argument("--rank", type=int, default=0, help="which rank's program to run (default 0)")
    rh.add_argument("--steps", type=int, default=1, help="training steps to run (default 1)")
    rh.add_argument(
        "--microbatches",
        type=int,
        default=0,
        help="micro-batches per step (default: 1, or the pipeline schedule's stages)",
    )
    rh.add_argument("--json", action="store_true", help="print the figures as JSON")
    rh.add_argument("--out", default="", help="write the report to this file instead ({rank} is replaced)")
    rh.set_defaults(func=_rehearse)

    d = sub.add_parser("data", help="tokenizer training and corpus preparation").add_subparsers(
        dest="data", required=True
    )
    tok = d.add_parser("tokenizer", help="train a lossless tokenizer on raw text: sentencepiece, or HF byte-level BPE")
    tok.add_argument(
        "--input",
        required=True,
        help="bundled:shakespeare, or .txt/.jsonl/.json/.parquet file(s) (.txt/.jsonl/.json also as .gz or .zst), "
        "a directory or a glob: read as `data prepare` reads it",
    )
    tok.add_argument(
        "--kind",
        default="sentencepiece",
        choices=["sentencepiece", "hf-bpe"],
        help="sentencepiece (default): PREFIX.model; hf-bpe: a byte-level BPE of HF tokenizers, "
        "OUT/tokenizer.json with EOS <|endoftext|> (a transformers tokenizer directory)",
    )
    tok.add_argument(
        "--out",
        required=True,
        help="sentencepiece: output prefix, writes PREFIX.model and PREFIX.vocab; hf-bpe: a directory, writes "
        "OUT/tokenizer.json and OUT/tokenizer_config.json",
    )
    tok.add_argument("--vocab-size", type=int, required=True)
    tok.add_argument("--model-type", choices=["bpe", "unigram"], help="sentencepiece's model (default bpe)")
    tok.add_argument("--text-key", default="text")
    tok.add_argument("--seed", type=int, help="sentencepiece: the seed that samples its training lines (default 0)")
    tok.set_defaults(func=_tokenizer)
    pre = d.add_parser("prepare", help="tokenize a corpus into megatron indexed-dataset shards (train/valid)")
    pre.add_argument(
        "--input",
        required=True,
        nargs="+",
        help="bundled:shakespeare, or .txt/.jsonl/.json/.parquet files (.txt/.jsonl/.json also as .gz or .zst), "
        "directories or globs, read in the order given",
    )
    pre.add_argument(
        "--tokenizer", required=True, help="a sentencepiece .model, an HF tokenizer.json or a directory holding one"
    )
    pre.add_argument(
        "--out",
        required=True,
        help="output directory: train.bin/.idx, valid.bin/.idx, meta.json; with --shard-tokens or --shard-size "
        "manifest.json and train-NNNNN, valid-NNNNN shards",
    )
    size = pre.add_mutually_exclusive_group()
    size.add_argument(
        "--shard-tokens",
        type=int,
        help="a directory of shards of about this many tokens each, in one streaming pass that a rerun of the same "
        "command resumes after a crash",
    )
    size.add_argument("--shard-size", help="as --shard-tokens, in bytes of .bin per shard: e.g. 2GB, 512MiB")
    pre.add_argument(
        "--eos-token",
        help="an HF tokenizer's token that ends each document, when neither its tokenizer_config.json nor a "
        "well-known token (<|endoftext|>, </s>, ...) gives it; a run reading the shards names it as data.eos_token",
    )
    pre.add_argument("--valid-fraction", type=float, default=0.05)
    pre.add_argument(
        "--workers",
        "--num-proc",
        dest="workers",
        type=int,
        default=min(8, os.cpu_count() or 1),
        help="tokenizer processes (the output does not depend on how many)",
    )
    pre.add_argument("--seed", type=int, default=0)
    pre.add_argument("--text-key", default="text")
    pre.set_defaults(func=_prepare)

    g = sub.add_parser("generate", help="sample text from a run's newest checkpoint or an export directory")
    g.add_argument("run_dir", metavar="RUN_DIR_OR_EXPORT")
    g.add_argument("--prompt", required=True)
    g.add_argument("--max-new-tokens", type=int, default=200)
    g.add_argument("--temperature", type=float, default=0.8)
    g.add_argument("--top-k", type=int, default=50)
    g.add_argument("--seed", type=int, default=0)
    g.set_defaults(func=_generate)

    gr = sub.add_parser("grow", help="G_stack depth growth of a checkpoint, ready to train on; or --plan when to grow")
    gr.add_argument(
        "checkpoint", nargs="?", help="a run directory (its newest good checkpoint) or RUN_DIR/checkpoints/step_N"
    )
    gr.add_argument(
        "overrides", nargs="*", default=[], metavar="key=value", help="for the grown run, e.g. train.steps=2000"
    )
    gr.add_argument("--factor", type=int, default=4, help="depth multiple g (>= 2); block i = source block i mod L")
    gr.add_argument("--out", help="the grown run directory to write")
    gr.add_argument("--plan", action="store_true", help="print the paper's growth timing d for --params and --tokens")
    gr.add_argument("--params", help="--plan: parameters N of the target model, e.g. 7B or 7e9")
    gr.add_argument("--tokens", help="--plan: training tokens D of the target model, e.g. 2T")
    gr.set_defaults(func=_grow)

    ex = sub.add_parser(
        "export", help="a checkpoint as safetensors + config + tokenizer (a transformers layout where one fits)"
    )
    ex.add_argument("checkpoint", help="a run directory (its newest checkpoint) or RUN_DIR/checkpoints/step_N")
    ex.add_argument("--out", required=True, help="a new directory")
    ex.add_argument(
        "--format",
        default="auto",
        choices=["auto", "hf", "unroll"],
        help="auto: Llama/Mistral/Mixtral/Qwen2-MoE where the model fits one, else unroll's own layout",
    )
    ex.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ex.set_defaults(func=_export)

    im = sub.add_parser("import", help="an export (unroll or transformers layout) as a run directory to train on")
    im.add_argument("export", help="a directory written by `unroll export`, or a Llama/Mistral/Mixtral/Qwen2-MoE one")
    im.add_argument("--out", required=True, help="the new run directory")
    im.add_argument(
        "--config",
        default=None,
        help="training config (file or preset) for the non-model sections; default the export's unroll_config.yaml",
    )
    im.add_argument("--step", type=int, default=None, help="the step to resume at (default the export's; 0 if unknown)")
    im.add_argument("overrides", nargs="*", default=[], metavar="key=value", help="e.g. data.train=[...] optim.lr=1e-3")
    im.set_defaults(func=_import)

    _add_module_command(
        sub, "bench", "the performance suite (compared paths alternating round by round; min and median)", BENCHES
    )
    _add_module_command(sub, "launch", "training under torchrun on this machine, or an sbatch job on SLURM", LAUNCHERS)
    _add_module_command(sub, "check", "checks of this checkout on this machine that need no GPU", CHECKS)

    pl = sub.add_parser("plot", help="loss curves of a run as a PNG")
    pl.add_argument("run_dir")
    pl.add_argument("--out", default=None, help="default RUN_DIR/loss.png")
    pl.set_defaults(func=_plot)
    for command in [*sub.choices.values(), *d.choices.values()]:  # the innermost one wins: `unroll data tokenizer`
        command.set_defaults(command_parser=command)  # whose usage and options an error after parsing names
    return p


def main(argv: list[str] | None = None) -> int:
    from unroll.launch.leftover_args import take_leftovers

    p = parser()
    args, extra = p.parse_known_args(argv)
    if extra:
        command = args.command_parser
        overrides, problem = take_leftovers(command, extra, hasattr(args, "overrides"))
        if problem:  # one line, no usage: the hint is the point
            print(f"{command.prog}: error: {problem}", file=sys.stderr)
            return 2
        args.overrides = [*args.overrides, *overrides]
    from unroll.data.errors import DataError
    from unroll.train.config import ConfigError
    from unroll.train.step_guard import TrainingDiverged

    try:
        return args.func(args)
    except UsageError as e:
        args.command_parser.error(str(e))  # exits 2
        raise
    except (ConfigError, DataError, FileNotFoundError) + _raised_from_loaded_modules() as e:
        print(f"unroll {args.command}: error: {e}", file=sys.stderr)
        return 2
    except TrainingDiverged as e:
        print(f"unroll {args.command}: stopped: {e}", file=sys.stderr)
        return 3


# Errors a user can cause, in modules that import torch: importing them up front would cost every command,
# `--keys` and `presets` included, seconds. An exception's class is in a loaded module, so whatever was raised
# is among those already imported.
USER_ERRORS_BEHIND_TORCH = (
    ("unroll.train.checkpoint.integrity", "CheckpointError"),
    ("unroll.train.lifecycle.export_format", "ExportError"),
)


def _raised_from_loaded_modules() -> tuple[type[BaseException], ...]:
    loaded = (getattr(sys.modules.get(module), name, None) for module, name in USER_ERRORS_BEHIND_TORCH)
    return tuple(cls for cls in loaded if isinstance(cls, type))


if __name__ == "__main__":
    sys.exit(main())
