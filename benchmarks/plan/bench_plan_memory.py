"""The plan's training-memory estimate against what a real training step allocates, on this CPU.

Two checks, both with torch's own allocation records (``profile_memory=True``: every CPU tensor allocation and
free, summed in time order; the project's ``tract_dist.loss.memory_probe`` does the same for one call):

* ``--layers``: the bytes one decoder layer saves for backward, per token, measured as the difference between a
  2- and a 4-layer model's peak (gradients pre-allocated outside the window) for Llama, Qwen3 and Qwen3-MoE, full
  fine-tuning and LoRA with and without dropout, fp32 and bf16, against
  :func:`tract_dist.plan.memory.layer_activation_bytes`.
* default: whole training runs through the project's trainer (``tract-dist train`` in-process: ZeRO-3, the fused
  loss, AdamW) for the tiny Llama and the real SmolLM2-135M, 2 optimizer steps each, full fine-tuning, LoRA and
  activation checkpointing. Measured: the peak of live tensor bytes from before the model is built to the end of
  the second step (model states, DeepSpeed's buffers, activations, the loss head), and the peak RSS of the process
  during the steps above its RSS before the model (RSS does not see untouched allocations, e.g. most of DeepSpeed's
  gradient bucket, and sees allocator caching: shown for context). Estimated: the plan's training memory at the
  run's own shape (its micro-batch's padded length and loss rows), and at the config's bound (data.max_length).

    python benchmarks/plan/bench_plan_memory.py --out benchmarks/results/plan-memory-cpu-2core
    python benchmarks/plan/bench_plan_memory.py --layers --out benchmarks/results/plan-layers-cpu-2core
    python benchmarks/plan/bench_plan_memory.py --step gpu-1b --out OUT   # on a GPU (also in benchmarks/gpu_check.py)
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

GIB = 1 << 30


# ---- torch's allocation records ----------------------------------------------------------------------------

# Where a peak happened, by the profiler events around it (the plan's phases).
PHASE_EVENTS = {"FusedCoTRaftFunction": "loss head", "Optimizer.step": "optimizer step",
                "autograd::engine": "backward"}


def live_peaks(prof: Any, region: str) -> tuple[int, int, str]:
    """(peak live tensor bytes over the whole profile, peak inside ``region`` record_function windows, the phase
    that peak was in: loss head, optimizer step, backward, else forward)."""
    events = list(prof.profiler.kineto_results.events())
    windows = [(e.start_ns(), e.start_ns() + e.duration_ns()) for e in events if e.name() == region]
    mem = sorted((e for e in events if e.name() == "[memory]"), key=lambda e: e.start_ns())
    live = peak = peak_in = 0
    at = None
    for e in mem:
        live += e.nbytes()
        peak = max(peak, live)
        if live > peak_in and any(a <= e.start_ns() <= b for a, b in windows):
            peak_in, at = live, e.start_ns()
    phase = "forward"
    for e in events:
        if at is not None and e.start_ns() <= at <= e.start_ns() + e.duration_ns():
            for prefix, name in PHASE_EVENTS.items():
                if e.name().startswith(prefix) and (phase == "forward" or name != "backward"):
                    phase = name
    return peak, peak_in, phase


class RssSampler:
    """Peak resident memory of this process while running, sampled every 5 ms (/proc/self/statm)."""

    def __init__(self) -> None:
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def now() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.now())
            time.sleep(0.005)

    def __enter__(self) -> "RssSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()


# ---- whole training runs -----------------------------------------------------------------------------------

CASES = {
    "tiny-full": ["model.name_or_path=tiny-llama", "model.tokenizer=smollm2"],
    "smollm2-full": ["model.name_or_path=smollm2"],
    "smollm2-full-ckpt": ["model.name_or_path=smollm2", "model.gradient_checkpointing=true"],
    "smollm2-lora": ["model.name_or_path=smollm2", "model.lora.enabled=true", "model.lora.dropout=0.05"],
}


def run_case(name: str, overrides: list[str], workdir: Path, max_length: int) -> dict[str, Any]:
    from tract_dist.config import load_config
    from tract_dist.plan.memory import TrainSetup, ZeroBuffers, training_memory
    from tract_dist.plan.report import plan_run
    from tract_dist.plan.shape import build_meta, lora_shape, model_shape, resolve_config
    from tract_dist.train import recipe as recipe_mod
    from tract_dist.train.strategy import build_ds_config
    from tract_dist.train.trainer import run_training

    cfg = load_config(None, [
        f"data.train_path={REPO / 'data/quickstart/vicuna_eval_0-15.jsonl'}", "data.train_format=jsonl",
        f"data.max_length={max_length}", "data.max_examples=4", "training.micro_batch_size=2",
        "training.gradient_accumulation_steps=1", "training.max_steps=2", "training.save_steps=1000",
        f"training.output_dir={workdir / name}", "tracking.enabled=false", "cluster.num_workers=1",
        "cluster.launcher=inline", "model.dtype=float32", *overrides], base={"model": {"name_or_path": "x"}})
    config, source = resolve_config(cfg)
    meta = build_meta(config)
    shape = model_shape(config, name=cfg.model.name_or_path, source=source, model=meta)
    lora = lora_shape(meta, cfg.model.lora, config) if cfg.model.lora.enabled else None
    bound = plan_run(cfg, kinds=("train",)).stages[0].memory.total
    seen: dict[str, Any] = {}
    original = recipe_mod.run_recipe

    def measured(plan: Any) -> None:
        from torch.profiler import ProfilerActivity, profile, record_function

        r = recipe_mod.TrainRecipe(plan)
        r._setup_process()
        r._setup_data()
        step = r.train_step

        def timed_step(i: int) -> dict[str, float]:
            batch = [r.data[j] for j in r.steps.micro_indices(i, 0, 0)]  # this step's one micro-batch
            seq = max(len(x["input_ids"]) for x in batch)
            rows = sum(sum(1 for t in x["labels"] if t != -100) + 1 for x in batch)  # CE rows + a score row each
            if seq * len(batch) > seen.get("seq_len", 0) * 2:
                seen["seq_len"], seen["loss_rows"] = seq, rows
                seen["padded"] = len({len(x["input_ids"]) for x in batch}) > 1
            gc.collect()  # the load's garbage (reference cycles) would otherwise be freed at a random point
            with record_function("tract_step"):
                return step(i)

        r.train_step = timed_step  # type: ignore[method-assign]
        seen["rss_before_model"] = RssSampler.now()
        with RssSampler() as rss, profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            r._setup_model()
            r._resume()
            r.train()
        seen["rss_peak"] = rss.peak
        seen["peak_all"], seen["peak_steps"], seen["peak_phase"] = live_peaks(prof, "tract_step")
        seen["n_params"] = int(r.n_params)
        r.cleanup()

    recipe_mod.run_recipe = measured
    try:
        run_training(cfg, launcher="inline", run_name=name)
    finally:
        recipe_mod.run_recipe = original
    assert shape.params == seen["n_params"] - (lora.trainable if lora else 0), (shape.params, seen["n_params"])
    buffers = ZeroBuffers.from_ds_config(build_ds_config(cfg.training, 1, bf16=False, gpu=False))
    setup = TrainSetup(world=1, zero_stage=3, param_bytes=4, on_cuda=False, rows=2, seq_len=seen["seq_len"],
                       padded=seen["padded"],
                       checkpointing=cfg.model.gradient_checkpointing, loss_rows=seen["loss_rows"], buffers=buffers)
    est = training_memory(shape, lora, setup)
    measured_bytes = seen["peak_steps"]
    return {"case": name, "params": shape.params, "lora_trainable": lora.trainable if lora else 0,
            "seq_len": seen["seq_len"], "rows": 2, "loss_rows": seen["loss_rows"],
            "measured_peak_bytes": measured_bytes, "measured_peak_incl_load_bytes": seen["peak_all"],
            "measured_peak_phase": seen["peak_phase"], "estimate_phases": est.phases(),
            "estimate_bytes": est.total, "estimate_error": est.total / measured_bytes - 1,
            "estimate_components": {c.name: c.bytes for c in est.components},
            "plan_bound_bytes": bound, "plan_bound_max_length": max_length,
            "rss_steps_above_before_model_bytes": seen["rss_peak"] - seen["rss_before_model"]}


# ---- per-layer saved bytes ---------------------------------------------------------------------------------

LAYER_CASES = [(mt, dt, lora, drop, False) for mt in ("llama", "qwen3", "qwen3_moe") for dt in ("float32", "bfloat16")
               for lora, drop in ((False, 0.0), (True, 0.0), (True, 0.05))] + [
    ("llama", dt, lora, 0.0, True) for dt in ("float32", "bfloat16") for lora in (False, True)]


def layer_case(mt: str, dtype_name: str, lora: bool, dropout: float, padded: bool,
               tokens: int = 256) -> dict[str, Any]:
    from transformers import AutoConfig, AutoModelForCausalLM

    from tract_dist.loss.memory_probe import peak_tensor_bytes
    from tract_dist.plan.memory import layer_activation_bytes
    from tract_dist.plan.shape import lora_shape, model_shape

    dtype = getattr(torch, dtype_name)

    def config(layers: int) -> Any:
        kw = dict(hidden_size=256, intermediate_size=704, num_attention_heads=8, num_key_value_heads=2,
                  vocab_size=1000, num_hidden_layers=layers, tie_word_embeddings=False, max_position_embeddings=4096)
        if mt != "llama":
            kw["head_dim"] = 32
        if mt == "qwen3_moe":  # the router and the experts' 3D weights: PEFT's all-linear adapts them too
            kw.update(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=176)
        c = AutoConfig.for_model(mt, **kw)
        c._attn_implementation = "sdpa"
        return c

    lora_section = type("Lora", (), {"r": 8, "alpha": 16, "dropout": dropout,
                                     "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"] if mt == "qwen3_moe"
                                     else "all-linear"})()

    def peak(layers: int) -> int:
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config(layers))
        if lora:
            from peft import LoraConfig, get_peft_model

            model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=dropout,
                                                     target_modules=lora_section.target_modules))
        model = model.to(dtype).train()
        for p in model.parameters():
            if p.requires_grad:
                p.grad = torch.zeros_like(p)  # gradients outside the window: backward accumulates in place
        ids = torch.randint(0, 1000, (2, tokens // 2))  # two rows; padded: the second one half padding
        mask = torch.ones_like(ids)
        if padded:
            mask[1, tokens // 4:] = 0
        decoder = (model.get_base_model() if lora else model).get_decoder()

        def step() -> None:
            hidden = decoder(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
            hidden.backward(torch.ones_like(hidden))

        return peak_tensor_bytes(step)[1]

    measured = (peak(4) - peak(2)) / 2 / tokens
    from tract_dist.plan.shape import build_meta

    meta = build_meta(config(2))
    shape = model_shape(config(2), name=mt, source="bench", model=meta)
    lshape = lora_shape(meta, lora_section) if lora else None
    est = layer_activation_bytes(shape, lshape, torch.tensor([], dtype=dtype).element_size(), on_cuda=False,
                                 padded=padded)
    return {"arch": mt, "dtype": dtype_name, "lora": lora, "dropout": dropout, "padded": padded,
            "measured_bytes_per_token": measured,
            "estimate_bytes_per_token": est, "error": est / measured - 1}


# ---- one training step on this machine's accelerator (the prepared GPU check's model) ----------------------

STEP_PRESETS = {
    # benchmarks/train/bench_step.py's gpu-1b: random-llama-1b (Llama-3.2-1B shape), Llama-3 vocabulary, bf16
    "gpu-1b": dict(hidden_size=2048, num_layers=16, num_heads=32, num_kv_heads=8, intermediate_size=8192,
                   vocab=128256, batch=2, seq=2048, dtype="bfloat16"),
    "smoke": dict(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=128, vocab=4099,
                  batch=2, seq=128, dtype="float32"),
}


def step_case(preset: str, device: torch.device, checkpointing: bool) -> dict[str, Any]:
    """Forward and backward of one micro-batch through the fused CoT-RAFT head (bench_step's model and judge-shaped
    batch), gradients allocated before the window: the measured peak above that (max_memory_allocated on CUDA,
    torch's allocation records on CPU) is activations, the loss head and backward's transients, which the plan
    estimates as ``activation_components + loss_components``. Model states are DeepSpeed's estimator's part (not
    installed on the GPU machine). Needs only torch and transformers."""
    sys.path.insert(0, str(REPO / "benchmarks" / "train"))
    import bench_step
    from transformers import AutoModelForCausalLM

    from tract_dist.loss import CoTRaftLossOptions
    from tract_dist.loss.memory_probe import peak_tensor_bytes
    from tract_dist.models import CotRaftCausalLM, tiny_llama_config
    from tract_dist.plan.memory import MemoryEstimate, TrainSetup, activation_components, loss_components
    from tract_dist.plan.shape import build_meta, model_shape

    p = STEP_PRESETS[preset]
    dtype = getattr(torch, p["dtype"])
    dims = {k: p[k] for k in ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "intermediate_size")}
    config = tiny_llama_config(p["vocab"], tie=False, max_position_embeddings=p["seq"], attn_implementation="sdpa",
                               **dims)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    wrapper = CotRaftCausalLM(model, CoTRaftLossOptions(bench_step.SCORE_TOKEN_IDS, (1.0, 2.0, 3.0, 4.0, 5.0),
                                                        impl="fused"))
    for q in model.parameters():
        q.grad = torch.zeros_like(q)  # outside the window: backward accumulates into them
    batch = bench_step.make_batch({"batch": p["batch"], "seq": p["seq"], "vocab": p["vocab"]}, device)

    def step() -> None:
        wrapper(**batch).loss.backward()

    step()  # warm-up: Triton autotuning, the allocator's first blocks
    _, measured = peak_tensor_bytes(step, device)
    loss_rows = int((batch["labels"] != -100).sum()) + p["batch"]  # CE rows + one score row per sequence
    shape = model_shape(config, name=f"bench_step {preset}", source="bench", model=build_meta(config))
    on_cuda = device.type == "cuda"
    from tract_dist.loss import triton_kernels

    triton = on_cuda and triton_kernels.HAS_TRITON  # kernel auto: Triton tiles on CUDA, no fp32 work block
    setup = TrainSetup(world=1, zero_stage=0, param_bytes=dtype.itemsize, on_cuda=on_cuda, rows=p["batch"],
                       seq_len=p["seq"], padded=False, checkpointing=checkpointing, loss_rows=loss_rows,
                       triton_loss=triton)  # plain PyTorch: no ZeRO-3 linear (full fine-tuning: the same)
    comps = activation_components(shape, None, setup) + loss_components(shape, None, setup)
    estimate = MemoryEstimate(tuple(comps)).total
    del model, wrapper
    return {"preset": preset, "device": str(device), "dtype": p["dtype"], "checkpointing": checkpointing,
            "tokens": p["batch"] * p["seq"], "loss_rows": loss_rows, "measured_bytes": int(measured),
            "estimate_bytes": int(estimate), "error": estimate / measured - 1,
            "estimate_components": {c.name: c.bytes for c in comps}}


def peak_phase(phases: dict[str, int]) -> str:
    """The phase that sets an estimate's peak (``MemoryEstimate.total``'s rule)."""
    from tract_dist.plan.memory import ACTIVATIONS, LAYER_PHASE, LOSS_PHASE, OPTIMIZER_PHASE

    inner = LOSS_PHASE if phases.get(LOSS_PHASE, 0) >= phases.get(LAYER_PHASE, 0) else LAYER_PHASE
    forward_backward = phases.get(ACTIVATIONS, 0) + phases.get(inner, 0)
    return inner if forward_backward >= phases.get(OPTIMIZER_PHASE, 0) else OPTIMIZER_PHASE


def step_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| model | device | dtype | checkpointing | tokens | measured GiB | plan GiB | error |",
             "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['preset']} | {r['device']} | {r['dtype']} | {r['checkpointing']} | {r['tokens']} "
              f"| {r['measured_bytes'] / GIB:.3f} | {r['estimate_bytes'] / GIB:.3f} | {r['error']:+.1%} |"
              for r in rows]
    return "\n".join(lines) + "\n"


def write(out: Path, report: dict[str, Any], table: str) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    out.with_suffix(".md").write_text(table)
    print(table)


def main(argv: list[str] | None = None) -> int:
    from tract_dist import console

    console.attach()  # an entry point: the library's console lines (logged) on this terminal
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="output stem (.json and .md)")
    ap.add_argument("--layers", action="store_true", help="per-layer saved bytes instead of whole runs")
    ap.add_argument("--step", choices=sorted(STEP_PRESETS),
                    help="one fused-head training step of bench_step's model on this machine's accelerator (CUDA if "
                         "present), checkpointing off and on, instead of whole runs")
    ap.add_argument("--cases", default=",".join(CASES), help="whole-run cases")
    ap.add_argument("--max-length", type=int, default=768, help="data.max_length of the whole runs")
    ap.add_argument("--repeats", type=int, default=2, help="runs of each whole-run case (the peak varies)")
    ap.add_argument("--one", choices=sorted(CASES), help=argparse.SUPPRESS)  # internal: one case, JSON to --out
    args = ap.parse_args(argv)
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    meta = {"machine": f"cpu-{os.cpu_count()}core", "torch": torch.__version__, "python": platform.python_version(),
            "date": time.strftime("%Y-%m-%d")}
    if args.step:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        meta["machine"] = torch.cuda.get_device_name().replace(" ", "-") if device.type == "cuda" else meta["machine"]
        rows = [step_case(args.step, device, ckpt) for ckpt in (False, True)]
        table = (f"# One training step's activations and loss head: measured vs plan ({meta['machine']})\n\n"
                 f"`python benchmarks/plan/bench_plan_memory.py --step {args.step}`\n\n" + step_table(rows))
        write(Path(args.out), {"meta": meta, "rows": rows}, table)
        return 0
    if args.layers:
        rows = [layer_case(*c) for c in LAYER_CASES]
        lines = [f"# Saved activation bytes per token and decoder layer: measured vs plan ({meta['machine']})", "",
                 "`python benchmarks/plan/bench_plan_memory.py --layers`: hidden 256, 8/2 heads, intermediate 704 "
                 "(MoE: 8 experts, 2 per token, 176 each; LoRA r 8 on all linear layers, MoE: attention only), "
                 "2 rows x 128 tokens (padding mask: the second row half padding), sdpa; measured = (peak(4 layers) "
                 "- peak(2 layers)) / 2 / tokens, gradients allocated before the window.", "",
                 "| arch | dtype | LoRA | dropout | padding mask | measured B | plan B | error |",
                 "|---|---|---|---|---|---|---|---|"]
        lines += [f"| {r['arch']} | {r['dtype']} | {r['lora']} | {r['dropout']} | {r['padded']} "
                  f"| {r['measured_bytes_per_token']:.0f} "
                  f"| {r['estimate_bytes_per_token']} | {r['error']:+.2%} |" for r in rows]
        write(Path(args.out), {"meta": meta, "rows": rows}, "\n".join(lines) + "\n")
        return 0
    if args.one:  # one case in this process (the parent runs each in its own: freed memory, no carry-over)
        with tempfile.TemporaryDirectory() as tmp:
            row = run_case(args.one, CASES[args.one], Path(tmp), args.max_length)
        Path(args.out).write_text(json.dumps(row))
        return 0
    rows = []
    for name in args.cases.split(","):
        runs = []
        for k in range(args.repeats):
            print(f"[bench] {name} ({k + 1}/{args.repeats}) ...", flush=True)
            with tempfile.TemporaryDirectory() as tmp:
                part = Path(tmp) / "row.json"
                subprocess.run([sys.executable, __file__, "--one", name, "--out", str(part), "--max-length",
                                str(args.max_length)], check=True)
                runs.append(json.loads(part.read_text()))
        # The estimate is the same every run; the measured peak moves with when Python's collector frees
        # autograd's reference cycles (the threads' allocations shift it): every run's peak is kept.
        row = dict(runs[0])
        peaks = [r["measured_peak_bytes"] for r in runs]
        row.update(measured_peaks_bytes=peaks, measured_peak_phases=[r["measured_peak_phase"] for r in runs],
                   estimate_error_range=[row["estimate_bytes"] / max(peaks) - 1,
                                         row["estimate_bytes"] / min(peaks) - 1])
        rows.append(row)
    lines = [f"# Training memory: the plan's estimate vs the measured peak ({meta['machine']})", "",
             f"{meta['date']}, torch {meta['torch']}. `python benchmarks/plan/bench_plan_memory.py`: the project's "
             "trainer in-process (ZeRO-3 world 1, fp32 on CPU, fused loss, AdamW), 2 sequences per micro-batch "
             "(from records 0-3 of the quickstart sample), 2 optimizer steps. Measured: peak of live tensor bytes "
             "(torch's allocation records) from before the model is built to the end of step 2. Estimate: "
             "`tract_dist.plan.memory.training_memory` at the run's padded length and loss rows; bound: the plan "
             f"of the config (data.max_length {args.max_length}, plan.loss_rows_fraction).", "",
             f"| case | params | tokens | measured GiB ({args.repeats} runs) | measured peak in | estimate GiB "
             "| estimate's peak phase | error | plan bound GiB | RSS during steps above pre-model GiB |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lora = f" + LoRA {r['lora_trainable'] / 1e6:.2f}M" if r["lora_trainable"] else ""
        lo, hi = r["estimate_error_range"]
        measured = " / ".join(f"{b / GIB:.3f}" for b in r["measured_peaks_bytes"])
        lines.append(f"| {r['case']} | {r['params'] / 1e6:.1f}M{lora} | 2 x {r['seq_len']} | {measured} "
                     f"| {' / '.join(r['measured_peak_phases'])} | {r['estimate_bytes'] / GIB:.3f} "
                     f"| {peak_phase(r['estimate_phases'])} | {lo:+.1%} to {hi:+.1%} "
                     f"| {r['plan_bound_bytes'] / GIB:.3f} | {r['rss_steps_above_before_model_bytes'] / GIB:.3f} |")
    lines += ["", "Components of each estimate (GiB):", ""]
    for r in rows:
        parts = ", ".join(f"{k} {v / GIB:.3f}" for k, v in r["estimate_components"].items())
        lines.append(f"- {r['case']}: {parts}")
    write(Path(args.out), {"meta": meta, "rows": rows}, "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
