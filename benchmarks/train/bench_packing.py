"""Padding-free packing vs padded micro-batches: the same training steps, side by side in one process.

Each variant runs the forward and backward passes of the same training steps (the same samples per step, the same
global loss denominators) on the same model, laid out by the project's own code (:mod:`tract_dist.train.batching`);
the optimizer update, identical in every layout, is left out:

  padded     micro-batches of ``--micro`` samples in the step's shuffled order, right-padded (the default)
  grouped    the same after sorting the step by length (``training.group_by_length``)
  packed     rows of at most ``--budget`` tokens, no padding, attention confined to each example as training does
             it (``training.packing``): flash-attention's varlen kernel when that is the attention, else one
             causal sdpa per example (``tract_dist.models.packed_attention``); flex_attention uses its block mask
  packed_mask  the same rows through transformers' block-diagonal mask with plain sdpa, which computes each row's
             whole attention square (cross-example blocks masked, not skipped): what packing costs without a
             per-example kernel (only when the attention is sdpa)

Length distributions (SmolLM2's tokenizer and chat template, ``data.max_length`` 3000):

  vicuna     the real Vicuna Bench judge set (prometheus-eval's vicuna_eval.json, 320 records), as encoded for
             training (``../shared/data`` or ``TRACT_SHARED_DATA``)
  fc         Feedback-Collection-like lengths: lognormal (median 1,200, sigma 0.45: mean about 1,300), clipped to
             [300, 3,000] (the Feedback Collection has no local copy here); each sequence is a real Vicuna record
             whose prompt is cut or repeated to that length, so the CoT/score labels stay real

Reported per (distribution, variant): useful (non-pad) tokens/s over the measured steps (the first ``--warmup``
steps are excluded), the same per second of this process's CPU time (on a shared CPU machine the steadier of
the two: other processes' load stretches wall time far more than it does CPU time), the padding fraction (pad
slots / computed slots), step seconds, peak tensor memory of the first measured step's forwards and backwards (its activations and
the gradients it allocates, measured in the timed pass itself: CUDA max_memory_allocated, CPU the profiler's
allocator events, ``tract_dist.loss.memory_probe``, whose bookkeeping is small beside steps of seconds), and each
variant's first loss against the padded one (they must agree: the same step). Ratios are to ``padded``; the *padding bound* is the
ratio a step time proportional to its computed token slots would give.

    MALLOC_MMAP_THRESHOLD_=131072 python benchmarks/train/bench_packing.py --samples 4 --micro 4 --budget 6000 \
        --steps 1 --warmup 0 --variants padded,packed --out benchmarks/results/packing-cpu-2core  # CPU, SmolLM2
        # (~580 CPU-s: 5 min on an idle 2-core machine; the fixed glibc mmap threshold keeps RSS at 2.3 GB, not 7.6)
    python benchmarks/train/bench_packing.py --device cuda --model random-1b --bf16 --samples 32 --micro 8 \\
        --budget 16384 --steps 3 --out benchmarks/results/packing-<card>                        # one GPU (gpu_check)
    python benchmarks/train/bench_packing.py --smoke --out /tmp/packing                            # tiny, seconds
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import random
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from tract_dist.loss import CoTRaftLossOptions  # noqa: E402
from tract_dist.loss.memory_probe import peak_tensor_bytes  # noqa: E402
from tract_dist.models import CotRaftCausalLM  # noqa: E402
from tract_dist.train.batching import batch_tokens, collate_packed, pack_step, split_padded  # noqa: E402
from tract_dist.train.data import collate, loss_denominators  # noqa: E402

VARIANTS = ("padded", "grouped", "packed", "packed_mask")
FC_MEDIAN, FC_SIGMA, FC_MIN, FC_MAX = 1200, 0.45, 300, 3000  # lognormal: mean = median * exp(sigma^2 / 2) ~ 1,310
MAX_LENGTH = 3000  # data.max_length of the paper configs (the official cutoff)


def machine(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device).replace(" ", "-")
    return f"cpu-{os.cpu_count()}core"


def vicuna_rows(tokenizer: Any, max_length: int, limit: int | None) -> list[dict[str, Any]]:
    """The real Vicuna Bench records, encoded as training encodes them."""
    from tract_dist.data.encode import EncodeOptions, encode_examples
    from tract_dist.data.formats import read_examples
    from tract_dist.data.score_tokens import derive_score_tokens

    shared = Path(os.environ.get("TRACT_SHARED_DATA", REPO.parent / "shared" / "data"))
    path = shared / "prometheus-eval" / "vicuna_eval.json"
    if not path.is_file():
        path = REPO / "data" / "quickstart" / "vicuna_eval_0-15.jsonl"  # 16 of the same records, committed
        fmt = "jsonl"
        print(f"[bench] full Vicuna Bench not found; using the committed 16-record sample {path}", flush=True)
    else:
        fmt = "prometheus-eval"
    examples = read_examples(str(path), fmt, require_feedback=True, limit=limit).examples
    enc, stats = encode_examples(tokenizer, examples, derive_score_tokens(tokenizer, (1, 5)),
                                 EncodeOptions(max_length=max_length))
    print(f"[bench] vicuna: {path.name}, {stats.as_dict()}", flush=True)
    return [e.to_dict() for e in enc]


def fc_like_rows(real: list[dict[str, Any]], n: int, seed: int, max_length: int = FC_MAX) -> list[dict[str, Any]]:
    """``n`` sequences with Feedback-Collection-like lengths built from real records: the target (CoT, score,
    EOS) and its labels stay; the prompt is cut, or repeated, to reach the drawn length."""
    rnd = random.Random(seed)
    out = []
    for k in range(n):
        drawn = rnd.lognormvariate(math.log(FC_MEDIAN), FC_SIGMA)
        length = int(min(FC_MAX, max_length, max(FC_MIN, drawn)))
        r = real[rnd.randrange(len(real))]
        prompt_len = next(i for i, x in enumerate(r["labels"]) if x != -100)  # the first labelled token
        target_ids, target_labels = r["input_ids"][prompt_len:], r["labels"][prompt_len:]
        want = max(16, length - len(target_ids))
        prompt = (r["input_ids"][:prompt_len] * math.ceil(want / prompt_len))[:want]
        out.append({**r, "id": f"fc{k}", "input_ids": prompt + target_ids, "labels": [-100] * want + target_labels,
                    "score_position": r["score_position"] - prompt_len + want})
    return out


def steps_of(rows: list[dict[str, Any]], samples: int, steps: int, seed: int) -> list[list[int]]:
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    need = samples * steps
    order = (order * math.ceil(need / len(order)))[:need]
    return [order[s * samples:(s + 1) * samples] for s in range(steps)]


def layout(variant: str, step: list[int], lengths: list[int], micro: int, budget: int) -> list[list[int]]:
    """One worker's micro-batches of the step, by the project's own layout functions."""
    if variant.startswith("packed"):
        return [m[0] for m in pack_step(step, lengths, world=1, budget=budget)]
    return [m[0] for m in split_padded(step, lengths, world=1, micro=micro, group_by_length=variant == "grouped")]


def run_variant(variant: str, model: torch.nn.Module, rows: list[dict[str, Any]], steps: list[list[int]],
                args: argparse.Namespace, options: CoTRaftLossOptions, device: torch.device, pad_id: int) -> dict:
    """Forward + backward of every micro-batch of each step. No optimizer update: it is the same in every layout
    (and small beside a step's forwards and backwards), and without it every layout sees the same weights, so
    their losses must agree; gradients are dropped after each step."""
    base_attn = model.config._attn_implementation
    model.set_attn_implementation(attention_for(variant, base_attn))
    wrapper = CotRaftCausalLM(model, options)
    lengths = [len(r["input_ids"]) for r in rows]
    times, cpu_times, tokens, slots, losses, peak = [], [], [], [], [], 0
    for s, step in enumerate(steps):
        n_ce = sum(sum(x != -100 for x in rows[i]["labels"]) for i in step)
        den = loss_denominators(n_ce, len(step), ce_on_score_token=False, world_size=1).per_rank()
        micro_batches = layout(variant, step, lengths, args.micro, args.budget)
        batches = [{k: v.to(device) for k, v in (collate_packed([rows[i] for i in m]) if variant.startswith("packed")
                                                 else collate([rows[i] for i in m], pad_id)).items()}
                   for m in micro_batches]
        if variant == "packed_mask":  # no example bounds: transformers' block mask from the position ids alone
            batches = [{k: v for k, v in b.items() if k != "cu_seq_lens"} for b in batches]

        def one_step(batches: list = batches, den: dict = den) -> float:
            loss = 0.0
            for b in batches:
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16):
                    out = wrapper(**b, **den)
                out.loss.backward()
                loss += float(out.loss.detach())
            return loss

        _sync(device)
        t0, c0 = time.perf_counter(), time.process_time()
        if s == args.warmup and not args.no_memory:  # the first measured step, with its peak tensor memory
            loss, peak = peak_tensor_bytes(one_step, device)
        else:
            loss = one_step()
        _sync(device)
        if s >= args.warmup:
            times.append(time.perf_counter() - t0)
            cpu_times.append(time.process_time() - c0)
            tokens.append(sum(float(batch_tokens(b)) for b in batches))
            slots.append(sum(b["input_ids"].numel() for b in batches))
        losses.append(loss)
        model.zero_grad(set_to_none=True)
        print(f"[bench] {variant} step {s + 1}/{len(steps)}: {len(batches)} micro-batches, "
              f"{time.perf_counter() - t0:.1f} s, {time.process_time() - c0:.1f} CPU-s", flush=True)
    del wrapper, batches
    gc.collect()
    attention = model.config._attn_implementation
    model.set_attn_implementation(base_attn)
    total = sum(times)
    return {"variant": variant, "useful_tokens_per_s": sum(tokens) / total if total else float("nan"),
            "useful_tokens_per_cpu_s": sum(tokens) / sum(cpu_times) if cpu_times else float("nan"),
            "pad_fraction": 1 - sum(tokens) / sum(slots) if slots else float("nan"),
            "step_s_median": statistics.median(times) if times else float("nan"), "measured_steps": len(times),
            "useful_tokens": sum(tokens), "slots": sum(slots), "micro_batches_per_step": len(micro_batches),
            "peak_step_mib": peak / 2**20, "losses": losses, "attention": attention}


def attention_for(variant: str, base: str) -> str:
    """The attention a layout runs with, as training picks it (tract_dist.train.model_init)."""
    from tract_dist.models.packed_attention import PACKED_SDPA, packed_implementation

    if variant == "packed":
        return packed_implementation(base)
    if variant == "packed_mask" and packed_implementation(base) == PACKED_SDPA:
        return "sdpa"  # transformers' block-diagonal mask over the row's whole square
    return base


def _warm_up(base: torch.nn.Module, row: dict[str, Any], options: CoTRaftLossOptions, device: torch.device,
             args: argparse.Namespace) -> None:
    wrapper = CotRaftCausalLM(base, options)
    batch = {k: v.to(device) for k, v in collate_packed([row]).items()}
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16):
        wrapper(**batch).loss.backward()
    base.zero_grad(set_to_none=True)
    _sync(device)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def load_model(args: argparse.Namespace, device: torch.device) -> tuple[torch.nn.Module, Any]:
    """``smollm2`` (the real SmolLM2-135M), ``random-1b`` (Llama-3.2-1B-shaped random weights, the Llama-3
    tokenizer: the GPU check, where SmolLM2's 98 MB GGUF does not travel) or ``tiny`` (smoke)."""
    from transformers import AutoModelForCausalLM

    from tract_dist.data.assets import load_tokenizer
    from tract_dist.models import build_tiny_model, tiny_llama_config
    from tract_dist.models.loading import materialize_alias
    from tract_dist.aliases import RANDOM_ALIASES
    from tract_dist.train.model_init import attn_implementation

    attn = args.attn or attn_implementation(None, device.type == "cuda")
    tokenizer = load_tokenizer("llama3" if args.model == "random-1b" else "smollm2")
    if args.model == "tiny":
        model = build_tiny_model(tiny_llama_config(len(tokenizer), attn_implementation=attn,
                                                   max_position_embeddings=4096), seed=0)
    elif args.model == "random-1b":
        config = tiny_llama_config(len(tokenizer), tie=False, max_position_embeddings=max(4096, args.budget),
                                   attn_implementation=attn, **RANDOM_ALIASES["random-llama-1b"])
        with torch.device(device):  # initialise on the device: a 1B model's CPU init takes tens of seconds
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    else:
        model = AutoModelForCausalLM.from_pretrained(materialize_alias("smollm2"), dtype=torch.float32,
                                                     attn_implementation=attn)
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model.to(device).train(), tokenizer


def run(args: argparse.Namespace) -> dict:
    from tract_dist.data.score_tokens import derive_score_tokens

    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(0)
    if device.type == "cpu":
        torch.set_num_threads(args.threads or os.cpu_count() or 1)
    t_start, load_start = time.time(), os.getloadavg()
    model, tok = load_model(args, device)
    st = derive_score_tokens(tok, (1, 5))
    options = CoTRaftLossOptions(st.token_ids, st.scores, lam=0.125)
    real = vicuna_rows(tok, args.max_length, args.vicuna_limit)
    data = {"vicuna": real, "fc": fc_like_rows(real, max(args.samples * args.steps, 64), seed=1,
                                               max_length=args.max_length)}
    report: dict[str, Any] = {"rows": [], "distributions": {}}
    _warm_up(model, real[0], options, device, args)  # one-time costs (threads, allocator) before any variant
    for name in args.distributions.split(","):
        rows = data[name]
        lens = sorted(len(r["input_ids"]) for r in rows)
        report["distributions"][name] = {"sequences": len(rows), "mean": statistics.mean(lens),
                                         "median": statistics.median(lens), "max": lens[-1], "min": lens[0]}
        steps = steps_of(rows, args.samples, args.steps, seed=2)
        for variant in args.variants.split(","):
            if variant == "packed_mask" and attention_for(variant, model.config._attn_implementation) != "sdpa":
                continue  # the block-mask comparison is sdpa's
            r = run_variant(variant, model, rows, steps, args, options, device, tok.pad_token_id)
            report["rows"].append({"distribution": name, **r})
    for row in report["rows"]:
        padded = next(r for r in report["rows"] if r["distribution"] == row["distribution"]
                      and r["variant"] == "padded")
        row["speedup_vs_padded"] = row["useful_tokens_per_s"] / padded["useful_tokens_per_s"]
        row["cpu_speedup_vs_padded"] = row["useful_tokens_per_cpu_s"] / padded["useful_tokens_per_cpu_s"]
        row["memory_vs_padded"] = (row["peak_step_mib"] / padded["peak_step_mib"]
                                   if padded["peak_step_mib"] else float("nan"))
        row["first_loss_rel_diff"] = abs(row["losses"][0] - padded["losses"][0]) / abs(padded["losses"][0])
        # what the useful tokens/s ratio would be if a step's time were proportional to the token slots it computes
        row["padding_bound_vs_padded"] = (padded["slots"] / padded["useful_tokens"]) / (row["slots"] / row["useful_tokens"])
    report["settings"] = {k: v for k, v in vars(args).items() if k != "out"}
    report["settings"]["attn_implementation"] = model.config._attn_implementation
    report["settings"]["params"] = sum(p.numel() for p in model.parameters())
    report["machine"] = {"name": machine(device), "platform": platform.platform(), "cpu_count": os.cpu_count(),
                         "torch": torch.__version__, "load_average_at_start": load_start,
                         "load_average_at_end": os.getloadavg(), "wall_seconds": time.time() - t_start,
                         "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    return report


def format_table(report: dict) -> str:
    lines = ["| lengths | layout | useful tokens/s | vs padded | per CPU-second | vs padded | padding bound | "
             "pad fraction | micro-batches / step | step s | peak MiB (step) | vs padded | 1st loss vs padded | "
             "attention |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in report["rows"]:
        lines.append(f"| {r['distribution']} | {r['variant']} | {r['useful_tokens_per_s']:.1f} | "
                     f"{r['speedup_vs_padded']:.2f}x | {r['useful_tokens_per_cpu_s']:.1f} | "
                     f"{r['cpu_speedup_vs_padded']:.2f}x | {r['padding_bound_vs_padded']:.2f}x | {r['pad_fraction']:.3f} | {r['micro_batches_per_step']} | "
                     f"{r['step_s_median']:.1f} | {r['peak_step_mib']:.0f} | {r['memory_vs_padded']:.2f} | "
                     f"{r['first_loss_rel_diff']:.1e} | {r['attention']} |")
    return "\n".join(lines)


def write(report: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    m, s = report["machine"], report["settings"]
    dist = "\n".join(f"- {k}: {v['sequences']} sequences, tokens mean {v['mean']:.0f}, median {v['median']:.0f}, "
                     f"min {v['min']}, max {v['max']}" for k, v in report["distributions"].items())
    out.with_suffix(".md").write_text(
        f"# Packing vs padding: {m['name']}\n\n{m['date']}, torch {m['torch']}, {m['platform']}; load average "
        f"{m['load_average_at_start'][0]:.1f} at start, {m['load_average_at_end'][0]:.1f} at end (`uptime`'s 1-minute "
        f"figure: a shared machine's other work is in these times); {m['wall_seconds']:.0f} s in all.\n\n"
        f"Settings: {s['samples']} samples per step, {s['steps']} steps ({s['warmup']} warm-up, excluded), padded "
        f"micro-batches of {s['micro']}, packed rows of <= {s['budget']} tokens, attention "
        f"`{s['attn_implementation']}`, {'bf16 autocast' if s['bf16'] else 'fp32'}"
        f"{', gradient checkpointing' if s['gradient_checkpointing'] else ''}.\n\n{dist}\n\n"
        f"{format_table(report)}\n\n*Padding bound*: the ratio if a step's time were proportional to the token slots "
        "it computes (padded slots per useful token over the layout's); attention, which grows with the square of "
        "each sequence, and per-call overheads move the measured ratio off it.\n")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--model", default="smollm2", choices=["smollm2", "random-1b", "tiny"])
    ap.add_argument("--distributions", default="vicuna,fc")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--samples", type=int, default=8, help="samples per optimizer step")
    ap.add_argument("--steps", type=int, default=2, help="steps per variant, warm-up included")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--micro", type=int, default=4, help="padded: samples per micro-batch")
    ap.add_argument("--budget", type=int, default=4096, help="packed: tokens per row")
    ap.add_argument("--max-length", type=int, default=MAX_LENGTH)
    ap.add_argument("--vicuna-limit", type=int, default=None, help="read only the first N Vicuna records")
    ap.add_argument("--attn", default=None, help="attn_implementation; default: flash_attention_2 on CUDA when it "
                                                 "imports, else sdpa")
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast (the GPU setting)")
    ap.add_argument("--no-gradient-checkpointing", dest="gradient_checkpointing", action="store_false",
                    help="keep every activation (the paper's runs recompute them: LLaMA-Factory's default)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--no-memory", action="store_true", help="do not record the peak memory of the first measured "
                                                                "step")
    ap.add_argument("--smoke", action="store_true", help="tiny random Llama, one step of 2 samples: checks it runs")
    ap.add_argument("--out", default=None, help="output stem (.json and .md)")
    args = ap.parse_args(argv)
    if args.smoke:  # every code path (layouts, memory pass, report) at the smallest size that still pads
        args.samples, args.steps, args.warmup, args.micro, args.budget, args.max_length = 2, 1, 0, 2, 2800, 1400
        args.vicuna_limit, args.model = args.vicuna_limit or 4, "tiny"
    if args.budget < args.max_length:
        ap.error(f"--budget {args.budget} must be at least --max-length {args.max_length} (a row holds whole "
                 "examples)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    report = run(args)
    print(format_table(report))
    if args.out:
        write(report, Path(args.out))
        print(f"[bench] wrote {Path(args.out).with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
