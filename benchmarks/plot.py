"""The summary figure of a run: the headline speed-up of each op (medkernels' main kernels at the networks'
stage shapes, geometric mean over the shapes, whiskers from the slowest to the fastest shape) and of each
network (inference at the largest batch, the training step) against each baseline, on a log axis with 1x
marked. The numbers are report.headline_speedups'; every row is in the Markdown table beside the plot.
Needs matplotlib."""
from .report import headline_speedups, main_provider

PASS_SHORT = {"forward": "fwd", "forward+backward": "fwd+bwd", "inference": "inference", "train step": "train step"}
# one colour per baseline, the same in both panels
PALETTE = ("tab:blue", "tab:orange", "tab:purple", "tab:brown", "tab:olive", "tab:cyan", "tab:pink", "tab:gray")


def plot_groups(data):
    """[(panel title, [headline entries])]: the ops and the networks, each in run order."""
    entries = headline_speedups(data)
    ops = [h for h in entries if h["kind"] == "op"]
    nets = [h for h in entries if h["kind"] == "network"]
    main = main_provider(data)
    groups = []
    if ops:
        groups.append((f"ops: medkernels `{main}` kernels vs each baseline (forward and forward+backward)", ops))
    if nets:
        groups.append(("networks: medkernels (float32) vs each baseline", nets))
    return groups


def _label(h):
    return f"{h['name']}  {PASS_SHORT.get(h['pass'], h['pass'])}  ({h['what']})"


def write_plot(data, path):
    """Write the PNG to `path`; ImportError when matplotlib is missing, ValueError when nothing ran."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullFormatter

    groups = plot_groups(data)
    if not groups:
        raise ValueError("no row with a measured speed-up to plot")
    baselines = list(dict.fromkeys(h["baseline"] for _, entries in groups for h in entries))
    colour = {b: PALETTE[i % len(PALETTE)] for i, b in enumerate(baselines)}
    values = [v for _, entries in groups for h in entries for v in (h["min"], h["max"], h["geomean"])]
    lo, hi = min(values + [1.0]) / 1.6, max(values + [1.0]) * 3.0
    heights = [len(entries) for _, entries in groups]
    fig, axes = plt.subplots(len(groups), 1, figsize=(11, 1.3 + 0.32 * sum(heights) + 0.8 * len(groups)),
                             gridspec_kw={"height_ratios": heights}, squeeze=False)
    for ax, (title, entries) in zip(axes[:, 0], groups):
        y = list(range(len(entries)))[::-1]  # first entry on top
        geo = [h["geomean"] for h in entries]
        # bars grow from the 1x line: right for faster than the baseline, left for slower
        ax.barh(y, [abs(v - 1) or 1e-3 for v in geo], left=[min(v, 1) for v in geo], height=0.7,
                color=[colour[h["baseline"]] for h in entries], alpha=0.85)
        for yi, h in zip(y, entries):
            if h["n"] > 1:
                ax.plot([h["min"], h["max"]], [yi, yi], color="black", linewidth=1.0)
                ax.plot([h["min"], h["max"]], [yi, yi], "|", color="black", markersize=7)
            edge = max(h["max"], 1.0)
            ax.annotate(f"{h['geomean']:.3g}x vs {h['baseline']}", (edge, yi), xytext=(4, 0),
                        textcoords="offset points", va="center", fontsize=8)
        ax.set_yticks(y, [_label(h) for h in entries], fontsize=8)
        ax.set_xscale("log")
        ax.set_xlim(lo, hi)
        ticks = [t for t in (0.01, 0.03, 0.1, 0.3, 0.5, 1, 2, 3, 5, 10, 30, 100, 300, 1000) if lo <= t <= hi]
        ax.xaxis.set_major_locator(FixedLocator(ticks))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x:g}x"))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.axvline(1.0, color="black", linewidth=0.9)
        ax.grid(axis="x", which="major", color="0.85", linewidth=0.6)
        ax.set_axisbelow(True)
        ax.set_ylim(-0.7, len(entries) - 0.3)
        ax.set_title(title, fontsize=9, loc="left")
        ax.tick_params(axis="x", labelsize=8)
    axes[-1, 0].set_xlabel("speed-up = baseline time / medkernels time (log scale; >1x: medkernels is faster)",
                           fontsize=8)
    axes[0, 0].legend(handles=[Patch(color=colour[b], label=f"vs {b}") for b in baselines], fontsize=7,
                      loc="lower right", ncol=min(4, len(baselines)), framealpha=0.9)
    dev, env = data["device"], data.get("environment", {})
    commit = str(env.get("git_commit", "unknown"))[:12]
    fig.suptitle(f"medkernels speed-ups on {dev['name']} ({dev['threads']} threads), {data['started'][:10]}, "
                 f"--{data['mode']}, commit {commit}\nops: geometric mean over the stage shapes timed, whiskers "
                 f"from the slowest to the fastest shape", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
