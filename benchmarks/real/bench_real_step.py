"""One REAL round, timed part by part: rollout (k sampled CoTs per prompt + the read-out / sampling log-prob
forward), update (REAL's loss: per-token weighted fused CE + regression term, forward + backward + AdamW), and
the weight hand-over to the engine, with LoRA (PEFT's state dict, as the stage does) side by side with the two
alternatives it avoids: a full-weight hand-over (``load_state_dict`` of every weight: what full fine-tuning
needs) and a full export + reload (``save_pretrained`` then ``from_pretrained``: "export the model per step").

Plain PyTorch + transformers (+ PEFT when importable), no Ray, DeepSpeed or MLflow, so the same script runs on
the GPU check machine (``benchmarks/gpu_check.py``, stage ``real_step``). The trainer and the engine are two
model copies in one process, as a colocated deployment holds them; round 1 is warm-up, the report is round 2.

    python benchmarks/real/bench_real_step.py --model smollm2 --out benchmarks/results/real-step-cpu-2core
    python benchmarks/real/bench_real_step.py --model random-1b --device cuda --dtype bfloat16 --prompts 8 \\
        --k 8 --max-new-tokens 256 --out /tmp/real-step                        # the GPU check's shape
    python benchmarks/real/bench_real_step.py --model tiny --out /tmp/real-smoke --prompts 1 --k 2 \\
        --max-new-tokens 4                                                       # seconds, CPU smoke
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks" / "generate"))


def _examples(n: int) -> list[Any]:
    from tract_dist.data.schema import JudgeExample

    rows = (REPO / "data" / "quickstart" / "vicuna_eval_0-15.jsonl").read_text().splitlines()
    return [JudgeExample.from_dict(json.loads(r)) for r in rows[:n]]


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _peak_gb(device: str) -> float:
    import torch

    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM

    from bench_generate import build_model
    from tract_dist.data.encode import EncodeOptions
    from tract_dist.data.score_tokens import derive_score_tokens
    from tract_dist.loss.options import CoTRaftLossOptions
    from tract_dist.models import CotRaftCausalLM
    from tract_dist.models.loading import load_tokenizer_for, materialize_alias
    from tract_dist.real.advantages import regression_rewards, rloo_advantages
    from tract_dist.real.batch import RealEncoder, RealSample, collate_samples
    from tract_dist.real.objective import surrogate_token_weights
    from tract_dist.real.rollout import score_sample
    from tract_dist.runtime.engine import extract_cot
    from tract_dist.runtime.hf_engine import HFEngine
    from tract_dist.runtime.sampling import SamplingParams, example_seed

    dev, dtype = args.device, getattr(torch, args.dtype)
    if dev == "cpu":
        torch.set_num_threads(args.threads)
    try:
        import peft  # noqa: F401

        lora = args.lora
    except ImportError:
        lora = False
    work = Path(tempfile.mkdtemp(prefix="real-bench-"))
    path = materialize_alias(build_model(args.model, dev, work))
    tok = load_tokenizer_for(path)
    st = derive_score_tokens(tok)

    def load() -> Any:
        m = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(dev)
        if lora:
            from peft import LoraConfig, get_peft_model

            m = get_peft_model(m, LoraConfig(r=args.lora_r, lora_alpha=2 * args.lora_r, lora_dropout=0.0,
                                             target_modules="all-linear", task_type="CAUSAL_LM"))
        return m

    t0 = time.perf_counter()
    trainer, engine_model = load(), load().eval()
    load_s = time.perf_counter() - t0
    engine = HFEngine(engine_model, tok, batch_size=args.batch_size)
    wrapper = CotRaftCausalLM(trainer, CoTRaftLossOptions(st.token_ids, st.scores, lam=1.0))
    opt = torch.optim.AdamW([p for p in trainer.parameters() if p.requires_grad], lr=1e-5)
    enc = RealEncoder(tok, st, EncodeOptions(max_length=args.max_length), args.max_new_tokens)
    exs = _examples(args.prompts)
    prompts = [enc.prompt_ids(ex) for ex in exs]
    params = SamplingParams(temperature=1.0, top_p=1.0, max_new_tokens=args.max_new_tokens,
                            stop=("So the overall", "[RESULT]"))
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0

    def one_round(r: int) -> dict[str, float]:
        out: dict[str, float] = {}
        seeds = [example_seed(0, f"{ex.id}#{r}", j) for ex in exs for j in range(args.k)]
        rows = [p for p in prompts for _ in range(args.k)]
        _sync(dev)
        t = time.perf_counter()
        gens = engine.generate(rows, seeds, params)
        _sync(dev)
        out["generate_s"] = time.perf_counter() - t
        out["new_tokens"] = float(sum(g.new_tokens for g in gens))
        samples = []
        t = time.perf_counter()
        for i, g in enumerate(gens):
            ids, labels, _ = enc.sample_row(rows[i], extract_cot(g.text, params.stop))
            s = RealSample(prompt=i // args.k, input_ids=ids, labels=labels, score_position=len(ids) - 1,
                           score=float(exs[i // args.k].score), yhat=0.0, old_logprobs=[], new_tokens=g.new_tokens,
                           finish_reason=g.finish_reason)
            s.yhat, s.old_logprobs = score_sample(engine.model, s, st.token_ids, st.scores)
            samples.append(s)
        _sync(dev)
        out["score_s"] = time.perf_counter() - t
        yhat = torch.tensor([s.yhat for s in samples], dtype=torch.float64).view(-1, args.k)
        gold = torch.tensor([s.score for s in samples], dtype=torch.float64).view(-1, args.k)
        adv = rloo_advantages(regression_rewards(yhat, gold)).flatten().tolist()
        n_tok = sum(sum(1 for x in s.labels if x != -100) for s in samples)
        t = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        tokens = 0
        for b in range(0, len(samples), args.micro_batch):
            batch = collate_samples(samples[b:b + args.micro_batch], adv[b:b + args.micro_batch], pad)
            a = batch.pop("adv")
            batch.pop("old_logprobs")
            batch = {k: v.to(dev) for k, v in batch.items()}
            w = surrogate_token_weights(a.to(dev), batch["labels"] != -100).weights
            res = wrapper(**batch, ce_token_weights=w, ce_denominator=max(n_tok, 1), mse_denominator=len(samples))
            res.loss.backward()
            tokens += int(batch["attention_mask"].sum())
        opt.step()
        _sync(dev)
        out["update_s"] = time.perf_counter() - t
        out["update_tokens"] = float(tokens)
        out["samples"] = float(len(samples))
        # hand-overs: LoRA state dict (the stage's), every weight (full fine-tuning), export + reload (avoided)
        if lora:
            from peft import get_peft_model_state_dict, set_peft_model_state_dict

            t = time.perf_counter()
            state = {k: v.detach().clone() for k, v in get_peft_model_state_dict(trainer).items()}
            set_peft_model_state_dict(engine.model, state)
            _sync(dev)
            out["handover_lora_s"] = time.perf_counter() - t
            out["handover_lora_mb"] = sum(v.numel() * v.element_size() for v in state.values()) / 2**20
        t = time.perf_counter()
        full = {k: v.detach() for k, v in trainer.state_dict().items()}
        engine.model.load_state_dict(full, strict=True)
        _sync(dev)
        out["handover_full_s"] = time.perf_counter() - t
        out["handover_full_mb"] = sum(v.numel() * v.element_size() for v in full.values()) / 2**20
        export = work / f"export-{r}"
        merged = copy.deepcopy(trainer).merge_and_unload() if lora else trainer  # the merge is not timed
        _sync(dev)
        t = time.perf_counter()
        merged.save_pretrained(export)
        reloaded = AutoModelForCausalLM.from_pretrained(export, dtype=dtype).to(dev)
        _sync(dev)
        out["handover_export_reload_s"] = time.perf_counter() - t
        del reloaded, merged
        return out

    rounds = [one_round(r) for r in range(args.rounds)]
    m = rounds[-1]
    report = {
        "machine": f"cuda-{torch.cuda.get_device_name().replace(' ', '-')}" if dev.startswith("cuda")
        else f"cpu-{os.cpu_count()}core",
        "model": args.model, "dtype": args.dtype, "lora": lora, "prompts": args.prompts, "k": args.k,
        "max_new_tokens": args.max_new_tokens, "threads": args.threads if dev == "cpu" else None,
        "load_two_copies_s": load_s, "rounds": rounds, "loadavg": os.getloadavg(), "peak_memory_gb": _peak_gb(dev),
        "rollout_samples_per_s": m["samples"] / (m["generate_s"] + m["score_s"]),
        "generate_tokens_per_s": m["new_tokens"] / m["generate_s"],
        "update_samples_per_s": m["samples"] / m["update_s"],
        "update_tokens_per_s": m["update_tokens"] / m["update_s"],
    }
    if lora:
        report["full_over_lora_handover"] = m["handover_full_s"] / m["handover_lora_s"]
        report["export_reload_over_lora_handover"] = m["handover_export_reload_s"] / m["handover_lora_s"]
    return report


def to_markdown(r: dict[str, Any]) -> str:
    m = r["rounds"][-1]
    lines = [f"# One REAL round: {r['model']} on {r['machine']}", "",
             f"`benchmarks/real/bench_real_step.py`, {r['dtype']}, LoRA {r['lora']}, {r['prompts']} prompts x k "
             f"{r['k']}, up to {r['max_new_tokens']} new tokens, threads {r['threads']}; the last of "
             f"{len(r['rounds'])} rounds (round 1 is warm-up); load average {r['loadavg'][0]:.1f} at the end; "
             f"peak memory {r['peak_memory_gb']:.2f} GB (two model copies: trainer + engine).", "",
             *([f"**Measured on a shared machine under load {r['loadavg'][0]:.1f} on {os.cpu_count()} cores (this process "
                f"at its share of it): every time is an upper bound, not this CPU's rate; rerun on a quiet machine.**",
                ""] if r["machine"].startswith("cpu") and r["loadavg"][0] > 1.5 * (os.cpu_count() or 1) else []),
             "| part | seconds | rate |", "|---|---|---|",
             f"| generate ({int(m['new_tokens'])} new tokens) | {m['generate_s']:.2f} | "
             f"{r['generate_tokens_per_s']:.1f} tokens/s |",
             f"| read-out + sampling log-probs ({int(m['samples'])} samples) | {m['score_s']:.2f} | |",
             f"| rollout total | {m['generate_s'] + m['score_s']:.2f} | {r['rollout_samples_per_s']:.2f} samples/s |",
             f"| update (fwd + bwd + AdamW, {int(m['update_tokens'])} tokens) | {m['update_s']:.2f} | "
             f"{r['update_samples_per_s']:.2f} samples/s, {r['update_tokens_per_s']:.0f} tokens/s |"]
    if r["lora"]:
        lines.append(f"| hand-over: LoRA state dict ({m['handover_lora_mb']:.1f} MB) | {m['handover_lora_s']:.4f} | 1x |")
    lines += [f"| hand-over: every weight ({m['handover_full_mb']:.0f} MB, full fine-tuning) | "
              f"{m['handover_full_s']:.3f} | {r.get('full_over_lora_handover', float('nan')):.2f}x LoRA |",
              f"| hand-over: merged export + reload from disk | {m['handover_export_reload_s']:.2f} | "
              f"{r.get('export_reload_over_lora_handover', float('nan')):.2f}x LoRA |", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2", help="tiny | smollm2 | random-1b | HF folder")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--prompts", type=int, default=2)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--max-length", type=int, default=1024, help="prompt + CoT budget (prompts are fitted to it)")
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=None, help="rows per generate call (default: all)")
    ap.add_argument("--lora", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--lora-r", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    report = run(args)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=2))
    out.with_suffix(".md").write_text(to_markdown(report))
    print(to_markdown(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
