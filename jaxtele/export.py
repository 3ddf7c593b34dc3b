"""`python -m jaxtele.export`: convert a model or a training run between formats.

  python -m jaxtele.export --source SmolLM2.gguf --out exported/smollm2                 # GGUF -> HF folder
  python -m jaxtele.export --source HuggingFaceTB/SmolLM2-135M --out exported/smol --format jaxtele
  python -m jaxtele.export --source runs/my_lora_run --out exported/adapter --format adapter [--step 200]
  python -m jaxtele.export --source peft_adapter/ --base HuggingFaceTB/SmolLM2-135M --out merged --format hf
  python -m jaxtele.export --source runs/my_lora_run --out exported/gguf --format gguf --quant q8_0

Sources: an HF folder, an HF hub id (online), a `.gguf` file, a jaxtele folder, a run directory
(its latest checkpoint, or `--step`), or a PEFT adapter folder with `--base` (default: the adapter's
`base_model_name_or_path`). Formats:
  hf       a folder `transformers` loads (a LoRA run is merged first; an NF4 base needs --dequantize)
  adapter  a PEFT adapter (LoRA runs), with `base/` beside it when the run's base is not an HF folder
  jaxtele  config.json + an Orbax checkpoint of the parameters, loadable as a model source
  gguf     a folder holding `model.gguf` (llama.cpp layout, tokenizer and chat template in the metadata;
           LoRA merged first), matrices in --quant f16 | bf16 | q8_0 | f32
The output is written to a temporary sibling and renamed into place at the end, so a failed export
never leaves a half-written folder, and an existing output is replaced only with `--overwrite`.
Before the rename the export is reloaded and checked against the in-memory model (`convert/certify.py`);
`certificate.json` beside it records the checks, and a failed check stops the export (`--no-verify` skips them).
`--select best-within-budget` exports a run's best checkpoint within its forgetting budget (`frontier.py`).
"""

import argparse
import contextlib
import os
import shutil
import sys
import tempfile

from jaxtele import frontier, source as model_source
from jaxtele.convert import certify
from jaxtele.errors import JaxteleError, cli
from jaxtele.run import EXPORT, RunDir, write_record

FORMATS = ("hf", "adapter", "jaxtele", "gguf")
GGUF_FILE = "model.gguf"
DTYPES = ("float32", "bfloat16", "float16")


@contextlib.contextmanager
def atomic_output_dir(out: str, overwrite: bool):
  """Yield a temporary folder that replaces `out` only if the block succeeds."""
  out = os.path.abspath(out)
  if os.path.exists(out) and not overwrite:
    raise JaxteleError(f"{out}: already exists (pass --overwrite to replace it)")
  parent = os.path.dirname(out)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=".tmp-" + os.path.basename(out) + "-", dir=parent)
  try:
    yield tmp
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  if os.path.exists(out):
    shutil.rmtree(out)
  os.rename(tmp, out)


def write(model, fmt: str, folder: str, *, tokenizer=None, dtype=None, lora=None, base="", dequantize=False,
          quant="f16"):
  """One format into `folder`. `lora` ({"rslora": ...}) describes adapters; hf and jaxtele merge them into the
  kernels first (in place), which a quantized (NF4) base allows only with `dequantize`."""
  from jaxtele.convert import hf, native, peft
  from jaxtele.models.lora import lora_paths, merge_lora

  if fmt == "adapter":
    if not lora_paths(model):
      raise JaxteleError("--format adapter: the source has no LoRA adapters (it is not a LoRA run)")
    peft.save_adapter(model, folder, rslora=bool((lora or {}).get("rslora")), base_model=base,
                      modules_to_save=(lora or {}).get("modules_to_save", ()))
    return
  merge_lora(model, dequantize=dequantize)
  if fmt == "hf":
    hf.save_hf(model, folder, tokenizer=tokenizer, dtype=dtype)
  elif fmt == "jaxtele":
    native.save_native(model, folder, tokenizer)
  elif fmt == "gguf":
    from jaxtele.convert.gguf_export import save_gguf

    save_gguf(model, os.path.join(folder, GGUF_FILE), tokenizer=tokenizer, quant=quant)
  else:
    raise JaxteleError(f"--format: unknown format {fmt!r} (choose from {', '.join(FORMATS)})")


@contextlib.contextmanager
def adapter_base(cfg, graphdef, params, frozen, folder, tokenizer, dtype):
  """Yield (where the base will be, where it is now) for a PEFT adapter of this run: the source folder when it
  is an HF one and only the adapters trained; else the run's base (with any trained extra modules), written to
  a temporary sibling of `folder` that replaces it only when the block succeeds, so a refused or failed export
  leaves an earlier base as it was."""
  from flax import nnx

  from jaxtele.models.lora import strip_adapters

  src = cfg.model.source
  if src and model_source.resolve(src).kind == "hf" and not cfg.lora.extra_trainable:
    yield os.path.abspath(src), os.path.abspath(src)
    return
  with atomic_output_dir(folder, overwrite=True) as tmp:
    # The original base: a PiSSA residual gets its top-R part back; an NF4 base is written dequantized.
    base = strip_adapters(nnx.merge(graphdef, params, frozen))
    write(base, "hf", tmp, tokenizer=tokenizer, dtype=dtype, dequantize=True)
    yield os.path.abspath(folder), tmp


def run_lora_info(cfg) -> dict:
  """What an adapter export of a run needs: rsLoRA, and the whole modules it trained (PEFT modules_to_save)."""
  from jaxtele.build import model_config, saved_modules

  wants = cfg.lora.train_embeddings or cfg.lora.train_head
  tied = model_config(cfg.model).tie_word_embeddings if wants else False
  return {"rslora": cfg.lora.rslora, "modules_to_save": saved_modules(cfg.lora, tied) if wants else []}


def export_run(cfg, graphdef, params, frozen, tokenizer, log=print, root=None, verify=None) -> dict:
  """A run's exports as its config asks, under `root` (default `run_dir/export/`): `hf` (full FT);
  `adapter` (+ `base` when needed) and `merged` (LoRA)."""
  from flax import nnx

  root = root or RunDir(cfg.run_dir).file(EXPORT)
  dtype = cfg.export.dtype or cfg.model.param_dtype
  lora = run_lora_info(cfg)
  dequantize = cfg.lora.quantize_base != "none"
  jobs = []
  if cfg.train.mode == "full" and cfg.export.hf:
    jobs.append(("hf", "hf"))
  if cfg.train.mode == "lora" and cfg.export.adapter:
    jobs.append(("adapter", "adapter"))
  if cfg.train.mode == "lora" and (cfg.export.merged or cfg.export.hf):
    jobs.append(("merged", "hf"))
  written = {}
  verify = cfg.export.verify if verify is None else verify
  ref = certify.Reference(nnx.merge(graphdef, params, frozen), tokenizer, certify.probe_text(cfg)) \
      if verify and jobs else None
  for name, fmt in jobs:
    beside = adapter_base(cfg, graphdef, params, frozen, os.path.join(root, "base"), tokenizer, dtype) \
        if fmt == "adapter" else contextlib.nullcontext(("", ""))
    with atomic_output_dir(os.path.join(root, name), overwrite=True) as tmp, beside as (base, base_now):
      model = nnx.merge(graphdef, params, frozen)
      write(model, fmt, tmp, tokenizer=tokenizer, dtype=dtype, lora=lora, base=base, dequantize=dequantize)
      # The run's resolved config travels with the weights: evaluation prompts with its SFT template.
      write_record(tmp, cfg)
      certify.verify(tmp, fmt, ref, model, dtype=dtype, base=base_now, log=log)
    written[name] = os.path.join(root, name)
    log(f"exported {name}: {written[name]}")
  return written


def adapter_info(folder: str) -> dict:
  """What re-exporting a PEFT adapter keeps: rsLoRA and the whole modules it trained."""
  from jaxtele.convert.peft import read_config
  from jaxtele.models.adapters import uses_rslora

  config = read_config(folder)
  return {"rslora": uses_rslora(config), "modules_to_save": config["modules_to_save"]}


def export(source: str, out: str, fmt: str = "hf", dtype: str | None = None, overwrite: bool = False,
           step: int | None = None, base: str | None = None, dequantize: bool = False, quant: str = "f16",
           verify: bool = True, select: str | None = None):
  if fmt not in FORMATS:
    raise JaxteleError(f"--format: unknown format {fmt!r} (choose from {', '.join(FORMATS)})")
  if dtype not in (None, *DTYPES):
    raise JaxteleError(f"--dtype: unknown dtype {dtype!r} (choose from {', '.join(DTYPES)})")
  if fmt == "gguf":
    from jaxtele.convert.gguf_export import QUANTS

    if quant not in QUANTS:
      raise JaxteleError(f"--quant: cannot write {quant!r} (choose from {', '.join(QUANTS)})")
  lora, cfg, beside = None, None, contextlib.nullcontext(("", ""))
  if select:
    step = frontier.select_step(source, select, step)
  m = model_source.load(model_source.resolve(source, step, base))
  model, tokenizer = m.model, m.tokenizer
  if m.kind == "peft":
    lora, beside = adapter_info(source), contextlib.nullcontext((m.base, m.base))
  elif m.kind == "run":
    cfg = m.run_cfg
    lora = run_lora_info(cfg)
    if fmt == "adapter" and cfg.train.mode == "lora":
      # Beside the adapter, not inside it: `out` is replaced as a whole.
      beside = adapter_base(cfg, m.graphdef, m.params, m.frozen, out.rstrip("/") + "-base", tokenizer,
                            dtype or cfg.model.param_dtype)
  ref = certify.Reference(model, tokenizer, certify.probe_text(cfg)) if verify else None  # before any merge
  # `out` is refused (exists, no --overwrite) before a base is written; both are renamed in only on success.
  with atomic_output_dir(out, overwrite) as tmp, beside as (adapter_on, base_now):
    write(model, fmt, tmp, tokenizer=tokenizer, dtype=dtype, lora=lora, base=adapter_on, dequantize=dequantize,
          quant=quant)
    certify.verify(tmp, fmt, ref, model, dtype=dtype, quant=quant, base=base_now)
  print(f"exported {source} -> {out} ({fmt}{', base ' + adapter_on if adapter_on else ''})")


def export_merged(folders: str, weights: str, out: str, fmt: str = "adapter", method: str = "linear",
                  base: str | None = None, overwrite: bool = False, dtype: str | None = None, verify: bool = True,
                  **kw):
  """`--merge-adapters a,b --weights 0.5,0.5`: PEFT adapters on one base merged (models/merge.py) into one
  adapter (`--format adapter`) or a merged model (any other format)."""
  from jaxtele.convert.peft import merge_folders

  paths = [f for f in folders.split(",") if f]
  try:
    ws = [float(w) for w in weights.split(",")] if weights else [1.0 / len(paths)] * len(paths)
  except ValueError:
    raise JaxteleError(f"--weights: not a comma-separated list of numbers: {weights!r}") from None
  if len(ws) != len(paths):
    raise JaxteleError(f"--weights: {len(ws)} weights for {len(paths)} adapters")
  model, tokenizer, base = merge_folders(paths, ws, method, base, as_adapter=fmt == "adapter", **kw)
  base = os.path.abspath(base) if os.path.isdir(base) else base
  ref = certify.Reference(model, tokenizer, certify.probe_text(None)) if verify else None
  with atomic_output_dir(out, overwrite) as tmp:
    write(model, fmt, tmp, tokenizer=tokenizer, dtype=dtype, base=base)
    certify.verify(tmp, fmt, ref, model, dtype=dtype, base=base if fmt == "adapter" else "")
  print(f"merged {len(paths)} adapters ({method}) -> {out} ({fmt})")


@cli
def main(argv=None):
  p = argparse.ArgumentParser(prog="python -m jaxtele.export", description=__doc__.split("\n")[0])
  p.add_argument("--source", default=None,
                 help="HF folder, HF hub id, .gguf, jaxtele folder, run directory or PEFT adapter folder")
  p.add_argument("--base", default=None, help="PEFT adapter sources: the base model (default: the adapter's)")
  p.add_argument("--out", required=True, help="output folder")
  p.add_argument("--format", default=None, choices=FORMATS, help="default: hf (adapter with --merge-adapters)")
  p.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (default: the model's)")
  p.add_argument("--step", type=int, default=None, help="run directories: the checkpoint step (default: latest)")
  p.add_argument("--overwrite", action="store_true")
  p.add_argument("--dequantize", action="store_true", help="allow merging adapters into an NF4 base (as floats)")
  p.add_argument("--quant", default="f16", help="--format gguf: f16 | bf16 | q8_0 | f32 (default f16)")
  p.add_argument("--merge-adapters", default=None, help="PEFT adapter folders a,b,... on one base: merge them")
  p.add_argument("--weights", default=None, help="--merge-adapters: one weight each (default: equal, summing to 1)")
  p.add_argument("--method", default="linear", help="--merge-adapters: linear | ties | dare | dare_ties")
  p.add_argument("--density", type=float, default=1.0, help="ties: the fraction of each delta kept by magnitude")
  p.add_argument("--drop", type=float, default=0.0, help="dare: the probability an entry is dropped")
  p.add_argument("--seed", type=int, default=0, help="dare: the seed of the drop masks")
  p.add_argument("--rank", type=int, default=None, help="ties/dare as an adapter: its rank (default: summed)")
  p.add_argument("--no-verify", action="store_true", help="skip the export certificate's checks")
  p.add_argument("--select", default=None, choices=frontier.SELECTIONS,
                 help="run directories: which checkpoint (best-within-budget: lowest domain bpb within the budget)")
  args = p.parse_args(argv)
  if args.merge_adapters:
    export_merged(args.merge_adapters, args.weights, args.out, args.format or "adapter", args.method, args.base,
                  args.overwrite, args.dtype, verify=not args.no_verify, density=args.density, drop=args.drop,
                  seed=args.seed, rank=args.rank)
    return
  if not args.source:
    raise JaxteleError("--source is required (or --merge-adapters)")
  export(args.source, args.out, args.format or "hf", args.dtype, args.overwrite, args.step, args.base,
         args.dequantize, args.quant, verify=not args.no_verify, select=args.select)


if __name__ == "__main__":
  sys.exit(main())
