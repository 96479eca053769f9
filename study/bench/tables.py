"""The bench's reports as text: the per-step table of each backend, the lmax sweep and the plain
tables `plan` prints too."""

from __future__ import annotations

import io
import math
from collections.abc import Callable, Sequence


def context_lines(report: dict) -> list[str]:
    lines = [
        f"device {report['device']} ({report['device_name']}), {report['threads']} threads, batch {report['batch_size']}, "
        f"median of {report['repeats']} steps after {report['warmup']} warm-up",
    ]
    if report.get("cueq"):
        methods = sorted({c["cueq_method"] for c in report.get("configs", []) if c.get("cueq_method")})
        if report["cueq"] == "cuda kernels" and methods == ["naive"]:
            lines.append("cuEquivariance: its CUDA kernels failed to load (see the warnings); ran its PyTorch fallback (method naive)")
        else:
            lines.append(f"cuEquivariance: {report['cueq']}" + (f" (method {', '.join(methods)})" if methods else ""))
    return lines


def _backend_table(title: str, configs: list[dict], backends: Sequence[str], first: tuple[str, Callable[[dict], str]]):
    from rich.table import Table

    def mb(value: float | None) -> str:
        return f"{value:.0f}" if value is not None and math.isfinite(value) else "n/a"

    table = Table(title=title, title_justify="left")
    table.add_column(first[0])
    for column in ("edges/batch", "GFLOP/step"):
        table.add_column(column, justify="right")
    for name in backends:
        table.add_column(f"{name} mol/s", justify="right")
    for name in backends:
        if name != "e3nn":
            table.add_column(f"{name}/e3nn", justify="right")
    for name in backends:
        table.add_column(f"{name} GF/s", justify="right")
    for name in backends:
        table.add_column(f"{name} MB", justify="right")
    for config in configs:
        numbers = config["backends"]
        table.add_row(
            first[1](config),
            f"{config['mean_edges_per_batch']:.0f}",
            f"{config['flops_per_step'] / 1e9:.2f}",
            *[f"{numbers[n]['molecules_per_s']:.1f}" for n in backends],
            *[f"{numbers[n]['vs_e3nn']:.1f}x" for n in backends if n != "e3nn"],
            *[f"{numbers[n]['gflops_per_s']:.2f}" for n in backends],
            *[mb(numbers[n]["peak_memory_mb"]) for n in backends],
        )
    return table


def render_text(*items) -> str:
    """Lines and rich tables, in order, as plain text (the reports' --json-less output)."""
    from rich.console import Console

    console = Console(width=200, record=True, file=io.StringIO(), highlight=False)
    for item in items:
        console.print(item)
    return console.export_text().rstrip()


def format_table(report: dict) -> str:
    """A text table of a :func:`run_bench` report (molecules/s, ratios, GFLOP/s, peak MB)."""
    lines = context_lines(report) + [f"matmul reference: {report['matmul_gflops']:.1f} GFLOP/s (float32)"]
    for edges, loading in report["data_loading"].items():
        lines.append(
            f"data loading ({edges}): {loading['molecules_per_s']:.0f} molecules/s from the collated split "
            f"(collated once in {loading['collate_seconds'] * 1000:.1f} ms for {loading['molecules']} molecules); "
            f"PyG DataLoader {loading['dataloader_molecules_per_s']:.0f} molecules/s"
        )
    return render_text(*lines, _backend_table("training steps", report["configs"], report["backends"], ("config", lambda c: c["name"])))


def format_lmax_sweep(report: dict) -> str:
    """A text table of a :func:`run_lmax_sweep` report, with the fitted growth exponents."""
    lines = context_lines(report)
    for name, growth in report["growth"].items():
        time_exponent, memory_exponent = growth["time_exponent"], growth["memory_exponent"]
        lines.append(f"{name}: step time ~ lmax^{time_exponent:.2f}" if time_exponent is not None else f"{name}: one lmax, no fit")
        if memory_exponent is not None:
            lines[-1] += f", peak memory ~ lmax^{memory_exponent:.2f}"
    title = f"l = 0..lmax, hidden {report['hidden_dim']}"
    return render_text(*lines, _backend_table(title, report["configs"], report["backends"], ("lmax", lambda c: str(c["lmax"]))))
