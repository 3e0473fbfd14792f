"""Compiles the Pallas-Triton kernels to PTX for sm_90 on a CPU-only machine, and reads their
resources (registers, spills, shared memory) and instructions with ``ptxas -v`` and ``nvdisasm``.

What it needs (test-only; ``scripts/setup.sh test`` installs it into :data:`TOOLCHAIN_DIR`, not
into ``.venv``): ``jax-cuda12-plugin`` and ``jax-cuda12-pjrt`` of the installed jaxlib's version,
``nvidia-cuda-nvcc-cu12`` (``ptxas``) and ``nvidia-cuda-nvdisasm`` (SASS). The plugin registers
the Triton-to-PTX compiler that XLA uses on a GPU; with ``JAX_SKIP_CUDA_CONSTRAINTS_CHECK=1`` it
loads without a driver. It is kept out of ``.venv`` because, installed there, every jax process on
a CPU-only machine logs CUDA-driver lines to stderr (which breaks the launch commands'
one-line-error contract, ``tests/test_cli.py``).

The compile runs in a subprocess (:func:`run_report`), ``python tests/ptx_tools.py --out
report.json``, with the toolchain on ``PYTHONPATH``. Per kernel it records: Triton's dynamic
shared memory (what the launch requests; ptxas only sees the static part), ptxas's registers per
thread, spill stores/loads and stack, ptxas's performance notes, instruction counts in the PTX,
and from the SASS the spill instructions inside loops that issue MMAs (the K loops) and inside
any loop. ``--markdown`` prints the report as the table in ``docs/kernels.md``.

How a kernel's PTX is obtained: the kernels are lowered for the cuda platform with abstract
inputs (no data); each kernel's Triton IR is in the module (custom call ``__gpu$xla.gpu.triton``)
and is compiled with the handler the plugin registers, ``jax._src.lib.triton.compile`` (jaxlib
0.10). jaxlib 0.11 dropped that handler: there, PTX only comes from an XLA compile for a CUDA
target (a deviceless AOT compile), which is not implemented here; :func:`compile_route_problem`
says so and the tests skip.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import functools
import json
import os
import pathlib
import re
import subprocess
import sys
import tempfile
from typing import Any

ROOT = pathlib.Path(__file__).resolve().parent.parent
TOOLCHAIN_DIR = ROOT / ".cache" / "ptx-toolchain"
PTXAS = TOOLCHAIN_DIR / "nvidia" / "cuda_nvcc" / "bin" / "ptxas"
NVDISASM = TOOLCHAIN_DIR / "nvidia" / "cu13" / "bin" / "nvdisasm"
ARCH = "9.0"           # compute capability given to Triton (H100 / H200)
PTXAS_ARCH = "sm_90a"  # wgmma needs the arch-specific target, which Triton emits for 9.0
SMEM_LIMIT = 232_448   # bytes of shared memory one block may request on sm_90 (227 KiB)

# Instruction patterns counted in the PTX (regular expressions on the PTX text).
PATTERNS = {
    "wgmma_s8": r"wgmma\.mma_async\S*\.s32\.s8\.s8",
    "wgmma_bf16": r"wgmma\.mma_async\S*\.f32\.bf16\.bf16",
    "wgmma_f16": r"wgmma\.mma_async\S*\.f32\.f16\.f16",
    "wgmma_tf32": r"wgmma\.mma_async\S*\.tf32",
    "mma_sync": r"\bmma\.sync\.",
    "mma_sync_s8": r"\bmma\.sync\.\S*\.s8",
    "mma_sync_tf32": r"\bmma\.sync\.\S*\.tf32",
    "cp_async": r"\bcp\.async\.c[ag]\.shared\.global",
    "cp_async_wait": r"\bcp\.async\.wait_group",
    "tma": r"\bcp\.async\.bulk\.tensor",
    "div_rn_f32": r"\bdiv\.rn\.f32",
    "div_approx_f32": r"\bdiv\.(?:full|approx)\S*\.f32",
    "cvt_rni_s32_f32": r"\bcvt\.rni\.s32\.f32",
}


# ----------------------------------------------------------------------------- what is compiled
@dataclasses.dataclass(frozen=True)
class Shape:
  m: int
  k: int
  n: int
  rank: int = 32
  shifted: bool = False
  dtype: str = "bfloat16"
  bias: bool = True

  def __str__(self) -> str:
    return (f"m{self.m}_k{self.k}_n{self.n}_r{self.rank}_{'u' if self.shifted else 's'}_{self.dtype}"
            f"{'' if self.bias else '_nobias'}")


# FLUX.1 at 1024x1024 (docs/kernels.md §4.1): image-stream qkv (large M), text-stream qkv (small M),
# the unsigned fc2 (after GELU, K = 12288); and an edge shape: M, N off every tile, 7 groups
# (a static tail after the loop), a rank that is padded.
QKV = Shape(4096, 3072, 9216)
TEXT_QKV = Shape(512, 3072, 9216)
FC2 = Shape(4096, 12288, 3072, shifted=True)
EDGE = Shape(300, 448, 200, rank=24)


@dataclasses.dataclass(frozen=True)
class Case:
  """One compile: ``kernels`` of ``config`` at ``shape``.

  ``kind``: ``table`` (a ``TRITON_TABLE`` entry; ``keys`` lists the entries with these tiles),
  ``variant`` (a production tile at another shape/dtype), ``gemm-candidate`` /
  ``quantize-candidate`` (sweep lists). ``production``: the tiles run by default on a GPU.
  """
  kind: str
  keys: tuple[str, ...]
  config: Any  # tuning.TritonConfig
  shape: Shape
  kernels: tuple[str, ...] = ("quantize", "gemm")

  @property
  def production(self) -> bool:
    return self.kind in ("table", "variant")

  @property
  def id(self) -> str:
    return f"{self.kind}:{'+'.join(self.keys)}:{self.config.name}:{self.shape}"


def cases() -> list[Case]:
  """Every tile configuration of ``tuning.py`` (table entries, variants of the H100 tiles, sweep
  candidates), each with the shapes it is meant for."""
  from svdquant_jax.pallas import tuning
  by_tiles: dict[tuple, list[str]] = collections.defaultdict(list)
  for (device, klass), cfg in tuning.TRITON_TABLE.items():
    if device != "interpret":
      by_tiles[(cfg.quantize, cfg.gemm, klass)].append(f"{device}/{klass}")
  out = []
  for (qt, gt, klass), keys in by_tiles.items():
    out.append(Case("table", tuple(keys), tuning.TritonConfig(qt, gt), QKV if klass == "large" else TEXT_QKV))
  large, small = tuning.TRITON_TABLE[("h100", "large")], tuning.TRITON_TABLE[("h100", "small")]
  for shape in (FC2, dataclasses.replace(QKV, rank=0, shifted=True, dtype="float16", bias=False), EDGE):
    out.append(Case("variant", ("h100/large",), large, shape))
  # float32 activations: the tiles triton_config picks for them (tuning.for_dtype)
  out.append(Case("variant", ("h100/large",), tuning.for_dtype(large, "float32"),
                  dataclasses.replace(QKV, dtype="float32")))
  out.append(Case("variant", ("h100/small",), small, dataclasses.replace(EDGE, m=50)))
  for gt in tuning.TRITON_GEMM_CANDIDATES:
    out.append(Case("gemm-candidate", ("sweep",), tuning.TritonConfig(tuning.QuantizeTile(), gt), QKV, ("gemm",)))
  for qt in tuning.TRITON_QUANTIZE_CANDIDATES:
    out.append(Case("quantize-candidate", ("sweep",), tuning.TritonConfig(qt, tuning.GemmTile()), QKV,
                    ("quantize",)))
  return out


# ----------------------------------------------------------------------------- the toolchain
def toolchain_problem() -> str | None:
  """Why the PTX toolchain cannot run here, or ``None``."""
  import jaxlib.version
  version = jaxlib.version.__version__
  for tool in (PTXAS, NVDISASM):
    if not tool.is_file():
      return f"{tool} missing (scripts/setup.sh test installs the PTX toolchain)"
  plugin = TOOLCHAIN_DIR / f"jax_cuda12_plugin-{version}.dist-info"
  if not plugin.is_dir():
    found = sorted(p.name for p in TOOLCHAIN_DIR.glob("jax_cuda12_plugin-*.dist-info"))
    return f"jax-cuda12-plugin {version} (the jaxlib version) is not in {TOOLCHAIN_DIR}: found {found}"
  return None


def compile_route_problem() -> str | None:
  """Why this jaxlib cannot compile Triton IR to PTX from Python, or ``None``."""
  import jaxlib.version
  from jax._src.lib import triton
  if not hasattr(triton, "compile"):
    return (f"jaxlib {jaxlib.version.__version__} has no Python Triton compiler (jax._src.lib.triton.compile, "
            "gone in 0.11): PTX needs a deviceless XLA compile for a CUDA target, not implemented in ptx_tools")
  return None


def subprocess_env() -> dict[str, str]:
  """The environment of the compile subprocess: the toolchain on ``PYTHONPATH``, the CUDA
  plugin allowed to load without a driver, and jax on the CPU."""
  env = dict(os.environ)
  env["PYTHONPATH"] = os.pathsep.join([str(TOOLCHAIN_DIR), str(ROOT)] + ([env["PYTHONPATH"]]
                                                                          if env.get("PYTHONPATH") else []))
  env["JAX_SKIP_CUDA_CONSTRAINTS_CHECK"] = "1"
  env["JAX_PLATFORMS"] = "cpu"
  env["TF_CPP_MIN_LOG_LEVEL"] = "1"  # the plugin's "no CUDA driver" info lines
  return env


def run_report(out: pathlib.Path, timeout: float = 600) -> dict[str, Any]:
  """Compiles every case in a subprocess and returns the report (see :func:`compile_case`)."""
  done = subprocess.run([sys.executable, __file__, "--out", str(out)], env=subprocess_env(), cwd=ROOT,
                        capture_output=True, text=True, timeout=timeout)
  if done.returncode != 0:
    raise RuntimeError(f"the PTX compile subprocess failed (exit {done.returncode}):\n{done.stderr[-5000:]}")
  return json.loads(out.read_text())


# ----------------------------------------------------------------------------- lowering -> PTX
KERNEL_NAMES = {"quantize": "svdquant_quantize", "gemm": "svdquant_gemm"}  # pallas_call names in triton.py


@dataclasses.dataclass
class Compiled:
  name: str
  ptx: str
  smem_bytes: int
  num_warps: int
  num_stages: int


def _abstract_inputs(shape: Shape):
  import jax
  import jax.numpy as jnp
  from svdquant_jax.formats import packing, quantizers as q
  dtype = jnp.dtype(shape.dtype)
  sds = lambda *s: jax.ShapeDtypeStruct(s, dtype)
  build = functools.partial(packing.from_float, fmt="int4", shift=q.GELU_SHIFT if shape.shifted else 0.0)
  bias = sds(shape.n) if shape.bias else None
  params = jax.eval_shape(lambda w, b, s, a, bb: build(w, b, s, a, bb), sds(shape.k, shape.n), bias, sds(shape.k),
                          sds(shape.k, shape.rank), sds(shape.rank, shape.n))
  return sds(shape.m, shape.k), params


def _compile_custom_calls(module, prefixes: tuple[str, ...]) -> list[Compiled]:
  """Compiles the Triton IR of the ``__gpu$xla.gpu.triton`` custom calls whose kernel name
  starts with one of ``prefixes`` (jaxlib <= 0.10.2)."""
  from jax._src.lib import triton
  from jax._src.lib.mlir import ir
  out = []

  def walk(op):
    for region in op.regions:
      for block in region.blocks:
        for child in block.operations:
          child = child.operation
          if (child.name == "stablehlo.custom_call"
              and ir.StringAttr(child.attributes["call_target_name"]).value == "__gpu$xla.gpu.triton"):
            cfg = child.attributes["mhlo.backend_config"]
            name = ir.StringAttr(cfg["name"]).value
            if not name.startswith(prefixes):
              continue
            warps, stages = (ir.IntegerAttr(cfg[k]).value for k in ("num_warps", "num_stages"))
            result = triton.compile("cuda", ir.StringAttr(cfg["ir"]).value_bytes, ARCH, num_warps=warps, num_ctas=1,
                                    num_stages=stages)
            out.append(Compiled(name, result.asm, result.smem_bytes, warps, stages))
          walk(child)

  walk(module.operation)
  return out


def compile_case(case: Case) -> dict[str, Compiled]:
  """Lowers the case's kernels for cuda and compiles them to PTX (sm_90): kernel -> result."""
  import jax
  from svdquant_jax.pallas import triton as tr
  x, params = _abstract_inputs(case.shape)
  cfg = case.config

  def op(x, params):
    m_pad = tr.padded_rows(x.shape[0], cfg)
    codes, scales, parts = tr.quantize_activations(x, params, cfg.quantize, m_pad=m_pad, interpret=False)
    if "gemm" not in case.kernels:
      return codes, scales, parts
    lora_act = None if parts is None else tr.reduce_lora_partials(parts, x.dtype)
    return tr.gemm(codes, scales, lora_act, params, x.shape[0], x.dtype, cfg.gemm, interpret=False)

  prefixes = tuple(KERNEL_NAMES[k] for k in case.kernels)
  # An abstract H100 as the target: jax 0.11 refuses to lower Pallas-Triton for cuda without a GPU
  # device or one (0.10 takes compute capability 9.0 by default).
  h100 = jax.sharding.AbstractMesh((1,), ("x",), abstract_device=jax.sharding.AbstractDevice(
      device_kind="NVIDIA H100", num_cores=None, platform="gpu"))
  with jax.sharding.use_abstract_mesh(h100):
    lowered = jax.jit(op).trace(x, params).lower(lowering_platforms=("cuda",))
  compiled = _compile_custom_calls(lowered.compiler_ir("stablehlo"), prefixes)
  wanted = {k: [c for c in compiled if c.name.startswith(KERNEL_NAMES[k])] for k in case.kernels}
  if any(len(v) != 1 for v in wanted.values()):
    raise RuntimeError(f"{case.id}: expected one compile of each of {case.kernels}, got {[c.name for c in compiled]}")
  return {k: v[0] for k, v in wanted.items()}


# ----------------------------------------------------------------------------- ptxas
def ptxas_version() -> str:
  done = subprocess.run([str(PTXAS), "--version"], capture_output=True, text=True, check=True)
  release = [line for line in done.stdout.splitlines() if "release" in line]
  return "ptxas " + (release[0].split(",")[-1].strip() if release else done.stdout.strip().splitlines()[-1])


def run_ptxas(ptx: str) -> dict[str, Any]:
  """``ptxas -v`` for :data:`PTXAS_ARCH`: registers, spill stores/loads (bytes), stack, static
  shared memory, ptxas's notes (e.g. C7514: wgmma serialized), and the SASS spill counts of
  :func:`sass_spills`."""
  with tempfile.TemporaryDirectory() as tmp:
    src = pathlib.Path(tmp) / "kernel.ptx"
    cubin = src.with_suffix(".cubin")
    src.write_text(ptx)
    done = subprocess.run([str(PTXAS), "-v", f"-arch={PTXAS_ARCH}", str(src), "-o", str(cubin)],
                          capture_output=True, text=True)
    log = done.stdout + done.stderr
    if done.returncode != 0:
      raise RuntimeError(f"ptxas failed (exit {done.returncode}):\n{log[-3000:]}")
    sass = subprocess.run([str(NVDISASM), "-c", str(cubin)], capture_output=True, text=True, check=True).stdout
  num = lambda pattern: int(m.group(1)) if (m := re.search(pattern, log)) else 0
  notes = sorted({f"{m.group(1)}: {m.group(2)}" for m in re.finditer(r"\((C\d+)\) ([^\n]*?)(?: in (?:around )?line|$)",
                                                                         log, re.M)})
  return {"registers": num(r"Used (\d+) registers"), "spill_stores": num(r"(\d+) bytes spill stores"),
          "spill_loads": num(r"(\d+) bytes spill loads"), "stack_bytes": num(r"(\d+) bytes stack frame"),
          "static_smem_bytes": num(r"(\d+) bytes smem"), "notes": notes, **sass_spills(sass)}


_SASS_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*)")
_SPILL = re.compile(r"\b(?:STL|LDL)\b")
_MMA = re.compile(r"\b(?:[IH]GMMA|HMMA|IMMA)\b")


def sass_spills(sass: str) -> dict[str, int]:
  """Spill instructions (``STL``/``LDL``) in ``nvdisasm`` output: in all, inside loops, and
  inside loops that issue MMAs (the K loops). A loop is a backward branch ``BRA`` to a label;
  its body is the address range from the label to the branch."""
  labels: dict[str, int] = {}
  pending: list[str] = []
  code: list[tuple[int, str]] = []
  for line in sass.splitlines():
    if m := re.match(r"\s*\.(L_x_\d+):", line):
      pending.append(m.group(1))
    elif m := _SASS_LINE.search(line):
      address = int(m.group(1), 16)
      labels.update((name, address) for name in pending)
      pending = []
      code.append((address, m.group(2)))
  loops = [(labels[m.group(1)], address) for address, text in code
           if (m := re.search(r"\bBRA\b.*\(\.(L_x_\d+)\)", text)) and labels.get(m.group(1), address) < address]
  in_loop = lambda address: any(lo <= address <= hi for lo, hi in loops)
  mma_loops = [(lo, hi) for lo, hi in loops if any(lo <= a <= hi and _MMA.search(t) for a, t in code)]
  spills = [address for address, text in code if _SPILL.search(text)]
  return {"sass_spills": len(spills), "sass_spills_in_loops": sum(map(in_loop, spills)),
          "sass_spills_in_mma_loops": sum(any(lo <= a <= hi for lo, hi in mma_loops) for a in spills),
          "sass_mma_loops": len(mma_loops)}


def count_instructions(ptx: str) -> dict[str, int]:
  return {name: len(re.findall(pattern, ptx)) for name, pattern in PATTERNS.items()}


def report(selected: list[Case]) -> dict[str, Any]:
  import jax
  import jaxlib.version
  jax.devices()  # loads the CUDA plugin, which registers the Triton compiler
  from jax._src.lib import triton
  if not triton.has_compilation_handler("cuda"):
    raise RuntimeError("the jax CUDA plugin did not register a Triton compiler (is it on PYTHONPATH?)")
  kernels = []
  for case in selected:
    for kind, c in compile_case(case).items():
      kernels.append({"case": case.id, "kind": case.kind, "keys": list(case.keys), "config": case.config.name,
                      "shape": str(case.shape), "kernel": kind, "production": case.production,
                      "num_warps": c.num_warps, "num_stages": c.num_stages, "smem_bytes": c.smem_bytes,
                      **run_ptxas(c.ptx), "instructions": count_instructions(c.ptx)})
  return {"jax": jax.__version__, "jaxlib": jaxlib.version.__version__, "ptxas": ptxas_version(),
          "arch": PTXAS_ARCH, "kernels": kernels}


def markdown(rep: dict[str, Any]) -> str:
  """The report as a markdown table (one row per kernel)."""
  lines = [f"jax {rep['jax']}, jaxlib {rep['jaxlib']}, {rep['ptxas']}, {rep['arch']}.", "",
           "| config (keys) | shape | kernel | warps/stages | regs | spill st/ld (B) | spill instr. in loops | SMEM (B) "
           "| MMA (PTX count) | cp.async | ptxas notes |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
  for k in rep["kernels"]:
    ins = k["instructions"]
    mma = ", ".join(f"{n} {ins[n]}" for n in ("wgmma_s8", "wgmma_bf16", "wgmma_f16", "mma_sync") if ins[n]) or "none (FMA)"
    notes = ", ".join(n.split(":")[0] for n in k["notes"]) or "-"
    lines.append(f"| {k['config']} ({', '.join(k['keys'])}) | {k['shape']} | {k['kernel']} | "
                 f"{k['num_warps']}/{k['num_stages']} | {k['registers']} | {k['spill_stores']}/{k['spill_loads']} | "
                 f"{k['sass_spills_in_loops']} | {k['smem_bytes'] + k['static_smem_bytes']} | {mma} | "
                 f"{ins['cp_async']} | {notes} |")
  return "\n".join(lines)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", type=pathlib.Path, help="where the JSON report is written")
  parser.add_argument("--markdown", action="store_true", help="print the report as a markdown table")
  parser.add_argument("--only", default="", help="compile only the cases whose id contains this")
  args = parser.parse_args()
  rep = report([c for c in cases() if args.only in c.id])
  if args.out:
    args.out.write_text(json.dumps(rep, indent=1))
  if args.markdown:
    print(markdown(rep))


if __name__ == "__main__":
  main()
