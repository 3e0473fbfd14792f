"""How long SVDQuant PTQ takes per block at real FLUX shapes (:mod:`svdquant_jax.flows.ptq_benchmark`).

    python launch/benchmark_ptq.py                              # GPU: FLUX.1-dev shapes, 128 samples
    python launch/benchmark_ptq.py --method=int4,gptq           # with GPTQ
    python launch/benchmark_ptq.py --config_name=flux-tiny --samples=4 --img_tokens=64 --txt_tokens=16 \
        --num_grids=2 --lowrank_iters=2                         # CPU code-path check

Times one double and one single block (random weights at real widths, random inputs), first call
(with compilation) and steady state, and extrapolates to the whole model. Prints the FLOPs of each
stage, the achieved rate against this device's plain matmul rate (measured in the same run), and,
with ``--device_tflops``, an estimate of the whole FLUX.1 run (128 x (4096 + 512) tokens) on a
device of that matmul rate, e.g. ``--device_tflops=67`` (H100 SXM float32 peak, the searches'
precision) or ``=655`` (H100 bf16 dot, measured: docs/kernels.md):

    python launch/benchmark_ptq.py --samples=1 --img_tokens=256 --txt_tokens=64 --num_grids=2 \
        --lowrank_iters=1 --device_tflops=67,655   # CPU: real widths, few tokens

    python launch/benchmark_ptq.py --search_cuts=1024,128,384,3 --lowrank_iters=3  # quality of the cuts vs exact
    python launch/benchmark_ptq.py --method=flux-dev,int4 --lowrank_iters=10 --device_tflops=67 --bf16_tflops=655 \
        --estimate_only                                             # FLOP estimate only, no blocks run

Memory instead of time (XLA's analysis of the compiled programs, nothing allocated; docs/design.md, "PTQ memory"):

    python launch/benchmark_ptq.py --memory --max_tokens=131072 --batch_size=1   # FLUX.1-dev, 128 x 4608 tokens

The search cost cuts (``quant.search``: ``--mode=exact|fast``, ``--loss_dtype``, ``--halving_tokens``,
``--halving_keep``) are counted in the FLOPs; ``--bf16_tflops=655`` puts the bf16 loss evaluations at
that rate in the ``--device_tflops`` estimates.
"""

from absl import flags
import jax

from svdquant_jax.flows import ptq_benchmark, ptq_memory
from svdquant_jax.utils import cli

_CONFIG_NAME = flags.DEFINE_string("config_name", "flux-dev", "FLUX preset whose widths are used.")
_METHOD = flags.DEFINE_list("method", ["int4"], "Method parts (svdquant_jax/flows/ptq_config.py).")
_SAMPLES = flags.DEFINE_integer("samples", 128, "Calibration samples.")
_IMG_TOKENS = flags.DEFINE_integer("img_tokens", 4096, "Image tokens per sample (1024x1024: 4096).")
_TXT_TOKENS = flags.DEFINE_integer("txt_tokens", 512, "Text tokens per sample (FLUX.1-dev: 512).")
_DTYPE = flags.DEFINE_string("dtype", "bfloat16", "Model dtype.")
_OVERRIDES = {name: flags.DEFINE_integer(name, None, f"Override the method's {name}.")
              for name in ("num_grids", "lowrank_iters", "batch_size", "candidates_per_batch", "max_tokens")}
_SEARCH = {"mode": flags.DEFINE_enum("mode", None, ["fast", "exact"], "Override quant.search.mode."),
           "loss_dtype": flags.DEFINE_enum("loss_dtype", None, ["float32", "bfloat16"],
                                           "Override quant.search.loss_dtype."),
           "halving_tokens": flags.DEFINE_integer("halving_tokens", None, "Override quant.search.halving_tokens."),
           "halving_keep": flags.DEFINE_float("halving_keep", None, "Override quant.search.halving_keep.")}
_BF16_TFLOPS = flags.DEFINE_float("bf16_tflops", None, "With --device_tflops: the bf16 matmul TFLOP/s the loss "
                                  "evaluations run at when quant.search.loss_dtype is bfloat16 (e.g. 655).")
_NUM_DOUBLE = flags.DEFINE_integer("num_double", None, "Double blocks of the model (default: the preset's).")
_DEVICE_TFLOPS = flags.DEFINE_list("device_tflops", [], "Matmul TFLOP/s of devices to extrapolate the "
                                   "whole FLUX.1 run to (an estimate from FLOPs).")
_GROUP = flags.DEFINE_list("group", [], "K,N,T: instead of the blocks, time one linear group of a [K, N] kernel "
                           "on T tokens and print its FLOP/s against the plain matmul rate.")
_CUTS = flags.DEFINE_list("search_cuts", [], "rows,K,N[,seeds]: instead of the blocks, compare the search cost "
                          "cuts with the exact search on seeded synthetic outlier layers (error ratio, (alpha, "
                          "beta) agreement; uses --num_grids and --lowrank_iters, defaults 20 and 100).")
_ESTIMATE_ONLY = flags.DEFINE_bool("estimate_only", False, "With --device_tflops: print only the FLOP-based "
                                    "FLUX.1-dev estimates at 100% of the rate (no blocks are run).")
_NUM_SINGLE = flags.DEFINE_integer("num_single", None, "Single blocks of the model (default: the preset's).")
_MEMORY = flags.DEFINE_bool("memory", False, "Instead of timing: XLA's memory analysis (arguments, outputs, "
                            "temporaries) of every group's recording pass and search at these shapes, compiled "
                            "with abstract inputs (nothing is allocated or run).")
_GROUPS = flags.DEFINE_list("groups", [], "With --memory: only these group names (e.g. ff.fc1,qkv_mlp).")


def main(argv):
  del argv
  settings = ptq_benchmark.settings_for(_METHOD.value, _DTYPE.value,
                                        **{name: flag.value for name, flag in {**_OVERRIDES, **_SEARCH}.items()})
  if _CUTS.value:
    rows, k, n, *seeds = (int(v) for v in _CUTS.value)
    result = ptq_benchmark.compare_search_cuts(
        seeds=tuple(range(seeds[0] if seeds else 3)), rows=rows, k=k, n=n,
        formats=[m for m in _METHOD.value if m in ("int4", "nvfp4")] or ["int4"],
        num_grids=_OVERRIDES["num_grids"].value or 20, lowrank_iters=_OVERRIDES["lowrank_iters"].value or 100,
        log=lambda r: print(f"seed {r['seed']} {r['format']} {r['variant']}: error {r['error']:.5f} "
                            f"({r['error_ratio']:.4f} x exact), pair {r['pair']}, {r['seconds']:.1f} s", flush=True))
    print(ptq_benchmark.format_search_cuts(result))
    return
  if _MEMORY.value:
    report = ptq_memory.memory_report(_CONFIG_NAME.value, settings, samples=_SAMPLES.value,
                                      img_tokens=_IMG_TOKENS.value, txt_tokens=_TXT_TOKENS.value, dtype=_DTYPE.value,
                                      groups=_GROUPS.value, log=lambda row: print(ptq_memory.format_row(row), flush=True))
    print(ptq_memory.format_report(report, f"{_CONFIG_NAME.value}: {_SAMPLES.value} x ({_IMG_TOKENS.value} + "
                                           f"{_TXT_TOKENS.value}) tokens, max_tokens {settings.max_tokens}, batch "
                                           f"{settings.batch_size}, {settings.candidate_batch} candidates per batch, "
                                           f"loss chunks {settings.loss_chunk_tokens} (GB, XLA {jax.default_backend()})"))
    return
  if _ESTIMATE_ONLY.value:
    for tflops in _DEVICE_TFLOPS.value:
      bf16 = None if _BF16_TFLOPS.value is None else _BF16_TFLOPS.value * 1e12
      estimate = ptq_benchmark.model_estimate("flux-dev", settings, float(tflops) * 1e12, bf16_flops_per_s=bf16)
      print(ptq_benchmark.format_estimate(estimate, f"FLUX.1-dev, {tflops} TFLOP/s, bf16 losses {_BF16_TFLOPS.value} "
                                                    f"TFLOP/s, loss {settings.loss_dtype}, halving from "
                                                    f"{settings.halving_tokens} tokens, 100% of the rates"))
    return
  if _GROUP.value:
    k, n, t = (int(v) for v in _GROUP.value)
    r = ptq_benchmark.group_efficiency(k, n, t, settings)
    print(f"group [{k}, {n}] x {t} tokens: {r['flops']:.3g} FLOPs in {r['seconds']:.2f} s = "
          f"{r['flops_per_s'] / 1e9:.1f} GFLOP/s; plain f32 HIGHEST matmul {r['matmul_flops_per_s'] / 1e9:.1f} GFLOP/s; "
          f"efficiency {r['efficiency']:.2f}; loss evaluations {r['loss_share']:.0%} of the FLOPs; "
          f"{r['lowrank_iters_run']} low-rank iterations run; smoothing pair {r['smooth_index']} "
          f"(loss {r['loss_dtype']}, halving from {r['halving_tokens']} tokens)")
    return
  result = ptq_benchmark.run_benchmark(_CONFIG_NAME.value, settings, samples=_SAMPLES.value,
                                       img_tokens=_IMG_TOKENS.value, txt_tokens=_TXT_TOKENS.value,
                                       dtype=_DTYPE.value, num_double=_NUM_DOUBLE.value, num_single=_NUM_SINGLE.value)
  print(ptq_benchmark.format_table(result))
  print(ptq_benchmark.format_cost_table(result))
  efficiency = min(1.0, min(r["quantize_flops_per_s"] / result["matmul_rates"]["f32_highest"]
                            for r in result["rows"]))
  for tflops in _DEVICE_TFLOPS.value:
    for eff, label in ((1.0, "at 100% of the matmul rate"), (efficiency, f"at this run's efficiency {efficiency:.2f}")):
      bf16 = None if _BF16_TFLOPS.value is None else _BF16_TFLOPS.value * 1e12
      estimate = ptq_benchmark.model_estimate("flux-dev", settings, float(tflops) * 1e12, eff, bf16_flops_per_s=bf16)
      rate = f"{tflops} TFLOP/s" + (f" (bf16 losses {_BF16_TFLOPS.value} TFLOP/s)" if bf16 else "")
      print(ptq_benchmark.format_estimate(estimate, f"FLUX.1-dev, 128 x (4096 + 512) tokens, {rate}, "
                                                    f"{label}, compile excluded"))


if __name__ == "__main__":
  cli.run(main)
