"""One refresh of the embedded model on 200 reviewed samples, on this machine: wall time,
seconds per optimizer step, peak RSS of the training process, and what the gate decided.

    .venv/bin/python bench/refresh.py [--samples 200] [--models-dir hangjia-data/models]
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

TEMPLATES = ["{region}{period_zh}的销售额是多少？", "请分析我司{period_zh}{region}区销售收入变化趋势",
             "How much revenue did {region_en} make {period_en}?", "{region_en} sales {period_en}?"]
REGIONS = [("华东", "East China"), ("华南", "South China"), ("华北", "North China"), ("西南", "Southwest China"),
           ("华中", "Central China")]
PERIODS = [("上季度", "last quarter", "last_quarter"), ("上个月", "last month", "last_month"),
           ("本季度", "this quarter", "this_quarter"), ("今年", "this year", "this_year")]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=200)
    parser.add_argument("--models-dir", type=Path, default=Path("hangjia-data/models"))
    parser.add_argument("--lora-r", type=int, default=64)
    args = parser.parse_args()

    from finetune.dataset import import_jsonl
    from finetune.samples import tool_call_message
    from storage import adapters as registry
    from webapp.models import ModelSpec, load_model_service
    from webapp.services import open_services
    from webapp.settings import Settings

    model = load_model_service(ModelSpec("embedded"), args.models_dir)
    data_dir = Path(tempfile.mkdtemp(prefix="hangjia-bench-refresh-"))
    settings = Settings(data_dir=data_dir, demo=True, demo_feedback=False, lora_r=args.lora_r, lora_alpha=16, learning_rate=2e-4,
                        lora_target_modules="q_proj,k_proj,v_proj", eval_max_new_tokens=48)
    services = open_services(settings, model=model)
    lines = []
    for i in range(args.samples):
        (region, region_en), (period_zh, period_en, period) = REGIONS[i % 5], PERIODS[(i // 5) % 4]
        question = TEMPLATES[(i // 20) % 4].format(region=region, region_en=region_en, period_zh=period_zh,
                                                   period_en=period_en) + " " * (i // 80)
        lines.append(json.dumps({"messages": [{"role": "system", "content": settings.system_prompt},
                                              {"role": "user", "content": question},
                                              tool_call_message("query_sales", {"region": region, "period": period},
                                                                f"c{i}")]}, ensure_ascii=False))
    imported = import_jsonl(services.db, "\n".join(lines), "finance", None)
    steps: list[float] = []

    def on_progress(event):
        if event["event"] == "step":
            steps.append(time.monotonic())
            print(f"  step {event['step']}/{event['total_steps']} loss {event['loss']:.4f} ETA {event['eta_s']:.0f}s",
                  flush=True)

    started = time.monotonic()
    outcome = services.refresh.refresh("finance", "cli", force=True, on_progress=on_progress)
    wall = time.monotonic() - started
    run = registry.runs(services.db)[0]
    per_step = (steps[-1] - steps[0]) / (len(steps) - 1) if len(steps) > 1 else float("nan")
    print(f"\nembedded SmolLM2-135M, {imported.by_split} samples (+{settings.general_replay} general replay), "
          f"LoRA r={args.lora_r} q/k/v, {settings.epochs} epochs, accumulation {settings.gradient_accumulation}, 2-core CPU")
    print(f"mode: {run['mode']}")
    print(f"refresh wall time (train + evaluate + gate): {wall:.0f} s; optimizer steps {run['steps']}; "
          f"{per_step:.2f} s per step; final loss {run['final_loss']:.4f} (first {json.loads(run['losses'])[0]:.4f})")
    print(f"peak RSS of the training process: {resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024:.0f} MiB; "
          f"app process: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")
    print(f"outcome: {outcome.status}, candidate {outcome.version}, gate passed {outcome.gate and outcome.gate['passed']}, "
          f"promoted {outcome.promoted}")
    if outcome.gate:
        for row in outcome.gate["table"]:
            print(f"  {row['metric']:<22} active {row['active']:.3f}  candidate {row['candidate']:.3f}")
    services.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
