"""The load heatmap (matplotlib) of :meth:`moerail.balance.LoadTracker.plot`."""

from __future__ import annotations

from typing import Optional

from ._args import _loads
from .placement import default_placement, placement_metrics


def plot_heatmap(
    path: str,
    load,
    phy2log=None,
    num_gpus: Optional[int] = None,
    num_nodes: int = 1,
    *,
    before=None,
) -> None:
    """Heatmaps, each value a multiple of its layer's mean: ``load [L, E]`` (layers x experts),
    then layers x devices for ``before`` (a placement to compare with) and ``phy2log`` (or
    Megatron's default layout when ``num_gpus`` divides the number of experts). Needs
    matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
        from matplotlib.ticker import MaxNLocator
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise RuntimeError("plot_heatmap needs matplotlib (pip install matplotlib)") from e
    w = _loads(load, "load")
    num_layers, num_experts = w.shape
    rel = (w / w.mean(1, keepdim=True).clamp_min(1e-300)).numpy()
    panels = [("tokens per expert / layer mean", rel, "expert")]
    if phy2log is None and num_gpus is not None and num_experts % num_gpus == 0:
        phy2log = default_placement(num_layers, num_experts, num_gpus)
    if (phy2log is not None or before is not None) and num_gpus is None:
        raise ValueError("num_gpus: needed with a placement")
    for name, p in (("before", before), ("placement", phy2log)):
        if p is None:
            continue
        m = placement_metrics(w, p, num_gpus, num_nodes)
        dl = m["device_load"]
        title = (
            f"{name}: device load / mean (max/mean {m['summary']['max_mean_device']:.3f}, "
            f"bound {m['summary']['lower_bound']:.3f})"
        )
        panels.append((title, (dl / dl.mean(1, keepdim=True).clamp_min(1e-300)).numpy(), "device"))
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 0.25 * num_layers + 2.5), squeeze=False)
    vmax = max(float(d.max()) for _, d, _ in panels)
    for ax, (title, data, xlabel) in zip(axes[0], panels):
        im = ax.imshow(data, aspect="auto", interpolation="nearest", cmap="viridis", vmin=0, vmax=vmax)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("layer")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
