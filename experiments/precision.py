"""Does bf16 change greedy accuracy? One model, the same held-out items, fp32 against bf16.

    python -m experiments.precision --model runs/default/sft/round_0/model --limit 100

Evaluates the model on the reasoning benchmark (greedy) three ways, on the same items:

- ``fp32``: fp32 weights, fp32 arithmetic (the reference);
- ``bf16-weights``: every weight rounded to bf16 and computed in fp32, i.e. what storing or
  shipping the weights in bf16 loses, separated from bf16 arithmetic. It runs at fp32 speed, so
  it is measurable on any machine;
- ``bf16``: bf16 weights and bf16 arithmetic (what ``dtype=auto`` evaluates in on a GPU or an
  AVX-512 BF16/AMX CPU). Only where bf16 is native, or with ``--bf16-compute``: an AVX2 CPU
  emulates it about 100x slower than fp32.

Each is compared with ``fp32`` item by item (the paired difference, its bootstrap interval, the
exact McNemar test) and by the share of answers identical token for token. Writes
``<out>/<variant>/reasoning.json`` (+ records) and ``<out>/precision.json``; prints a table.
One vLLM engine serves the fp32 and rounded-weight passes where vLLM is installed
(``--backend``), HF ``generate`` otherwise.
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from gsil.evaluation.results import compare_results, load_records, result_paths
from gsil.evaluation.runner import EvalOptions, EvalRequest, evaluate_model
from gsil.generation import BACKENDS, resolve_backend
from gsil.generation.common import AUTO, VLLM
from gsil.io import write_json
from gsil.models import load_model, native_bf16, resolve_device

logger = logging.getLogger(__name__)


def round_weights_to_bf16(model: torch.nn.Module) -> int:
    """Round every floating-point parameter and buffer to the nearest bf16 value, in place,
    keeping its dtype (fp32 arithmetic on bf16-representable weights). Returns how many
    tensors changed."""
    changed = 0
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            if tensor.is_floating_point() and tensor.dtype != torch.bfloat16:
                rounded = tensor.to(torch.bfloat16).to(tensor.dtype)
                changed += int(not torch.equal(rounded, tensor))
                tensor.copy_(rounded)
    return changed


def identical_share(path_a: Path, path_b: Path) -> dict[str, Any]:
    """How many items got the same completion text in two evaluations of the same items."""
    a = {r["id"]: r["completion"] for r in load_records(path_a)}
    b = {r["id"]: r["completion"] for r in load_records(path_b)}
    if a.keys() != b.keys():
        raise ValueError(f"{path_a} and {path_b} hold different items")
    same = sum(a[key] == b[key] for key in a)
    return {"identical": same, "n": len(a), "share": same / len(a) if a else float("nan")}


@dataclass(frozen=True)
class PrecisionStudy:
    """What the comparison evaluates: ``limit`` held-out reasoning items per task of seed
    ``seed``, greedy with ``max_new_tokens`` on ``backend``; ``bf16_compute``: also in bf16
    arithmetic (None: where bf16 is native)."""

    limit: int = 100
    seed: int = 0
    max_new_tokens: int = 160
    backend: str = AUTO
    bf16_compute: bool | None = None


def measure(model_spec: str, out: Path, study: PrecisionStudy | None = None) -> dict[str, Any]:
    """Evaluate ``model_spec`` in each precision and compare each with fp32 (see module doc)."""
    study = study or PrecisionStudy()
    limit, seed, backend = study.limit, study.seed, study.backend
    device = resolve_device()
    bf16_compute = native_bf16(device) if study.bf16_compute is None else study.bf16_compute
    options = EvalOptions(backend=backend, max_new_tokens=study.max_new_tokens)
    model, tokenizer = load_model(model_spec, dtype="float32", device=device)
    engine = None
    if resolve_backend(backend, model) == VLLM:
        from gsil.generation.vllm_engine import EngineSlot

        engine = EngineSlot()  # one fp32 engine: the fp32 weights, then the rounded ones

    def run(variant: str, policy: Any, **kwargs: Any) -> Path:
        request = EvalRequest(options, limit, seed)
        evaluate_model((policy, tokenizer), ["reasoning"], out / variant, request, **kwargs)
        return result_paths(out / variant, "reasoning")[1]

    try:
        records = {"fp32": run("fp32", model, engine=engine)}
        changed = round_weights_to_bf16(model)
        logger.info("rounded %d weight tensors to bf16 values", changed)
        records["bf16-weights"] = run("bf16-weights", model, engine=engine)
    finally:
        if engine is not None:
            engine.close()
    del model
    if bf16_compute:
        bf16_model, _ = load_model(model_spec, dtype="bfloat16", device=device)
        records["bf16"] = run("bf16", bf16_model)

    meta = {
        "model": model_spec,
        "device": str(device),
        "native_bf16": native_bf16(device),
        "items": limit,
        "seed": seed,
        "backend": backend,
    }
    return summarize(out, records, meta, bf16_compute)


def summarize(
    out: Path, records: dict[str, Path], meta: dict[str, Any], bf16_compute: bool
) -> dict[str, Any]:
    """Compare each variant's records with ``records["fp32"]`` item by item; write and return
    ``<out>/precision.json``."""
    summary: dict[str, Any] = {**meta, "variants": {}}
    for variant, path in records.items():
        if variant == "fp32":
            continue
        comparison = compare_results(path, records["fp32"])
        summary["variants"][variant] = {
            "accuracy": comparison["mean_a"],
            "fp32_accuracy": comparison["mean_b"],
            "difference": comparison["difference"],
            "interval": comparison["interval"],
            "mcnemar": comparison.get("mcnemar"),
            "identical_completions": identical_share(path, records["fp32"]),
        }
    if not bf16_compute:
        summary["bf16_compute"] = (
            "not measured: bf16 is emulated on this device (about 100x slower than fp32); "
            "--bf16-compute measures it anyway"
        )
    write_json(out / "precision.json", summary)
    return summary


def table(summary: dict[str, Any]) -> str:
    """The comparison as a markdown table (points, paired against fp32)."""
    rows = [
        "| precision | accuracy | fp32 | Δ [95% CI] | McNemar p | identical completions |",
        "|---|---|---|---|---|---|",
    ]
    for variant, v in summary["variants"].items():
        low, high = v["interval"]
        same = v["identical_completions"]
        p = f"{v['mcnemar']['p_value']:.3f}" if v["mcnemar"] else "n/a"
        rows.append(
            f"| {variant} | {100 * v['accuracy']:.1f} | {100 * v['fp32_accuracy']:.1f} | "
            f"{100 * v['difference']:+.1f} [{100 * low:+.1f}, {100 * high:+.1f}] | "
            f"{p} | {same['identical']}/{same['n']} |"
        )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        prog="python -m experiments.precision", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--model", required=True, help="a model directory, hub id or smollm2-135m")
    parser.add_argument("--out", help="output directory (default: runs/precision/<model's run>)")
    defaults = PrecisionStudy()
    parser.add_argument("--limit", type=int, default=defaults.limit, help="held-out items per task")
    parser.add_argument(
        "--seed", type=int, default=defaults.seed, help="seed of the held-out items"
    )
    parser.add_argument("--max-new-tokens", type=int, default=defaults.max_new_tokens)
    parser.add_argument("--backend", default=defaults.backend, choices=BACKENDS)
    parser.add_argument(
        "--bf16-compute",
        action=argparse.BooleanOptionalAction,
        default=defaults.bf16_compute,
        help="also evaluate in bf16 arithmetic (default: where bf16 is native)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    out = Path(
        args.out or Path("runs") / "precision" / Path(args.model).as_posix().replace("/", "_")
    )
    study = PrecisionStudy(
        limit=args.limit,
        seed=args.seed,
        max_new_tokens=args.max_new_tokens,
        backend=args.backend,
        bf16_compute=args.bf16_compute,
    )
    summary = measure(args.model, out, study)
    print(table(summary))
    if "bf16_compute" in summary:
        print(f"bf16 arithmetic {summary['bf16_compute']}")
    print(f"written: {out / 'precision.json'}")
    return summary


if __name__ == "__main__":
    main()
