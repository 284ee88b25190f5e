"""Longer context in the same memory: how much each extra token costs at a training step's peak.

For each setting, the step's peak (as ``benchmarks/peak_memory.py`` measures it: a fresh process
per setting and length, peak resident memory on the CPU above what the process held before the
step) at several sequence lengths; the memory per extra token is the least-squares slope of the
peak over the tokens of the batch, and the longest context that fits a memory budget follows
from the fitted line. The budget defaults to what AC + chunked loss needs at the longest length
measured, so the last column reads "the context this setting fits where AC + chunked loss fits
its longest". Step time is measured at the shortest length.

    python benchmarks/context_length.py                                   # SmolLM2, b1, 1024..4096
    python benchmarks/context_length.py --seqs 1024 2048 4096 8192 --lora-dropout 0.0
    python benchmarks/context_length.py --settings ac-chunked layer-chunked --budget-mib 2048
    python benchmarks/context_length.py --settings ac-chunked layer-recompute-chunked --reuse my_earlier_run.json
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from peak_memory import RESULTS, SETTINGS, build_parser, run_setting

KIB, MIB = 2**10, 2**20
REFERENCE = "ac-chunked"


def fitted_line(tokens: list[int], peaks: list[float]) -> tuple[float, float]:
    """(intercept, slope) of the least-squares line through (tokens, peaks)."""
    mean_t, mean_p = sum(tokens) / len(tokens), sum(peaks) / len(peaks)
    spread = sum((t - mean_t) ** 2 for t in tokens)
    slope = sum((t - mean_t) * (p - mean_p) for t, p in zip(tokens, peaks, strict=True)) / spread
    return mean_p - slope * mean_t, slope


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    parser.description = __doc__.split("\n\n")[0]
    parser.add_argument("--seqs", nargs="+", type=int, default=[1024, 2048, 4096], help="sequence lengths")
    parser.add_argument("--budget-mib", type=float, default=None, help="default: AC + chunked loss at the longest")
    parser.add_argument("--reuse", type=Path, default=None, help="an earlier JSON: rows not measured again")
    parser.set_defaults(
        models=["smollm2"], batch=1, steps=2, settings=[REFERENCE, "layer-chunked"],
        out=RESULTS / "context_length.json",
    )  # fmt: skip
    args = parser.parse_args(argv)
    if len(args.seqs) < 2 or REFERENCE not in args.settings:
        parser.error(f"give at least two --seqs and keep {REFERENCE!r} in --settings (the ratios are to it)")
    seqs = sorted(args.seqs)
    earlier = json.loads(args.reuse.read_text())["rows"] if args.reuse else []
    rows = []
    for name in args.models:
        for key in args.settings:
            for seq in seqs:
                args.seq = seq
                done = [r for r in earlier if (r["model"], r["setting"], r["seq"]) == (name, key, seq)]
                if done and done[0]["batch"] == args.batch and done[0]["lora_dropout"] == args.lora_dropout:
                    rows.append(done[0])
                    continue
                tic = time.perf_counter()
                phases = ("time", "memory") if seq == seqs[0] else ("memory",)
                rows.append(run_setting(name, key, args, phases))
                print(f"# {name} {key} s{seq}: {time.perf_counter() - tic:.0f} s", file=sys.stderr, flush=True)
    summary = summarize(rows, seqs, args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"rows": rows, "summary": summary}, indent=2))
    figure = plot(rows, args.out.with_suffix(".png"))
    print(f"\nrows written to {args.out}" + (f", plot to {figure}" if figure else ""))


def summarize(rows: list[dict], seqs: list[int], args) -> list[dict]:
    """Print and return, per model and setting, the peaks, the memory per token and the context in budget."""
    summary = []
    for name in args.models:
        lines = {}
        for key in args.settings:
            mine = sorted((r for r in rows if r["model"] == name and r["setting"] == key), key=lambda r: r["seq"])
            tokens = [r["seq"] * r["batch"] for r in mine]
            lines[key] = (mine, *fitted_line(tokens, [r["peak_bytes"] for r in mine]))
        reference = lines[REFERENCE]
        budget = args.budget_mib * MIB if args.budget_mib else reference[0][-1]["peak_bytes"]
        print(f"\n{name}, batch {args.batch}, LoRA dropout {args.lora_dropout:g}, budget {budget / MIB:.0f} MiB")
        print("| setting | " + " | ".join(f"peak at {s}, MiB" for s in seqs) + " | KiB per token | / AC + chunked "
              f"| step at {seqs[0]}, s | tokens in budget | / AC + chunked |")  # fmt: skip
        print("|---" * (len(seqs) + 6) + "|")
        for key, (mine, intercept, slope) in lines.items():
            fits = (budget - intercept) / slope / args.batch
            reference_fits = (budget - reference[1]) / reference[2] / args.batch
            row = {
                "model": name, "setting": key, "label": SETTINGS[key].label,
                "peaks": [r["peak_bytes"] for r in mine], "bytes_per_token": slope,
                "per_token_ratio": slope / reference[2], "step_seconds": mine[0]["step_seconds"],
                "tokens_in_budget": fits, "context_ratio": fits / reference_fits, "budget_bytes": budget,
            }  # fmt: skip
            summary.append(row)
            cells = [SETTINGS[key].label, *(f"{p / MIB:.0f}" for p in row["peaks"]), f"{slope / KIB:.1f}"]
            cells += [f"{row['per_token_ratio']:.2f}", f"{row['step_seconds']:.1f}", f"{fits:.0f}"]
            cells.append(f"{row['context_ratio']:.2f}")
            print("| " + " | ".join(cells) + " |", flush=True)
    return summary


def plot(rows: list[dict], path: Path) -> Path | None:
    """The step's peak against the sequence length, one line per setting (needs matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ModuleNotFoundError:
        return None
    figure, axis = plt.subplots(figsize=(6.5, 4.5))
    for key in dict.fromkeys(r["setting"] for r in rows):
        mine = sorted((r for r in rows if r["setting"] == key), key=lambda r: r["seq"])
        peaks = [r["peak_bytes"] / MIB for r in mine]
        axis.plot([r["seq"] for r in mine], peaks, marker="o", label=SETTINGS[key].label)
    first = rows[0]
    axis.set(
        title=f"{first['model']}, batch {first['batch']}, LoRA dropout {first['lora_dropout']:g} ({first['device']})",
        xlabel="sequence length, tokens",
        ylabel="peak memory of one training step, MiB",
    )
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    return path


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    main()
