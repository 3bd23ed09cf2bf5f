"""The speed-up plot of a run: one bar per provider for each op, pass and shape (and each network's
inference and training rows), on a log axis with 1x (the row's baseline) marked. Needs matplotlib."""


def plot_groups(data):
    """[(group title, [(provider, speed-up, baseline)])] for every group with at least one measured ratio."""
    groups = {}
    for row in data["op_rows"] + data["model_rows"]:
        if row["status"] != "ok" or row.get("speedup") is None:
            continue
        title = f"{row['op']} {row['pass']}\n{row.get('label', '')}"
        groups.setdefault(title, []).append((row["provider"], row["speedup"], row["baseline"]))
    return list(groups.items())


def write_plot(data, path):
    """Write the PNG to `path`; ImportError when matplotlib is missing, ValueError when nothing ran."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, NullFormatter

    groups = plot_groups(data)
    if not groups:
        raise ValueError("no row with a measured speed-up to plot")
    cols = min(4, len(groups))
    rows = (len(groups) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.0 * rows), squeeze=False)
    for ax, (title, bars) in zip(axes.flat, groups):
        names = [p for p, _, _ in bars]
        values = [s for _, s, _ in bars]
        colors = ["tab:gray" if p == b else "tab:green" if s >= 1 else "tab:red" for p, s, b in bars]
        # bars grow from the 1x line: right for faster than the baseline, left for slower
        ax.barh(range(len(bars)), [abs(v - 1) or 1e-3 for v in values], left=[min(v, 1) for v in values],
                color=colors)
        ax.set_yticks(range(len(bars)), names, fontsize=7)
        ax.set_xscale("log")
        ax.set_xlim(min(values + [1]) / 2, max(values + [1]) * 2.5)
        ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x:g}x"))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.axvline(1.0, color="black", linewidth=0.8)
        ax.set_title(title, fontsize=8)
        ax.set_xlabel(f"speed-up vs {bars[0][2]}", fontsize=7)
        ax.tick_params(axis="x", labelsize=7)
        for i, v in enumerate(values):
            ax.annotate(f"{v:.3g}x", (max(v, 1), i), fontsize=6, va="center", xytext=(2, 0),
                        textcoords="offset points")
    for ax in list(axes.flat)[len(groups):]:
        ax.axis("off")
    dev = data["device"]
    fig.suptitle(f"medkernels speed-ups, {dev['name']} ({dev['threads']} threads), {data['started'][:10]}, "
                 f"--{data['mode']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
