"""The bench report: a Markdown table (mean +- stddev), JSON, and a latency-vs-context plot."""

from __future__ import annotations

import json
import platform
from pathlib import Path

import torch


def environment(device: torch.device) -> dict:
    info = {"torch": torch.__version__, "python": platform.python_version(), "device": str(device)}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        info.update(gpu=p.name, memory_gib=round(p.total_memory / 2**30, 1), cuda=torch.version.cuda)
        try:
            import subprocess

            info["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                            capture_output=True, text=True, timeout=30).stdout.strip() or None
        except (OSError, subprocess.SubprocessError):
            info["driver"] = None
    return info


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.0f}%"


def markdown(report: dict) -> str:
    env = report["environment"]
    lines = [
        f"Card: {env.get('gpu', env['device'])}, driver {env.get('driver')}, torch {env['torch']}, triton {env.get('triton')}. "
        f"Read bandwidth measured in this run: {report['read_bandwidth'] / 1e9:.0f} GB/s"
        + (f"; datasheet {report['datasheet_bandwidth'] / 1e9:.0f} GB/s" if report.get("datasheet_bandwidth") else "")
        + (f". Memory budget {report['memory_budget'] / 1e9:.0f} GB." if report.get("memory_budget") else "."),
        "",
        "| config | BPW | weights GB | KV B/token | TTFT ms | latency ms (first .. last ctx) | B fit ms | B theory ms | B eff | W fit tok/ms | W theory | W eff | R^2 | max ctx pred/alloc |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["results"]:
        lat = r["latency_ms"]
        first, last = (lat[0], lat[-1]) if lat else (None, None)
        ttft = r["ttft_ms"]
        fit, th = r["fit"], r["theory_measured_bw"]
        eff = r.get("efficiency", {})
        lines.append(
            f"| {r['name']} | {r['bpw']:.2f} | {r['weight_bytes'] / 1e9:.2f} | {r['kv_bytes_per_token']} | "
            + ("-" if not ttft else f"{ttft['mean']:.2f} ± {ttft['std']:.2f}") + " | "
            + ("-" if not lat else f"{first['mean']:.3f} ± {first['std']:.3f} .. {last['mean']:.3f} ± {last['std']:.3f}") + " | "
            + ("-" if not fit else f"{fit['B_ms']:.3f}") + f" | {th['B_ms']:.3f} | {_pct(eff.get('B'))} | "
            + ("-" if not fit else f"{fit['W_tokens_per_ms']:.0f}") + f" | {th['W_tokens_per_ms']:.0f} | {_pct(eff.get('W'))} | "
            + ("-" if not fit else f"{fit['r2']:.3f}") + " | "
            + (f"{r.get('predicted_max_context')}/{r.get('allocated_max_context')}" if "predicted_max_context" in r else "-") + " |"
        )
    if report.get("peers"):
        lines += ["", "| peer | model | ms/token | speed-up of qruntime (fastest config of the model) |", "|---|---|---|---|"]
        for p in report["peers"]:
            ours = [r for r in report["results"] if r["model"] == p["model"] and r["latency_ms"]]
            best = min((r["latency_ms"][0]["mean"] for r in ours), default=None)
            ms = p.get("ms_per_token")
            speed = "-" if not (best and ms) else f"{ms / best:.1f}x"
            lines.append(f"| {p['peer']} | {p['model']} | {'-' if ms is None else f'{ms:.3f}'} | {speed} |")
    if report.get("quality"):
        lines += ["", "| model | perplexity | KL vs first | top-1 agreement |", "|---|---|---|---|"]
        for q in report["quality"]:
            ppl, kl, agree = q.get("ppl"), q.get("kl_mean"), q.get("top1_agreement")
            lines.append(f"| {q['model']} | {'-' if ppl is None else format(ppl, '.4f')} | "
                         f"{'-' if kl is None else format(kl, '.5f')} | {'-' if agree is None else format(agree, '.3f')} |")
    return "\n".join(lines) + "\n"


def write_json(report: dict, path: str | Path) -> None:
    Path(path).write_text(json.dumps(report, indent=2) + "\n")


def plot(report: dict, path: str | Path) -> list[str]:
    """Latency vs context: measured points, fitted line (dashed) and theoretical line (dotted), one
    colour per config. Returns the series labels drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 5.5))
    labels = []
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, r in enumerate(report["results"]):
        if not r["contexts"]:
            continue
        c = colors[i % len(colors)]
        xs = r["contexts"]
        ys = [s["mean"] for s in r["latency_ms"]]
        ax.errorbar(xs, ys, yerr=[s["std"] for s in r["latency_ms"]], fmt="o", color=c, ms=3, label=f"{r['name']} measured")
        labels.append(f"{r['name']} measured")
        if r["fit"]:
            f = r["fit"]
            ax.plot(xs, [(n - 1) / f["W_tokens_per_ms"] + f["B_ms"] for n in xs], "--", color=c,
                    label=f"{r['name']} fit B={f['B_ms']:.2f} W={f['W_tokens_per_ms']:.0f}")
            labels.append(f"{r['name']} fit")
        t = r["theory_measured_bw"]
        ax.plot(xs, [(n - 1) / t["W_tokens_per_ms"] + t["B_ms"] for n in xs], ":", color=c, label=f"{r['name']} theory")
        labels.append(f"{r['name']} theory")
    ax.set_xlabel("context length n (tokens)")
    ax.set_ylabel("decode latency per token (ms)")
    ax.set_title(f"decode latency vs context ({report['environment'].get('gpu', report['environment']['device'])})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return labels
